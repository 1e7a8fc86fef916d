"""Check the Triton BatchNorm kernels against torch on a CUDA device and time them.

For each shape, memory format (contiguous and channels_last) and dtype (float32, float16,
bfloat16) this compares normlab.nn.triton_batchnorm with torch.nn.functional.batch_norm
on the same input: the training output, batch mean and variance, dx, dweight and dbias,
and the eval output. Both are measured against a float64 reference, and a row passes when
the Triton error is within the dtype's tolerance (relative to the largest reference
value) or within twice torch's own error. Weight and bias are float32, as under autocast.

It then times a training forward, a training forward plus backward and an eval forward of
torch.nn.BatchNorm2d and of the same layer built on the Triton functions, interleaved over
several rounds with torch.utils.benchmark. The Triton layer updates the running
statistics with torch ops, as a caller must. The ratio column is torch / Triton, so a
value above 1 means the Triton kernels are faster.

Usage::

    python benchmarks/triton_bn_check.py                   # all shapes, check and time
    python benchmarks/triton_bn_check.py --check-only
    python benchmarks/triton_bn_check.py --shapes 16x64x48x48 --dtypes float16

The exit status is 1 when a check fails and 2 when no CUDA device or no triton is found.
``--interpret`` runs the checks on CPU tensors in Triton's interpreter, which tests this
script without a GPU; it skips the timings, which would be meaningless there.
"""

import argparse
import os
import statistics
import sys

# TRITON_INTERPRET must be set before triton is imported.
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from normlab.nn import triton_batchnorm

DEFAULT_SHAPES = ["128x64x32x32", "64x64x40x40", "16x64x48x48"]
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Largest error allowed, relative to the largest reference value, per input dtype.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-5
MOMENTUM = 0.1


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}, expected 4 sizes joined by 'x' such as 16x64x48x48"
        ) from None
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}, expected 4 dimensions (N, C, H, W), got {len(shape)}"
        )
    return shape


class _TritonBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training):
        if not training:
            ctx.save_for_backward(input, weight, running_mean, running_var)
            ctx.training = False
            return triton_batchnorm.forward_eval(
                input, running_mean, running_var, weight, bias, EPS
            )
        output, mean, invstd, var = triton_batchnorm.forward_train(
            input, weight, bias, EPS
        )
        num_values = input.numel() // input.size(1)
        running_mean.lerp_(mean, MOMENTUM)
        running_var.lerp_(var * (num_values / (num_values - 1)), MOMENTUM)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = True
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, spread = ctx.saved_tensors
        invstd = spread if ctx.training else torch.rsqrt(spread + EPS)
        dx, dweight, dbias = triton_batchnorm.backward(
            grad_output, input, mean, invstd, weight, ctx.training
        )
        return dx, dweight, dbias, None, None, None


