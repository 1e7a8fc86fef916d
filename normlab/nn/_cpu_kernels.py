"""Build, load and call the C++ Batch Normalization kernels in ``csrc/batchnorm_cpu.cpp``.

The extension is built on first use with :func:`torch.utils.cpp_extension.load` into
torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), so the build is paid once per machine and source
version. Processes hold an ``flock`` on the build folder while they build or load, so
processes that start at once (pytest-xdist workers) build it once and the others wait,
and a process killed meanwhile blocks no other.
When the build fails, one warning is logged and :func:`load_extension` returns
``None`` for the rest of the process, so callers fall back to the reference path.
"""

import fcntl
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import torch
from torch import Tensor

from ._autograd import first_order_only

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "csrc" / "batchnorm_cpu.cpp"
# -mavx2 -mfma target the AVX2 machines this project runs on, without tying the
# binary to the build machine as -march=native would. _cpu_supports_avx2 guards
# the load. -ffp-contract=off keeps the roundings the source states.
_CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)
_SUPPORTED_DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_extension_state: dict[str, object] = {}


def _extension_name() -> str:
    # The digest keeps builds of different sources or flags in separate folders.
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join(_CFLAGS + _LDFLAGS + (torch.__version__,)).encode())
    return f"normlab_batchnorm_cpu_{digest.hexdigest()[:12]}"


def _cpu_supports_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def load_extension() -> object | None:
    """Build (once per machine) and load the kernels; return ``torch.ops.normlab_bn``.

    Returns ``None`` when the CPU lacks AVX2 or the build fails, after logging one
    warning with the reason.
    """
    with _lock:
        if "ops" in _extension_state:
            return _extension_state["ops"]
        ops = None
        if not _cpu_supports_avx2():
            logger.warning(
                "normlab's C++ batch_norm kernels need AVX2, but torch reports CPU "
                "capability %s; using the reference path",
                torch.backends.cpu.get_cpu_capability(),
            )
        else:
            ops = _build()
        _extension_state["ops"] = ops
        return ops


def _put_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH. The ninja package installs it next to the
    # venv's python, which is not on PATH when the venv is not activated.
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_directory(name: str) -> Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / name


def _build() -> object | None:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    name = _extension_name()
    try:
        build_directory = _build_directory(name)
        build_directory.mkdir(parents=True, exist_ok=True)
        library = build_directory / f"{name}.so"
        # flock is released by the kernel when its holder dies, unlike the lock file of
        # torch's builder, which a process killed while loading leaves behind and on which
        # every later process then waits forever.
        with open(build_directory / "normlab.flock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if library.is_file():
                try:
                    torch.ops.load_library(str(library))
                    return torch.ops.normlab_bn
                except (OSError, RuntimeError) as error:
                    logger.info("rebuilding normlab's C++ batch_norm kernels: %s", error)
            # Every normlab process takes the flock before torch's builder runs, so a
            # lock file of torch's found here was left by a killed process.
            (build_directory / "lock").unlink(missing_ok=True)
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                # copies, because torch's builder appends to the lists it is given
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(build_directory),
                is_python_module=False,
                verbose=False,
            )
    except (OSError, RuntimeError, ImportError, ValueError) as error:
        logger.warning(
            "building normlab's C++ batch_norm kernels failed, so the reference path "
            "runs instead (install ninja and a C++ compiler, then restart): %s",
            error,
        )
        return None
    return torch.ops.normlab_bn


def supports(input: Tensor) -> bool:
    """Return True if the kernels accept ``input``: a non-empty CPU float32/float64 tensor."""
    return (
        input.device.type == "cpu"
        and input.dtype in _SUPPORTED_DTYPES
        and input.numel() > 0
    )


class CppBatchNormFunction(torch.autograd.Function):
    """Batch Normalization through the C++ kernels, one call per direction.

    Training saves the input, the mean split into ``mean_hi`` (the mean rounded to the
    input dtype) and ``mean_lo`` (its rounding error), and ``invstd``. Eval saves the
    input and the running statistics. The backward is once-differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        ops,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        memory_format: torch.memory_format,
    ) -> Tensor:
        input = input.contiguous(memory_format=memory_format)
        if training:
            output, mean_hi, mean_lo, invstd = ops.forward_train(
                input, weight, bias, running_mean, running_var, momentum, eps
            )
        else:
            output = ops.forward_eval(
                input, weight, bias, running_mean, running_var, eps
            )
            if not any(ctx.needs_input_grad):
                # Inference: skip the per-channel tensors only backward reads.
                return output
            mean_hi = running_mean.clone()
            mean_lo = torch.zeros_like(mean_hi)
            invstd = torch.rsqrt(running_var + eps)
        ctx.save_for_backward(input, weight, mean_hi, mean_lo, invstd)
        ctx.ops = ops
        ctx.training = training
        return output

    @staticmethod
    @first_order_only
    def backward(ctx, grad_output: Tensor):
        input, weight, mean_hi, mean_lo, invstd = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[1:4]
        grad_input, grad_weight, grad_bias = ctx.ops.backward(
            grad_output,
            input,
            weight,
            mean_hi,
            mean_lo,
            invstd,
            ctx.training,
            needs_input,
            needs_weight,
            needs_bias,
        )
        return (None, grad_input, grad_weight, grad_bias) + (None,) * 6
