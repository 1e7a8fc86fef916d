r"""Batch Normalization written from its definition, with an analytic backward.

Batch Normalization (Ioffe and Szegedy, 2015, https://arxiv.org/abs/1502.03167)
normalizes each channel with statistics taken over the batch and spatial dimensions:

.. math::

    y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

The modules here are drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``. They take
the same constructor arguments, hold the same parameters and buffers, write the same
state_dict keys and match torch's outputs, gradients and running statistics to within
rounding. Forward and backward run through :class:`_BatchNormFunction`, which never
calls a ``batch_norm`` operator of torch, so the lab can inspect and change every step.
"""

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch import distributed as dist
from torch.autograd import forward_ad

from . import _cpu_kernels
from ._autograd import first_order_only

__all__ = [
    "BACKENDS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "batch_norm",
    "batch_norm_backend",
    "get_batch_norm_backend",
    "set_batch_norm_backend",
]


# Half-precision inputs are normalized in float32, as torch's CPU kernels do.
_REDUCED_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED_PRECISION_DTYPES else dtype


def _suggest_memory_format(input: Tensor) -> torch.memory_format:
    # Mirrors Tensor.suggest_memory_format() in ATen, which Python does not expose.
    # A tensor that is contiguous in both layouts (for example C == 1) counts as
    # contiguous_format.
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _reduction_dims(input: Tensor) -> tuple[int, ...]:
    # Every dimension except the channel dimension 1: (0,) for (N, C), (0, 2, 3) for
    # (N, C, H, W).
    return (0,) + tuple(range(2, input.dim()))


def _values_per_channel(input: Tensor) -> int:
    # N * L, N * H * W or N * D * H * W.
    return input.size(0) * math.prod(input.shape[2:])


def _params_in_input_dtype(input: Tensor, *params: Tensor | None) -> bool:
    # True for a float16 or bfloat16 input whose parameters and buffers share its
    # dtype. With no parameter or buffer, torch treats the input dtype as theirs.
    # _check_input has ensured that all given parameters share one dtype.
    if input.dtype not in _REDUCED_PRECISION_DTYPES:
        return False
    provided = [p for p in params if p is not None]
    return not provided or provided[0].dtype == input.dtype


def _per_channel_view(input: Tensor) -> tuple[int, ...]:
    # Shape that broadcasts a (C,) vector against the input, e.g. (1, C, 1, 1).
    return (1, input.size(1)) + (1,) * (input.dim() - 2)


def _check_input(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    if input.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            "batch_norm expected a floating-point input (float16, bfloat16, float32 "
            f"or float64), got dtype {input.dtype}. Convert it with .float() first."
        )
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expected input with at least 2 dimensions (N, C, ...), got "
            f"{input.dim()}D input of size {input.size()}"
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None"
        )
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var must be given when training=False, because "
            "evaluation normalizes with the running statistics"
        )
    if training and eps <= 0.0:
        raise ValueError(f"eps must be positive during training, got {eps}")
    if eps < 0.0:
        raise ValueError(f"eps must be non-negative, got {eps}")

    num_channels = input.size(1)
    named_tensors = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
    }
    provided = {name: t for name, t in named_tensors.items() if t is not None}
    for name, tensor in provided.items():
        if tensor.numel() != num_channels:
            raise ValueError(
                f"{name} should contain {num_channels} elements (the input's channel "
                f"count), got {tensor.numel()}"
            )

    # torch 2.13 (CPU) accepts parameters and buffers in the input dtype, or all in
    # float32 when the input is float16 or bfloat16, and raises for any other mix.
    allowed = {input.dtype}
    if input.dtype in _REDUCED_PRECISION_DTYPES:
        allowed.add(torch.float32)
    param_dtypes = {t.dtype for t in provided.values()}
    if len(param_dtypes) > 1 or not param_dtypes <= allowed:
        received = ", ".join(f"{name}={t.dtype}" for name, t in provided.items())
        expected = " or ".join(sorted(str(d) for d in allowed))
        raise TypeError(
            f"batch_norm expected weight, bias and running statistics to share one "
            f"dtype, {expected}, for input of dtype {input.dtype}, got {received}. "
            "Convert the module or the input with .to(dtype)."
        )

    if training and _values_per_channel(input) == 1:
        raise ValueError(
            "expected more than 1 value per channel when training, got input size "
            f"{input.size()}"
        )


