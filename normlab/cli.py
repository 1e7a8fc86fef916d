"""The ``normlab`` command line: ``normlab verify`` and ``normlab claims``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__

logger = logging.getLogger("normlab")

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _claim_list(text: str) -> list[str]:
    from .claims import get_claim

    if text == "all":
        return None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected comma-separated claim ids, got nothing")
    for claim_id in ids:
        try:
            get_claim(claim_id)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS

    parser = argparse.ArgumentParser(
        prog="normlab",
        description="Test common claims about Batch Normalization with seeded runs.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    verify = commands.add_parser(
        "verify",
        help="run the claims' experiments and write verdicts and a report",
        description="Run each claim's grid of training runs (skipping runs already in the "
        "run store of --out), decide its verdict and write verdicts.json, report.md, "
        "report.html and PNG plots into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scale = verify.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="short budgets: minutes on 2 CPU cores on digits (the default)")
    scale.add_argument("--full", dest="scale", action="store_const", const="full",
                       help="longer budgets and wider grids, for a GPU or a long CPU run")
    verify.set_defaults(scale="quick")
    verify.add_argument("--claims", type=_claim_list, default="all", metavar="ID,...",
                        help="comma-separated claim ids to run; see `normlab claims`")
    verify.add_argument("--dataset", choices=DATASETS, default="digits",
                        help="data set; digits is bundled with scikit-learn and needs no "
                        "download")
    verify.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder with the MNIST or CIFAR-10 files (standard files or "
                        "npz arrays)")
    verify.add_argument("--download", action="store_true",
                        help="download missing MNIST/CIFAR-10 files into --data-dir and "
                        "check their checksums")
    verify.add_argument("--out", default="normlab-out", metavar="DIR",
                        help="output folder for the run store, verdicts, report and plots")
    verify.add_argument("--seeds", type=_positive_int, default=5, metavar="N",
                        help="seeds per condition; intervals need at least 2")
    verify.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                        help="torch CPU threads per run; one thread is fastest for the "
                        "small quick models and keeps numbers reproducible")
    verify.add_argument("--device", default="cpu", metavar="{cpu,cuda}",
                        help="device to train on")
    verify.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                        help="number of runs trained at once: worker processes, or the "
                        "CPUs of a local Ray instance. 1 trains in this process, and more "
                        "than 1 selects --backend process unless --backend is given")
    verify.add_argument("--backend", choices=("in-process", "process", "ray"), default=None,
                        help="where runs train: this process, a local process pool, or "
                        "Ray (needs `pip install 'normlab[ray]'`). None selects in-process "
                        "for --workers 1 and process otherwise")
    verify.add_argument("--address", default=None, metavar="ADDR",
                        help="address of a running Ray cluster for --backend ray; without "
                        "it a local Ray instance with --workers CPUs is started")
    _add_output_flags(verify)

    _add_train_parser(commands)

    claims = commands.add_parser("claims", help="list the claim ids and what each states")
    _add_output_flags(claims)
    return parser


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _cmd_claims(args) -> int:
    from .claims import CLAIMS

    width = max(len(claim_id) for claim_id in CLAIMS)
    for claim_id, cls in CLAIMS.items():
        print(f"{claim_id.ljust(width)}  {cls.statement}")
    return 0


def _cmd_verify(args) -> int:
    from .data import DataError
    from .report import verdict_table
    from .store import StoreError
    from .verify import VerifyOptions, verify

    options = VerifyOptions(
        claims=args.claims,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        out=args.out,
        scale=args.scale,
        seeds=args.seeds,
        device=args.device,
        threads=args.threads,
        progress=args.progress,
        workers=args.workers,
        backend=args.backend,
        address=args.address,
    )
    try:
        verdicts = verify(options)
    except (DataError, StoreError, ValueError) as error:
        print(f"normlab: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as error:
        print(f"normlab: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"\nnormlab: interrupted. Finished runs are kept in {Path(args.out) / 'normlab.db'};"
            " run the same command again to resume.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print()
    print(verdict_table(verdicts))
    print(f"\nreport: {Path(args.out) / 'report.html'}")
    return 0


def _add_train_parser(commands) -> None:
    from .data import DATASETS

    train = commands.add_parser(
        "train",
        help="train one classification config, data-parallel over several processes",
        description="Train the MLP config of the classification claims with "
        "DistributedDataParallel over --nproc processes (gloo on CPU, NCCL on CUDA), "
        "with BatchNorm statistics over the global batch, and write the result as JSON. "
        "Under torchrun, each process joins torchrun's group instead.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scale = train.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="the quick budget of the claims")
    scale.add_argument("--full", dest="scale", action="store_const", const="full",
                       help="the full budget of the claims")
    train.set_defaults(scale="quick")
    train.add_argument("--dataset", choices=DATASETS, default="digits", help="data set")
    train.add_argument("--data-dir", default=None, metavar="DIR",
                       help="folder with the MNIST or CIFAR-10 files (standard files or "
                       "npz arrays)")
    train.add_argument("--norm", default="batchnorm",
                       help="normalization name; see normlab.nn.NORMS")
    train.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the initialization and the data order")
    train.add_argument("--init-scale", type=float, default=1.0,
                       help="factor on every linear layer's initial weight")
    train.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                       help="global batch size, split evenly over the processes")
    train.add_argument("--epochs", type=_positive_int, default=None, metavar="N",
                       help="epochs over the training split; unset takes the budget's")
    train.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                       help="number of processes; unset means 1, or WORLD_SIZE under "
                       "torchrun")
    train.add_argument("--device", default="cpu", metavar="{cpu,cuda}",
                       help="device; cuda puts process r on GPU r and uses NCCL")
    train.add_argument("--out", default="normlab-out/train.json", metavar="FILE",
                       help="JSON file for the config, final metrics and history")
    train.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                       help="torch CPU threads per process")
    _add_output_flags(train)


def _result_file_problem(out: Path) -> Optional[str]:
    """Return why the result file ``out`` cannot be written, or None when it can."""
    if out.is_dir():
        return "it is a folder"
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            if not os.access(parent, os.W_OK):
                return f"{parent} is not writable"
            return None
    return None


def _cmd_train(args) -> int:
    import json
    from dataclasses import asdict

    import torch
    from torch.multiprocessing.spawn import ProcessException

    from .claims.budget import base_config
    from .data import DataError
    from .train.distributed import torchrun_environment, train_data_parallel

    environment = torchrun_environment()
    rank, world_size = (0, args.nproc or 1) if environment is None else environment[:2]
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    changes = {"norm": args.norm, "lr": args.lr, "seed": args.seed,
               "init_scale": args.init_scale, "batch_size": args.batch_size}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    log_level = logging.getLogger().level if args.progress else logging.WARNING
    if not args.progress:
        # The per-evaluation lines of a process started by torchrun.
        logging.getLogger("normlab.train.distributed").setLevel(logging.WARNING)
    out = Path(args.out)
    problem = _result_file_problem(out)
    if problem is not None:
        print(f"normlab: error: cannot write the result to --out {out}: {problem}; pass "
              "the path of a JSON file in a writable folder", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = base_config(args.dataset, args.scale, args.device, **changes)
        result = train_data_parallel(
            config, args.nproc, args.data_dir, args.threads, log_level
        )
    except (DataError, ValueError) as error:
        print(f"normlab: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ProcessException, RuntimeError) as error:
        print(f"normlab: error: training failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nnormlab: interrupted; no result was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if rank != 0:
        return 0

    report = {"config": config.to_dict(), "nproc": world_size, "threads": args.threads,
              "torch": torch.__version__, **asdict(result)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    final = result.final
    processes = "1 process" if world_size == 1 else f"{world_size} processes"
    print(f"{result.status} after {result.steps} steps on {processes}: "
          f"val_acc {final['val_acc']:.4f}, test_acc {final['test_acc']:.4f}, "
          f"test_loss {final['test_loss']:.4f}")
    print(f"result: {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    handlers = {"verify": _cmd_verify, "claims": _cmd_claims, "train": _cmd_train}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