class TritonBatchNorm2d(torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d whose forward and backward run the Triton functions."""

    def forward(self, input):
        return _TritonBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.training,
        )


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected).abs().max().item()


def make_inputs(shape, memory_format, dtype, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    channels = shape[1]

    def randn(*size):
        return torch.randn(*size, generator=generator)

    return {
        "x": (randn(*shape) * 2 + 0.5)
        .to(device, dtype)
        .contiguous(memory_format=memory_format),
        "grad": randn(*shape).to(device, dtype).contiguous(memory_format=memory_format),
        "weight": (randn(channels) + 1).to(device),
        "bias": randn(channels).to(device),
        "running_mean": randn(channels).to(device),
        "running_var": (torch.rand(channels, generator=generator) + 0.5).to(device),
    }


def torch_outputs(inputs: dict, training: bool, to_double: bool) -> list[torch.Tensor]:
    """Return y, dx, dweight and dbias of F.batch_norm, in float64 when to_double."""
    convert = (lambda t: t.double()) if to_double else (lambda t: t)
    x, weight, bias = (
        convert(inputs[key]).detach().clone().requires_grad_()
        for key in ("x", "weight", "bias")
    )
    running_mean = convert(inputs["running_mean"]).clone()
    running_var = convert(inputs["running_var"]).clone()
    output = F.batch_norm(
        x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS
    )
    output.backward(convert(inputs["grad"]))
    return [output.detach(), x.grad, weight.grad, bias.grad]


def check_case(
    shape, memory_format, dtype, device
) -> list[tuple[str, float, float, bool]]:
    """Return (output, Triton error, torch error, passed) rows for one input."""
    inputs = make_inputs(shape, memory_format, dtype, device)
    x, grad, weight, bias = (inputs[key] for key in ("x", "grad", "weight", "bias"))
    running_mean, running_var = inputs["running_mean"], inputs["running_var"]
    # (name, Triton value, torch value, float64 reference)
    compared = []
    for training in (True, False):
        if training:
            output, mean, invstd, var = triton_batchnorm.forward_train(
                x, weight, bias, EPS
            )
            var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
            torch_var, torch_mean = torch.var_mean(
                x.float(), dim=(0, 2, 3), correction=0
            )
            compared += [
                ("mean", mean, torch_mean, mean_ref),
                ("var", var, torch_var, var_ref),
            ]
        else:
            output = triton_batchnorm.forward_eval(
                x, running_mean, running_var, weight, bias, EPS
            )
            mean, invstd = running_mean, torch.rsqrt(running_var + EPS)
        grads = triton_batchnorm.backward(grad, x, mean, invstd, weight, training)
        expected = torch_outputs(inputs, training, to_double=True)
        theirs = torch_outputs(inputs, training, to_double=False)
        suffix = "" if training else " (eval)"
        for index, name in enumerate(("y", "dx", "dweight", "dbias")):
            ours = (output, *grads)[index]
            compared.append((name + suffix, ours, theirs[index], expected[index]))

    rows = []
    for name, ours, theirs, reference in compared:
        ours_error = max_error(ours, reference)
        torch_error = max_error(theirs, reference)
        bound = max(TOLERANCES[dtype] * reference.abs().max().item(), 2 * torch_error)
        rows.append((name, ours_error, torch_error, ours_error <= bound))
    return rows


def time_case(
    shape, memory_format, dtype, rounds, min_run_time
) -> list[tuple[str, float, float]]:
    """Return (mode, torch seconds, Triton seconds) medians over interleaved rounds."""
    x = torch.randn(shape, device="cuda", dtype=dtype).contiguous(
        memory_format=memory_format
    )
    x.requires_grad_()
    grad = torch.randn_like(x)
    rows = []
    for mode in ("train fwd", "train fwd+bwd", "eval fwd"):
        timers = {}
        for name, cls in (
            ("torch", torch.nn.BatchNorm2d),
            ("triton", TritonBatchNorm2d),
        ):
            module = cls(shape[1]).cuda().train(mode != "eval fwd")
            env = {"module": module, "x": x, "grad": grad, "torch": torch}
            if mode == "train fwd+bwd":
                stmt = "x.grad = None; module.zero_grad(); module(x).backward(grad)"
            else:
                stmt = "with torch.no_grad(): module(x)"
            timers[name] = benchmark.Timer(stmt=stmt, globals=env)
            # one untimed call compiles the Triton kernels
            timers[name].timeit(1)
        samples = {name: [] for name in timers}
        for _ in range(rounds):
            for name, timer in timers.items():
                measurement = timer.blocked_autorange(min_run_time=min_run_time)
                samples[name].append(measurement.median)
        torch_time = statistics.median(samples["torch"])
        triton_time = statistics.median(samples["triton"])
        rows.append((mode, torch_time, triton_time))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", type=parse_shape,
        help="NCHW shapes (default: " + " ".join(DEFAULT_SHAPES) + ")",
    )  # fmt: skip
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
        help="input dtypes (default: all)",
    )  # fmt: skip
    parser.add_argument("--check-only", action="store_true", help="skip the timings")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)"
    )
    parser.add_argument(
        "--min-run-time", type=float, default=0.2,
        help="seconds of timing per variant and round (default: 0.2)",
    )  # fmt: skip
    parser.add_argument(
        "--interpret", action="store_true",
        help="run the checks on CPU tensors in Triton's interpreter, without timings",
    )  # fmt: skip
    args = parser.parse_args()

    if triton_batchnorm.triton is None:
        print(
            "triton is not installed: run `pip install triton` first", file=sys.stderr
        )
        return 2
    if not args.interpret and not torch.cuda.is_available():
        print(
            "no CUDA device found: this script checks and times the Triton kernels on a GPU"
            " (use --interpret to run the checks on the CPU)",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.interpret else "cuda"
    default_shapes = ["4x8x6x5"] if args.interpret else DEFAULT_SHAPES
    shapes = args.shapes or [parse_shape(name) for name in default_shapes]
    formats = {
        "contiguous": torch.contiguous_format,
        "channels_last": torch.channels_last,
    }
    dtypes = [DTYPES[name] for name in args.dtypes]
    name_of = {dtype: name for name, dtype in DTYPES.items()}
    if device == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")

    failures = 0
    print(f"{'shape':<14} {'format':<14} {'dtype':<9} {'output':<16} "
          f"{'triton err':>10} {'torch err':>10}  result")  # fmt: skip
    for shape in shapes:
        shape_name = "x".join(map(str, shape))
        for format_name, memory_format in formats.items():
            for dtype in dtypes:
                for name, ours, theirs, passed in check_case(
                    shape, memory_format, dtype, device
                ):
                    failures += not passed
                    print(
                        f"{shape_name:<14} {format_name:<14} {name_of[dtype]:<9} {name:<16} "
                        f"{ours:>10.3g} {theirs:>10.3g}  {'ok' if passed else 'FAIL'}",
                        flush=True,
                    )
    print(f"{failures} check(s) failed")
    if args.check_only or args.interpret:
        return 1 if failures else 0

    print(
        f"\ntimes in ms, median of {args.rounds} interleaved rounds; ratio = torch / triton"
    )
    print(f"{'shape':<14} {'format':<14} {'dtype':<9} {'mode':<14} "
          f"{'torch':>8} {'triton':>8} {'ratio':>6}")  # fmt: skip
    for shape in shapes:
        shape_name = "x".join(map(str, shape))
        for format_name, memory_format in formats.items():
            for dtype in dtypes:
                rows = time_case(
                    shape, memory_format, dtype, args.rounds, args.min_run_time
                )
                for mode, torch_time, triton_time in rows:
                    print(
                        f"{shape_name:<14} {format_name:<14} {name_of[dtype]:<9} {mode:<14} "
                        f"{torch_time * 1e3:>8.3f} {triton_time * 1e3:>8.3f} "
                        f"{torch_time / triton_time:>6.2f}",
                        flush=True,
                    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
