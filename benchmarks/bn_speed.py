"""Time torch.nn.BatchNorm* against each normlab.nn.BatchNorm* path on the CPU.

For each shape and memory format this prints the median time of a train-mode forward,
a train-mode forward plus backward and an eval-mode forward, for torch and for each
normlab path (see normlab.nn.batchnorm.set_batch_norm_backend). The variants are
timed in interleaved rounds, and each time is the median over rounds. ``torch/cpp``
is torch's time over the C++ path's, so a value above 1 means normlab is faster.
``cpp GB/s`` counts the bytes the step must move at least (forward: read x, write y;
forward+backward adds read dy, read x, write dx) and ``copy GB/s`` is ``x.clone()``
of the same tensor, timed in the same rounds.

Usage::

    python benchmarks/bn_speed.py                  # all shapes, 1 thread
    python benchmarks/bn_speed.py --threads 2
    python benchmarks/bn_speed.py --quick          # one 2d shape and one 1d shape
    python benchmarks/bn_speed.py --shapes 16x64x48x48 256x1024
"""

import argparse
import statistics

import torch
from torch.utils import benchmark

from normlab.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    set_batch_norm_backend,
)

DEFAULT_SHAPES = ["128x64x32x32", "64x64x40x40", "16x64x48x48", "256x1024", "64x100"]
QUICK_SHAPES = ["16x64x48x48", "256x1024"]
PATHS = ["reference", "cpp", "composite"]
MODULES = {
    2: (torch.nn.BatchNorm1d, BatchNorm1d),
    3: (torch.nn.BatchNorm1d, BatchNorm1d),
    4: (torch.nn.BatchNorm2d, BatchNorm2d),
    5: (torch.nn.BatchNorm3d, BatchNorm3d),
}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# Tensor-sized transfers that each mode needs at least.
TRANSFERS = {"train fwd": 2, "train fwd+bwd": 5, "eval fwd": 2}


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


def make_timer(mode: str, module, x, grad, backend: str | None) -> benchmark.Timer:
    env = {"module": module, "x": x, "grad": grad, "step": forward_backward}
    env["torch"] = torch
    if mode == "train fwd+bwd":
        stmt = "step(module, x, grad)"
    else:
        stmt = "with torch.no_grad(): module(x)"
    # Each measurement runs on its own, so selecting the backend in the setup keeps
    # the selection out of the timed statement.
    setup = "pass" if backend is None else f"set_backend({backend!r})"
    env["set_backend"] = set_batch_norm_backend
    return benchmark.Timer(
        stmt=stmt, setup=setup, globals=env, num_threads=torch.get_num_threads()
    )


def benchmark_case(
    shape: tuple[int, ...],
    memory_format: torch.memory_format,
    paths: list[str],
    rounds: int,
    min_run_time: float,
) -> list[tuple[str, dict[str, float]]]:
    """Return (mode, {variant: median seconds}) rows, variants timed interleaved."""
    torch_cls, normlab_cls = MODULES[len(shape)]
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(shape).contiguous(memory_format=memory_format)
    copy_timer = benchmark.Timer(
        stmt="x.detach().clone()", globals={"x": x}, num_threads=torch.get_num_threads()
    )
    rows = []
    for mode in TRANSFERS:
        training = mode != "eval fwd"
        timers = {"copy": copy_timer}
        timers["torch"] = make_timer(
            mode, torch_cls(shape[1]).train(training), x, grad, None
        )
        for path in paths:
            module = normlab_cls(shape[1]).train(training)
            timers[path] = make_timer(mode, module, x, grad, path)
        samples = {name: [] for name in timers}
        for _ in range(rounds):
            for name, timer in timers.items():
                measurement = timer.blocked_autorange(min_run_time=min_run_time)
                samples[name].append(measurement.median)
        rows.append((mode, {name: statistics.median(s) for name, s in samples.items()}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        help="input shapes such as 16x64x48x48 or 256x1024 (default: "
        + " ".join(DEFAULT_SHAPES)
        + "). 4D and 5D shapes run contiguous and channels_last.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="run only " + " ".join(QUICK_SHAPES) + " with fewer rounds",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATHS,
        default=PATHS,
        help="normlab paths to time (default: all of " + ", ".join(PATHS) + ")",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved timing rounds per measurement (default: 5, or 3 with --quick)",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.1,
        help="seconds of timing per variant and round (default: 0.1)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default: 1)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.shapes:
        shapes = args.shapes
    else:
        names = QUICK_SHAPES if args.quick else DEFAULT_SHAPES
        shapes = [parse_shape(name) for name in names]
    rounds = args.rounds or (3 if args.quick else 5)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, times in ms "
        f"(median of {rounds} interleaved rounds)"
    )
    columns = ["torch"] + args.paths
    header = f"{'shape':<14} {'format':<14} {'mode':<14} " + " ".join(
        f"{name:>10}" for name in columns
    )
    if "cpp" in args.paths:
        header += f" {'torch/cpp':>9} {'cpp GB/s':>9} {'copy GB/s':>9}"
    print(header)
    print("-" * len(header))
    for shape in shapes:
        formats = [torch.contiguous_format]
        if len(shape) in CHANNELS_LAST:
            formats.append(CHANNELS_LAST[len(shape)])
        nbytes = torch.Size(shape).numel() * 4
        for memory_format in formats:
            name = "x".join(str(size) for size in shape)
            format_name = (
                str(memory_format).replace("torch.", "").replace("_format", "")
            )
            for mode, times in benchmark_case(
                shape, memory_format, args.paths, rounds, args.min_run_time
            ):
                line = f"{name:<14} {format_name:<14} {mode:<14} " + " ".join(
                    f"{times[column] * 1e3:>10.3f}" for column in columns
                )
                if "cpp" in args.paths:
                    cpp_rate = TRANSFERS[mode] * nbytes / times["cpp"] / 1e9
                    copy_rate = 2 * nbytes / times["copy"] / 1e9
                    line += (
                        f" {times['torch'] / times['cpp']:>9.2f} {cpp_rate:>9.1f}"
                        f" {copy_rate:>9.1f}"
                    )
                print(line, flush=True)


if __name__ == "__main__":
    main()
