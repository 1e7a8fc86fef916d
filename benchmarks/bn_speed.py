"""Time torch.nn.BatchNorm* against normlab.nn.BatchNorm* on the CPU.

For each shape and memory format this prints the median time of a train-mode forward,
a train-mode forward plus backward and an eval-mode forward, for torch and for normlab.
The last column is the ratio torch / normlab, so a value below 1 means normlab is
slower. Both run in the same process with the same thread count.

Usage::

    python benchmarks/bn_speed.py            # all shapes
    python benchmarks/bn_speed.py --quick    # one 2d shape and the 1d shape
    python benchmarks/bn_speed.py --shapes 16x64x48x48 256x512
"""

import argparse

import torch
from torch.utils import benchmark

from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

DEFAULT_SHAPES = ["128x64x32x32", "64x64x40x40", "16x64x48x48", "256x512"]
QUICK_SHAPES = ["16x64x48x48", "256x512"]
MODULES = {
    2: (torch.nn.BatchNorm1d, BatchNorm1d),
    3: (torch.nn.BatchNorm1d, BatchNorm1d),
    4: (torch.nn.BatchNorm2d, BatchNorm2d),
    5: (torch.nn.BatchNorm3d, BatchNorm3d),
}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}, expected sizes joined by 'x' such as 16x64x48x48"
        ) from None
    if len(shape) not in MODULES:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}, expected 2 to 5 dimensions, got {len(shape)}"
        )
    return shape


def forward_backward(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(grad)


def time_statement(stmt: str, env: dict, min_run_time: float) -> float:
    timer = benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def benchmark_case(
    shape: tuple[int, ...], memory_format: torch.memory_format, min_run_time: float
) -> list[tuple[str, float, float]]:
    torch_cls, normlab_cls = MODULES[len(shape)]
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    x.requires_grad_()
    grad = torch.randn(shape).contiguous(memory_format=memory_format)
    rows = []
    for mode in ("train fwd", "train fwd+bwd", "eval fwd"):
        times = []
        for cls in (torch_cls, normlab_cls):
            module = cls(shape[1]).train(mode != "eval fwd")
            env = {"module": module, "x": x, "grad": grad, "step": forward_backward}
            if mode == "train fwd+bwd":
                stmt = "step(module, x, grad)"
            else:
                stmt = "with torch.no_grad(): module(x)"
                env["torch"] = torch
            times.append(time_statement(stmt, env, min_run_time))
        rows.append((mode, times[0], times[1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        help="input shapes such as 16x64x48x48 or 256x512 (default: "
        + " ".join(DEFAULT_SHAPES)
        + "). 4D and 5D shapes run contiguous and channels_last.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run only " + " ".join(QUICK_SHAPES) + " with a shorter timing window",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per measurement (default: 1.0, or 0.3 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = args.shapes
    else:
        shapes = [
            parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
        ]
    min_run_time = args.min_run_time or (0.3 if args.quick else 1.0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, times in ms")
    header = (
        f"{'shape':<18} {'format':<18} {'mode':<14} "
        f"{'torch':>9} {'normlab':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        formats = [torch.contiguous_format]
        if len(shape) in CHANNELS_LAST:
            formats.append(CHANNELS_LAST[len(shape)])
        for memory_format in formats:
            name = "x".join(str(size) for size in shape)
            format_name = str(memory_format).replace("torch.", "")
            for mode, torch_s, normlab_s in benchmark_case(
                shape, memory_format, min_run_time
            ):
                print(
                    f"{name:<18} {format_name:<18} {mode:<14} {torch_s * 1e3:>9.3f} "
                    f"{normlab_s * 1e3:>9.3f} {torch_s / normlab_s:>6.2f}"
                )


if __name__ == "__main__":
    main()