def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    num_values: int,
    momentum: float,
) -> None:
    # running <- (1 - momentum) * running + momentum * batch, with the unbiased batch
    # variance (Bessel's correction n / (n - 1)). The sum runs in the compute dtype and
    # is cast once, so float16 buffers are not rounded twice.
    unbiased_var = batch_var * (num_values / (num_values - 1))
    keep = 1 - momentum
    new_mean = batch_mean * momentum + running_mean.to(batch_mean.dtype) * keep
    new_var = unbiased_var * momentum + running_var.to(batch_var.dtype) * keep
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


def _batch_statistics(
    input: Tensor, compute_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compute the per-channel batch statistics by the corrected two-pass algorithm.

    A first pass takes a rough mean ``m1``. The second builds ``centered = x - m1``
    and reduces it to ``residual = mean(centered)`` and ``mean(centered^2)``. Then
    ``mean = m1 + residual`` and the biased ``var = mean(centered^2) - residual^2``,
    and ``centered - residual`` is ``x - mean`` without the rounding of ``mean``
    itself. This stays accurate for values far from zero, for example 1e4 with unit
    spread in float32, where the one-pass formula E[x^2] - E[x]^2 loses every digit to
    cancellation.

    NOTE: ``torch.var_mean`` (Welford) would also be stable. With torch 2.13 on a
    shared 2-core CPU it was 1.2x to 10x slower than these passes for a 16x64x48x48
    float32 input, in NCHW and channels_last. The spread comes from machine load.

    Returns:
        ``(mean, centered, residual, var)``: ``mean``, ``residual`` and ``var`` have
        shape ``(C,)``, and ``centered`` has the input's shape and memory format.
    """
    dims = _reduction_dims(input)
    if _values_per_channel(input) == 0:
        # An empty batch: torch returns an empty output and keeps the running stats.
        zeros = torch.zeros(input.size(1), dtype=compute_dtype, device=input.device)
        return zeros, input.to(compute_dtype), zeros, zeros.clone()
    rough_mean = input.mean(dim=dims, dtype=compute_dtype)
    # float16 and bfloat16 inputs promote to a float32 centered tensor here. Training
    # saves it for backward, which takes twice the memory of the input.
    centered = input - rough_mean.view(_per_channel_view(input))
    residual = centered.mean(dim=dims)
    var = centered.square().mean(dim=dims) - residual.square()
    # Out of place, so the composite path can differentiate through it.
    return rough_mean + residual, centered, residual, var.clamp_min(0)


class _BatchNormFunction(torch.autograd.Function):
    """Batch Normalization with an analytic backward.

    The forward applies a per-channel ``scale = weight * invstd`` and shift in one
    fused multiply-add (``torch.addcmul``). Training saves the centered input (see
    :func:`_batch_statistics`) and ``invstd``, from which ``xhat = (x - mean) *
    invstd``. Eval saves the input and the running statistics. The backward computes
    dx, dweight and dbias from them in closed form.

    The backward is once-differentiable, so a second backward through this class
    raises. :func:`batch_norm` routes ``torch.func`` transforms and forward-mode AD to
    :func:`_batch_norm_composite` instead, and ``set_batch_norm_backend("composite")``
    selects that path for a second backward.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        compute_dtype = _compute_dtype(input.dtype)
        memory_format = _suggest_memory_format(input)
        input = input.contiguous(memory_format=memory_format)
        view = _per_channel_view(input)

        if training:
            # torch 2.13 (CPU) stores the batch mean and inverse std of a float16 or
            # bfloat16 input in that dtype when the parameters share it, and normalizes
            # with the rounded values. Rounding here too makes most outputs bit-equal
            # to torch's.
            round_to = None
            if _params_in_input_dtype(input, weight, bias, running_mean):
                round_to = input.dtype
            mean, centered, offset, var = _batch_statistics(input, compute_dtype)
            num_values = _values_per_channel(input)
            if running_mean is not None and num_values > 0:
                _update_running_stats(
                    running_mean, running_var, mean, var, num_values, momentum
                )
            invstd = torch.rsqrt(var + eps)
            if round_to is not None:
                rounded_mean = mean.to(round_to).to(compute_dtype)
                offset = offset + (rounded_mean - mean)
                invstd = invstd.to(round_to).to(compute_dtype)
            # centered - offset is x - mean, so the shift folds offset into the bias.
            scale = invstd if weight is None else invstd * weight.to(compute_dtype)
            shift = -offset * scale
            if bias is not None:
                shift = shift + bias.to(compute_dtype)
            output = torch.addcmul(shift.view(view), centered, scale.view(view))
            ctx.save_for_backward(centered, weight, offset, invstd)
        else:
            # A copy, so a later training step that updates running_mean in place
            # does not change what backward reads.
            mean = running_mean.to(compute_dtype, copy=True)
            invstd = torch.rsqrt(running_var.to(compute_dtype) + eps)
            scale = invstd if weight is None else invstd * weight.to(compute_dtype)
            shift = -mean * scale
            if bias is not None:
                shift = shift + bias.to(compute_dtype)
            # NOTE: shift = bias - mean * scale is rounded, so when |running_mean| >>
            # sqrt(running_var) the output loses about log10(|mean| / std) digits.
            # torch 2.13's CPU kernel gave bit-equal outputs for inputs near 1e4.
            # x.mul(scale).add_(shift) rounds twice and doubled that error, although
            # benchmarks/bn_speed.py timed it up to 2x faster than addcmul for NCHW.
            output = torch.addcmul(shift.view(view), input, scale.view(view))
            ctx.save_for_backward(input, weight, mean, invstd)

        ctx.training = training
        ctx.memory_format = memory_format
        ctx.input_dtype = input.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output.to(input.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_output: Tensor):
        # In training, saved is the roughly centered input and x - mean = saved -
        # offset. In eval, saved is the input and offset is the running mean.
        saved, weight, offset, invstd = ctx.saved_tensors
        needs_input_grad, needs_weight_grad, needs_bias_grad = ctx.needs_input_grad[:3]
        compute_dtype = offset.dtype
        dims = _reduction_dims(saved)
        view = _per_channel_view(saved)
        # max() keeps an empty batch from dividing by zero. Its gradients are empty.
        num_values = max(_values_per_channel(saved), 1)

        grad = grad_output.contiguous(memory_format=ctx.memory_format)
        grad = grad.to(compute_dtype)
        grad_input = grad_weight = grad_bias = None

        # With xhat = (x - mean) * invstd, dbias = sum(g) and dweight = sum(g * xhat).
        grad_sum = grad.sum(dim=dims)
        if needs_weight_grad or (needs_input_grad and ctx.training):
            if ctx.training:
                centered = saved
                # sum(g * (x - mean)) = sum(g * saved) - offset * sum(g). The offset
                # is only the rounding error of the mean, so this loses little.
                grad_dot_centered = (grad * centered).sum(dim=dims)
                grad_dot_centered = grad_dot_centered - offset * grad_sum
            else:
                centered = saved.to(compute_dtype) - offset.view(view)
                grad_dot_centered = (grad * centered).sum(dim=dims)
        if needs_weight_grad:
            grad_weight = (grad_dot_centered * invstd).to(weight.dtype)
        if needs_bias_grad:
            grad_bias = grad_sum.to(ctx.bias_dtype)

        if needs_input_grad:
            input_scale = invstd
            if weight is not None:
                input_scale = invstd * weight.to(compute_dtype)
            if ctx.training:
                # The batch statistics depend on x, so with M values per channel
                #   dx = weight * invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M)
                # which is a * g + b * (x - mean) - a * sum(g) / M per channel, with
                # a = weight * invstd and b = -a * invstd^2 * sum(g * (x - mean)) / M.
                centered_coef = -input_scale * invstd.square() * grad_dot_centered
                centered_coef = centered_coef / num_values
                constant = -input_scale * grad_sum / num_values - centered_coef * offset
                grad_input = grad.mul(input_scale.view(view))
                grad_input.addcmul_(centered, centered_coef.view(view))
                grad_input.add_(constant.view(view))
            else:
                # Running statistics are constants, so the layer is affine in x.
                grad_input = grad * input_scale.view(view)
            grad_input = grad_input.to(ctx.input_dtype)

        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _batch_norm_composite(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """Batch Normalization from differentiable torch operations, with no custom backward.

    The math and rounding are those of :class:`_BatchNormFunction`, and autograd
    derives every gradient, so double backward, forward-mode AD and the
    ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``) work. The running
    statistics are updated in place from detached batch statistics, so under
    ``vmap`` with batched buffers each run updates its own slice.
    """
    compute_dtype = _compute_dtype(input.dtype)
    view = _per_channel_view(input)
    if training:
        mean, centered, offset, var = _batch_statistics(input, compute_dtype)
        num_values = _values_per_channel(input)
        if running_mean is not None and num_values > 0:
            _update_running_stats(
                running_mean,
                running_var,
                mean.detach(),
                var.detach(),
                num_values,
                momentum,
            )
        invstd = torch.rsqrt(var + eps)
        if _params_in_input_dtype(input, weight, bias, running_mean):
            # Round as _BatchNormFunction does. The casts pass gradients unchanged.
            rounded_mean = mean.to(input.dtype).to(compute_dtype)
            offset = offset + (rounded_mean - mean)
            invstd = invstd.to(input.dtype).to(compute_dtype)
    else:
        # A copy, so a later in-place update of running_mean does not invalidate
        # what autograd saved.
        centered = input
        offset = running_mean.to(compute_dtype, copy=True)
        invstd = torch.rsqrt(running_var.to(compute_dtype) + eps)
    scale = invstd if weight is None else invstd * weight.to(compute_dtype)
    shift = -offset * scale
    if bias is not None:
        shift = shift + bias.to(compute_dtype)
    output = torch.addcmul(shift.view(view), centered, scale.view(view))
    return output.to(input.dtype)


BACKENDS = ("auto", "reference", "cpp", "composite")
_BACKEND_ENVIRONMENT_VARIABLE = "NORMLAB_BN_BACKEND"


def _validate_backend(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"invalid batch_norm backend {backend!r} from {source}, expected one of "
            + ", ".join(BACKENDS)
        )
    return backend


_backend = _validate_backend(
    os.environ.get(_BACKEND_ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto",
    f"the environment variable {_BACKEND_ENVIRONMENT_VARIABLE}",
)


def get_batch_norm_backend() -> str:
    """Return the backend that :func:`batch_norm` uses: one of :data:`BACKENDS`."""
    return _backend


def set_batch_norm_backend(backend: str) -> None:
    """Select the implementation behind :func:`batch_norm` and the BatchNorm modules.

    Args:
        backend (str): one of

            - ``"auto"`` (the default): the C++ kernels for CPU float32 and float64
              input when they build, the Triton kernels of
              ``normlab.nn.triton_batchnorm`` for CUDA input when Triton is installed,
              the reference path otherwise.
            - ``"reference"``: :class:`_BatchNormFunction`, the pure-PyTorch path with
              an analytic, once-differentiable backward.
            - ``"cpp"``: the C++ kernels for CPU float32 and float64 input, and the
              reference path for other input. Raises ``RuntimeError`` if the kernels
              fail to build.
            - ``"composite"``: differentiable torch operations with autograd deriving
              the backward. Select it for a second backward (a gradient penalty,
              ``gradgradcheck``).

    Inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``) or a forward-mode
    AD level, every backend but ``"composite"`` would fail, so :func:`batch_norm` takes
    the composite path there whatever the selection. The environment variable
    ``NORMLAB_BN_BACKEND`` sets the initial selection.
    """
    global _backend
    _backend = _validate_backend(backend, "set_batch_norm_backend")


@contextlib.contextmanager
def batch_norm_backend(backend: str) -> Iterator[None]:
    """Select a backend (see :func:`set_batch_norm_backend`) inside a ``with`` block.

    The previous selection returns on exit. The selection is global to the process,
    not local to a thread.
    """
    previous = get_batch_norm_backend()
    set_batch_norm_backend(backend)
    try:
        yield
    finally:
        set_batch_norm_backend(previous)


def _needs_composite() -> bool:
    # forward_ad._current_level is -1 outside any dual_level context (torch 2.13).
    return (
        torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Apply Batch Normalization to each channel of ``input``.

    Follows the semantics of :func:`torch.nn.functional.batch_norm` without calling any
    ``batch_norm`` operator of torch.

    Args:
        input (Tensor): input of shape :math:`(N, C, *)` in float16, bfloat16, float32
            or float64.
        running_mean (Tensor or None): running mean of shape :math:`(C,)`. Updated in
            place when ``training`` is ``True``.
        running_var (Tensor or None): running variance of shape :math:`(C,)`. Updated in
            place when ``training`` is ``True``.
        weight (Tensor, optional): per-channel scale :math:`\gamma`. Default: ``None``
            (a scale of 1).
        bias (Tensor, optional): per-channel shift :math:`\beta`. Default: ``None``
            (a shift of 0).
        training (bool): normalize with the batch statistics and update the running
            statistics if given. If ``False``, normalize with ``running_mean`` and
            ``running_var``, which must then be given. Default: ``False``
        momentum (float): weight of the batch statistics in the running update
            ``running = (1 - momentum) * running + momentum * batch``. Default: 0.1
        eps (float): value added to the variance before the square root. It must be
            positive when training and non-negative otherwise. Default: 1e-5

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: same shape, dtype and memory format (contiguous, ``channels_last``
          or ``channels_last_3d``) as the input.

    Raises:
        TypeError: if ``input`` is not floating point, or the dtypes of the parameters
            and buffers do not fit the input dtype.
        ValueError: if a shape or ``eps`` is invalid, or ``training`` is ``True`` and
            a channel has a single value.

    .. note::
        Normalization uses the biased batch variance (divide by :math:`M`, the number of
        values per channel). The running variance is updated with the unbiased variance
        (divide by :math:`M - 1`).

    .. note::
        float16 and bfloat16 inputs are normalized with statistics accumulated in
        float32, and the output is cast back to the input dtype. Their parameters and
        buffers may be float32 (as in a float32 module fed half input) or share the
        input dtype.
    """
    _check_input(input, running_mean, running_var, weight, bias, training, eps)
    arguments = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    if _backend == "composite" or _needs_composite():
        return _batch_norm_composite(*arguments)
    if _backend == "auto" and input.is_cuda and _triton_available(input):
        return _TritonBatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, training, momentum, eps
        )
    ops = _cpp_kernels_for(input)
    if ops is not None:
        memory_format = _suggest_memory_format(input)
        return _cpu_kernels.CppBatchNormFunction.apply(
            ops, input, weight, bias, running_mean, running_var, training, momentum,
            eps, memory_format,
        )
    return _BatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )


def _triton_available(input: Tensor) -> bool:
    # The import is deferred so CPU-only use never loads Triton. The module imports
    # without Triton installed and then reports every tensor as unsupported.
    from . import triton_batchnorm

    return triton_batchnorm.is_available(input)


class _TritonBatchNormFunction(torch.autograd.Function):
    """Batch Normalization of CUDA tensors through ``normlab.nn.triton_batchnorm``.

    NOTE: written against that module's documented contract and not run here, because
    this machine has no CUDA device. The half-precision rounding of
    :class:`_BatchNormFunction` is not reproduced, so float16 outputs may differ from
    torch's in the last bit.
    """

    @staticmethod
    def forward(
        ctx, input, weight, bias, running_mean, running_var, training, momentum, eps
    ):
        from . import triton_batchnorm

        if training:
            output, mean, invstd, var = triton_batchnorm.forward_train(
                input, weight, bias, eps
            )
            num_values = _values_per_channel(input)
            if running_mean is not None and num_values > 0:
                _update_running_stats(
                    running_mean, running_var, mean, var, num_values, momentum
                )
        else:
            output = triton_batchnorm.forward_eval(
                input, running_mean, running_var, weight, bias, eps
            )
            mean = running_mean.to(torch.float32, copy=True)
            invstd = torch.rsqrt(running_var.to(torch.float32) + eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training = training
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    @first_order_only
    def backward(ctx, grad_output):
        from . import triton_batchnorm

        input, weight, mean, invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = triton_batchnorm.backward(
            grad_output, input, mean, invstd, weight, ctx.training
        )
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = grad_input if needs_input else None
        grad_weight = grad_weight if needs_weight else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if needs_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _cpp_kernels_for(input: Tensor):
    # The C++ kernels under the "auto" and "cpp" backends, or None for the reference.
    if _backend not in ("auto", "cpp") or not _cpu_kernels.supports(input):
        return None
    ops = _cpu_kernels.load_extension()
    if ops is None and _backend == "cpp":
        raise RuntimeError(
            "the batch_norm backend is 'cpp', but normlab's C++ kernels failed to "
            "load (see the logged warning). Select 'auto' or 'reference' with "
            "set_batch_norm_backend."
        )
    return ops


class _BatchNorm(nn.Module):
    """Common base of the BatchNorm1d, BatchNorm2d and BatchNorm3d modules.

    Subclasses implement ``_check_input_dim``.
    """

    # Version 2 added the num_batches_tracked buffer, as in torch.nn.BatchNorm*.
    _version = 2
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        process_group=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.process_group = process_group
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer(
                "running_mean", torch.zeros(num_features, **factory_kwargs)
            )
            self.register_buffer(
                "running_var", torch.ones(num_features, **factory_kwargs)
            )
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Set running_mean to 0, running_var to 1 and num_batches_tracked to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _check_num_channels(self, input: Tensor) -> None:
        if input.size(1) != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels "
                f"(num_features={self.num_features}), got {input.size(1)} channels in "
                f"input of size {input.size()}. Set num_features to the input's size "
                "along dimension 1."
            )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        # Checkpoints older than version 2 lack num_batches_tracked. Like torch, keep
        # the module's current count, or 0 when the buffer sits on the meta device.
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                current = self.num_batches_tracked
                if current is not None and current.device != torch.device("meta"):
                    state_dict[key] = current
                else:
                    state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_num_channels(input)

        # The running update weight is momentum, or 1 / num_batches_tracked (a
        # cumulative moving average) when momentum is None.
        average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    average_factor = 1.0 / float(self.num_batches_tracked)

        # Batch statistics normalize in training, and in eval when there are no
        # running statistics (track_running_stats=False at construction).
        use_batch_stats = self.training or (
            self.running_mean is None and self.running_var is None
        )
        # The buffers are updated only in training with track_running_stats=True.
        pass_buffers = not self.training or self.track_running_stats
        if self.training and dist.is_available() and dist.is_initialized():
            # Imported here because sync_batchnorm imports this module.
            from .sync_batchnorm import sync_batch_norm

            return sync_batch_norm(
                input,
                self.running_mean if pass_buffers else None,
                self.running_var if pass_buffers else None,
                self.weight,
                self.bias,
                average_factor,
                self.eps,
                self.process_group,
            )
        return batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            average_factor,
            self.eps,
        )


_CLASS_DOC_TEMPLATE = r"""Batch Normalization layer for {input_desc}.

    A drop-in replacement for :class:`torch.nn.{name}` with an analytic backward that
    calls no ``batch_norm`` operator of torch.

    .. math::

        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    Mean and variance are taken per channel over the {reduced} dimensions.

    Args:
        num_features (int): number of channels :math:`C` of the input.
        eps (float): value added to the variance before the square root. Default: 1e-5
        momentum (float or None): weight of the batch statistics in the running update.
            ``None`` gives a cumulative moving average. Default: 0.1
        affine (bool): if ``True``, learn a per-channel scale ``weight`` (initialized
            to 1) and shift ``bias`` (initialized to 0). Default: ``True``
        track_running_stats (bool): if ``True``, keep ``running_mean``,
            ``running_var`` and ``num_batches_tracked`` buffers and normalize with them
            in eval mode. If ``False``, the buffers are ``None`` and batch statistics
            are used in train and eval mode. Default: ``True``
        device (torch.device, optional): device of the parameters and buffers.
        dtype (torch.dtype, optional): dtype of the parameters and running statistics.
        bias (bool, keyword-only): if ``False`` (and ``affine`` is ``True``), learn no
            shift. Default: ``True``
        process_group (ProcessGroup, keyword-only): in training, when
            ``torch.distributed`` is initialized and this group (``None``: the default
            group) has more than one process, take the batch statistics over the
            inputs of the whole group (see :func:`normlab.nn.sync_batch_norm`). Unlike
            ``torch.nn.{name}``, the layer therefore synchronizes by default in an
            initialized group, and every process must call it in step. A group of the
            calling process alone keeps per-process statistics. Default: ``None``

    Shape:
        - Input: {input_shape}
        - Output: same shape, dtype and memory format as the input.

    .. note::
        ``momentum`` is the weight of the new batch, not of the history:
        ``running = (1 - momentum) * running + momentum * batch``. With
        ``momentum=None`` the weight is ``1 / num_batches_tracked``, which makes the
        running statistics the plain average over all training batches.

    .. note::
        Training normalizes with the biased batch variance (divide by :math:`M`, the
        number of values per channel), and the running variance is updated with the
        unbiased variance (divide by :math:`M - 1`).

    .. note::
        Eval mode normalizes with the running statistics, which start at mean 0 and
        variance 1, so eval before any training step is
        :math:`y = x / \sqrt{{1 + \epsilon}} \gamma + \beta`.

    .. note::
        float16 and bfloat16 inputs are normalized with statistics accumulated in
        float32 and return the input dtype. As in torch 2.13 on CPU, the module may keep
        float32 parameters and buffers for such input (gradients of the parameters are
        then float32), and any other dtype mismatch raises ``TypeError``.
"""


class BatchNorm1d(_BatchNorm):
    __doc__ = _CLASS_DOC_TEMPLATE.format(
        name="BatchNorm1d",
        input_desc="2D or 3D input (temporal Batch Normalization)",
        reduced="batch (and length)",
        input_shape=r":math:`(N, C)` or :math:`(N, C, L)`",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    __doc__ = _CLASS_DOC_TEMPLATE.format(
        name="BatchNorm2d",
        input_desc="4D input (a batch of images)",
        reduced="batch, height and width",
        input_shape=r":math:`(N, C, H, W)`, contiguous or ``channels_last``",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    __doc__ = _CLASS_DOC_TEMPLATE.format(
        name="BatchNorm3d",
        input_desc="5D input (a batch of volumes)",
        reduced="batch, depth, height and width",
        input_shape=r":math:`(N, C, D, H, W)`, contiguous or ``channels_last_3d``",
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
