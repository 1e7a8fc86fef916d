"""Show where the time of a BatchNorm call goes on the CPU, for the cases that do not reach
twice torch's speed.

Two measurements, each against a reference timed in the same run:

1. Large tensors. ``x.clone()`` allocates its output, and glibc serves allocations of this
   size with fresh pages from ``mmap``, so the first write to every page faults. Copying
   into a tensor allocated once (``out.copy_(x)``) shows the speed without the faults. A
   BatchNorm forward writes a new output too, so it cannot beat ``clone`` by much.
2. Small (N, C) inputs. The time of ``normlab.nn.BatchNorm1d`` in training mode is split
   into the C++ kernel alone (``torch.ops.normlab_bn.forward_train``) and the Python
   around it (module checks, backend choice, autograd bookkeeping), next to
   ``torch.nn.BatchNorm1d`` and torch's operator ``torch.batch_norm`` alone.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bn_profile.py
"""

from __future__ import annotations

import argparse

import torch
from torch.utils import benchmark

from normlab.nn import BatchNorm1d
from normlab.nn import _cpu_kernels


def median_ms(statement: str, **globals_) -> float:
    timer = benchmark.Timer(stmt=statement, globals=globals_)
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def large_tensor(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    out = torch.empty_like(x)
    gigabytes = 2 * x.numel() * x.element_size() / 1e9  # one read, one write
    clone = median_ms("x.clone()", x=x)
    copy = median_ms("out.copy_(x)", x=x, out=out)
    print(f"{'x'.join(map(str, shape))} float32 ({x.numel() * 4 / 2**20:.0f} MiB)")
    print(f"  x.clone()      {clone:8.3f} ms  {gigabytes / clone * 1e3:6.1f} GB/s")
    print(f"  out.copy_(x)   {copy:8.3f} ms  {gigabytes / copy * 1e3:6.1f} GB/s")
    print(f"  page faults of a fresh output cost {clone / copy:.1f}x the copy itself")


def small_input(shape: tuple[int, int]) -> None:
    ops = _cpu_kernels.load_extension()
    x = torch.randn(shape)
    ours = BatchNorm1d(shape[1])
    theirs = torch.nn.BatchNorm1d(shape[1])
    weight, bias = ours.weight.detach(), ours.bias.detach()
    mean, var = ours.running_mean.clone(), ours.running_var.clone()
    with torch.no_grad():
        rows = {
            "normlab BatchNorm1d (module)": median_ms("m(x)", m=ours, x=x),
            "  C++ kernel alone": median_ms(
                "ops.forward_train(x, w, b, rm, rv, 0.1, 1e-5)",
                ops=ops, x=x, w=weight, b=bias, rm=mean, rv=var,
            ),
            "torch.nn.BatchNorm1d (module)": median_ms("m(x)", m=theirs, x=x),
            "  torch.batch_norm alone": median_ms(
                "torch.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, False)",
                x=x, w=weight, b=bias, rm=mean, rv=var,
            ),
        }
    print(f"{shape[0]}x{shape[1]} float32, train forward without autograd, median ms")
    for name, ms in rows.items():
        print(f"  {name:32s} {ms * 1e3:8.1f} us")
    ours_python = rows["normlab BatchNorm1d (module)"] - rows["  C++ kernel alone"]
    torch_python = rows["torch.nn.BatchNorm1d (module)"] - rows["  torch.batch_norm alone"]
    print(f"  Python around the kernel: normlab {ours_python * 1e3:.1f} us, "
          f"torch {torch_python * 1e3:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    large_tensor((128, 64, 32, 32))
    print()
    small_input((64, 100))
    print()
    small_input((256, 1024))


if __name__ == "__main__":
    main()
