"""``normlab verify``: run the claims' sweeps, decide the verdicts, write the report."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .claims import CLAIMS, StudyContext, Verdict, get_claim
from .claims.base import SCALES
from .report import write_report
from .store import RunStore
from .sweep import run_sweep

logger = logging.getLogger(__name__)

DB_NAME = "normlab.db"
DEFAULT_SEEDS = {"quick": 5, "full": 5}


@dataclass
class VerifyOptions:
    """The settings of one ``normlab verify`` call; see ``normlab verify --help``."""

    claims: Optional[Sequence[str]] = None
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = False
    out: str = "normlab-out"
    scale: str = "quick"
    seeds: Optional[int] = None
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.seeds is not None and (not isinstance(self.seeds, int) or self.seeds < 1):
            raise ValueError(f"--seeds must be a positive integer, got {self.seeds!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda requested but CUDA is not available; "
                                 "use --device cpu")


def check_output_dir(out: Path) -> None:
    """Create ``out`` and raise ``ValueError`` if it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create output folder {out}: {error.strerror}; "
                         "pass a writable --out folder") from error
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out} is not writable; pass a writable --out folder")


def verify(options: VerifyOptions) -> list[Verdict]:
    """Run every requested claim and write the report; return the verdicts."""
    options.validate()
    claims = [get_claim(c) for c in (options.claims or list(CLAIMS))]
    out = Path(options.out)
    check_output_dir(out)
    seeds = options.seeds or DEFAULT_SEEDS[options.scale]
    # load every task's data before the first run, so a data error costs no training
    loaded = {}
    for claim in claims:
        if claim.task not in loaded:
            loaded[claim.task] = claim.load_data(
                options.dataset, options.data_dir, options.download
            )

    verdicts = []
    with RunStore(out / DB_NAME) as store:
        for claim in claims:
            started = time.perf_counter()
            dataset, data = loaded[claim.task]
            ctx = StudyContext(dataset, data, options.scale, seeds, options.device)
            configs = claim.configs(ctx)
            records = run_sweep(configs, store, data, options.progress, desc=claim.id)
            verdict = decide(claim, ctx, records, out)
            # training time of the claim's runs, whichever call trained them
            verdict.wall_time = sum(r.wall_time or 0.0 for r in records.values())
            logger.debug("%s took %.1f s in this call", claim.id, time.perf_counter() - started)
            verdicts.append(verdict)
            logger.info("%s: %s", claim.id, verdict.verdict)
    meta = {"dataset": options.dataset, "scale": options.scale, "seeds": seeds}
    write_report(verdicts, out, meta)
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
