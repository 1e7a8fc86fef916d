"""``normlab verify``: run the claims' sweeps, decide the verdicts, write the report."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .claims import CLAIMS, StudyContext, Verdict, get_claim
from .claims.base import SCALES
from .report import write_report
from .store import RunStore, StoreError
from .sweep import BACKENDS, RAY_INSTALL_HINT, open_executor, ray_available, run_sweep

logger = logging.getLogger(__name__)

DB_NAME = "normlab.db"
LOCK_NAME = ".normlab.lock"
DEFAULT_SEEDS = 5


@dataclass
class VerifyOptions:
    """The settings of one ``normlab verify`` call; see ``normlab verify --help``."""

    claims: Optional[Sequence[str]] = None
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    out: str = "normlab-out"
    scale: str = "quick"
    seeds: int = DEFAULT_SEEDS
    device: str = "cpu"
    threads: Optional[int] = 1
    progress: bool = True
    workers: int = 1
    backend: Optional[str] = None  # None: "in-process" for 1 worker, else "process"
    address: Optional[str] = None

    def resolved_backend(self) -> str:
        """Return the backend to train on, choosing one when ``backend`` is None."""
        if self.backend is not None:
            return self.backend
        return "in-process" if self.workers == 1 else "process"

    def validate(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"--seeds must be a positive integer, got {self.seeds!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"--threads must be a positive integer, got {self.threads!r}")
        if not str(self.out).strip():
            raise ValueError("--out must name a folder, got an empty string")
        self._validate_backend()
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available; "
                             "use --device cpu")

    def _validate_backend(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be a positive integer, got {self.workers!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, "
                             f"got {self.backend!r}")
        backend = self.resolved_backend()
        if self.address is not None and backend != "ray":
            raise ValueError(f"--address applies to --backend ray only, got backend "
                             f"{backend}; add --backend ray or drop --address")
        if backend == "in-process" and self.workers > 1:
            raise ValueError(f"--backend in-process trains one run at a time, got --workers "
                             f"{self.workers}; use --backend process or ray, or --workers 1")
        if backend == "ray" and not ray_available():
            raise ValueError(f"--backend ray needs the ray package, which is not installed; "
                             f"{RAY_INSTALL_HINT}")


def check_output_dir(out: Path) -> None:
    """Create ``out`` and raise ``ValueError`` if it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output folder {out}: {error.strerror}; "
                         "pass a writable --out folder") from error
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out} is not writable; pass a writable --out folder")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` so two ``verify`` calls never share it."""
    with open(out / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another normlab verify is writing to {out}; wait for it to finish or pass "
                "another --out folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def data_fingerprint(data) -> str:
    """Return a digest of the data's content, so a store never mixes two data sets."""
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        split = getattr(data, name, None)
        if split is None:
            continue
        for tensor in (split.x, split.y):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if hasattr(data, "fingerprint"):
        digest.update(str(data.fingerprint()).encode())
    return digest.hexdigest()[:20]


def verify(options: VerifyOptions) -> list[Verdict]:
    """Run every requested claim and write the report; return the verdicts."""
    options.validate()
    claim_ids = list(dict.fromkeys(options.claims or CLAIMS))
    claims = [get_claim(c) for c in claim_ids]
    if options.seeds < 2:
        logger.warning("one seed gives no interval across seeds, so every verdict will be "
                       "INCONCLUSIVE; use --seeds 2 or more")
    if options.threads is not None:
        torch.set_num_threads(options.threads)

    # load every task's data before the first run, so a data error costs no training
    loaded = {}
    for claim in claims:
        if claim.task not in loaded:
            loaded[claim.task] = claim.load_data(
                options.dataset, options.data_dir, options.download
            )

    out = Path(options.out)
    check_output_dir(out)
    with output_lock(out), RunStore(out / DB_NAME) as store:
        _check_store_settings(store, loaded)
        with open_executor(options.resolved_backend(), options.workers, options.threads,
                           options.address) as executor:
            verdicts = _run_claims(claims, loaded, store, options, out, executor)
    meta = {"dataset": options.dataset, "scale": options.scale, "seeds": options.seeds,
            "threads": torch.get_num_threads()}
    write_report(verdicts, out, meta)
    return verdicts


def _check_store_settings(store: RunStore, loaded: dict) -> None:
    """Refuse data that differs from the store's runs; warn about another thread count."""
    for task, (dataset, data) in loaded.items():
        name = f"data:{task}:{dataset}"
        fingerprint = data_fingerprint(data)
        stored = store.check_meta(name, fingerprint)
        if stored != fingerprint:
            raise StoreError(
                f"{store.path} contains runs trained on another copy of {dataset} (content "
                f"digest {stored}, now {fingerprint}, from {getattr(data, 'source', '?')}); "
                "pass another --out folder to keep both"
            )
    threads = str(torch.get_num_threads())
    stored = store.check_meta("torch_threads", threads)
    if stored != threads:
        logger.warning(
            "%s contains runs made with %s thread(s) and this call uses %s; float results can "
            "differ in the last digits between the two, use --threads %s to match",
            store.path, stored, threads, stored,
        )


def _run_claims(claims, loaded: dict, store: RunStore, options, out: Path,
                executor=None) -> list[Verdict]:
    verdicts = []
    for claim in claims:
        started = time.perf_counter()
        dataset, data = loaded[claim.task]
        ctx = StudyContext(dataset, data, options.scale, options.seeds, options.device)
        configs = claim.configs(ctx)
        records = run_sweep(configs, store, data, options.progress, desc=claim.id,
                            executor=executor)
        verdict = decide(claim, ctx, records, out)
        # training time of the claim's runs, whichever call trained them
        verdict.wall_time = sum(r.wall_time or 0.0 for r in records.values())
        logger.debug("%s took %.1f s in this call", claim.id, time.perf_counter() - started)
        verdicts.append(verdict)
        logger.info("%s: %s", claim.id, verdict.verdict)
    return verdicts


def decide(claim, ctx: StudyContext, records: dict, out: Path) -> Verdict:
    """Decide the verdict from the runs that ended, and draw the claim's plots."""
    ended = {k: r for k, r in records.items() if r.done}
    failed = [r for r in records.values() if not r.done]
    if not ended:
        first = failed[0].error.strip().splitlines()[-1] if failed and failed[0].error else ""
        raise RuntimeError(f"every run of claim {claim.id} failed; first error: {first}")
    verdict = claim.decide(ctx, ended)
    verdict.plots = [str(p) for p in claim.plot(ctx, ended, out)]
    if failed:
        verdict.verdict = "INCONCLUSIVE"
        verdict.summary += (f" {len(failed)} of {len(records)} runs failed (see the run store);"
                            " run the same command again to retry them.")
    return verdict
