"""Batch Normalization kernels in Triton for CUDA tensors.

The functions here compute the training forward, the eval forward and the backward of
Batch Normalization over an input of shape ``(N, C, *)`` with Triton kernels. They hold no
state and do not record autograd history: the caller wraps them in an
``torch.autograd.Function`` and updates the running statistics itself.

Contract:

* ``input`` is float32, float16 or bfloat16 with at least 2 dimensions. Statistics,
  sums and the arithmetic run in float32. Outputs (``y``, ``dx``) have the input's dtype,
  shape and memory format. Contiguous (NCHW) and channels-last inputs, including the
  transposed ``(N, L, C)`` layout of a 3d input, are read in place. Any other layout is
  copied to a contiguous one first.
* ``weight``, ``bias``, ``running_mean`` and ``running_var`` are ``(C,)`` tensors of any
  floating dtype on the input's device, or ``None`` where the signature allows it.
* :func:`forward_train` returns ``(y, mean, invstd, var)``: the per-channel batch mean,
  ``invstd = 1 / sqrt(var + eps)`` and the biased batch variance (divided by
  ``M = N * prod(spatial)``), all float32 of shape ``(C,)``. The caller updates
  ``running_var`` with the unbiased variance ``var * M / (M - 1)``.
* :func:`backward` takes the ``mean`` and ``invstd`` used by the forward: the batch
  statistics in training, and ``running_mean`` and ``1 / sqrt(running_var + eps)`` in eval.
  It returns ``(dx, dweight, dbias)``. ``dweight`` is ``None`` when ``weight`` is
  ``None``. ``dweight`` and ``dbias`` have the weight's dtype, or float32 without a weight,
  so the caller casts ``dbias`` when its bias has another dtype.
* The tensors must be on a CUDA device, unless Triton runs in interpreter mode
  (``TRITON_INTERPRET=1`` set before ``triton`` is first imported), which runs the same
  kernels on CPU tensors through NumPy. :func:`is_available` reports whether a tensor can
  take this path.

The batch variance is computed in one read of the input. Each program reduces tiles of
values to a tile mean and a sum of squared deviations from it (m2). It merges those with
the pairwise update of Chan, Golub and LeVeque, the parallel form of Welford's algorithm,
which avoids the cancellation of ``E[x^2] - E[x]^2`` for values far from zero. Each
channel's first value is subtracted beforehand, so the rounding of tile means near a large
offset (1e4 with a spread of 2 in the tests) does not reach the variance through the merge.

Example::

    y, mean, invstd, var = forward_train(x, weight, bias, eps=1e-5)
    dx, dweight, dbias = backward(grad_y, x, mean, invstd, weight, training=True)
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; is_available() then returns False.
    triton = None
    tl = None

__all__ = [
    "SUPPORTED_DTYPES",
    "backward",
    "forward_eval",
    "forward_train",
    "is_available",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Offsets switch to int64 from this many elements on, so they cannot overflow int32.
_INT32_LIMIT = 2**31


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


# ---------------------------------------------------------------------------------------
# Kernels. Every kernel views the input as (N, C, S) with strides (stride_n, stride_c,
# stride_s) and works on tiles of BLOCK_S positions by BLOCK_C channels. A tile index t
# covers n = t // num_s_blocks and positions (t % num_s_blocks) * BLOCK_S onwards.
# ---------------------------------------------------------------------------------------


@_jit
def _tile_offsets(n, s, c, stride_n, stride_c, stride_s, USE_INT64: tl.constexpr):
    if USE_INT64:
        n = n.to(tl.int64)
        s = s.to(tl.int64)
        c = c.to(tl.int64)
    return n * stride_n + s[:, None] * stride_s + c[None, :] * stride_c


@_jit
def _load_shift(x_ptr, c, c_mask, stride_c, USE_INT64: tl.constexpr):
    # The first value of each channel, x[0, c, 0]. The statistics are taken of x - shift:
    # for values far from zero, means of the shifted values round with a far smaller
    # absolute error, and that error would otherwise enter the variance through the merge.
    if USE_INT64:
        c = c.to(tl.int64)
    return tl.load(x_ptr + c * stride_c, mask=c_mask, other=0.0).to(tl.float32)


@_jit
def _stats_partial_kernel(
    x_ptr, count_ptr, mean_ptr, m2_ptr,
    C, S, num_s_blocks, num_tiles, tiles_per_program,
    stride_n, stride_c, stride_s,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr,
):  # fmt: skip
    # Program (pid_c, pid_g) reduces tiles [pid_g * tiles_per_program, ...) of one channel
    # block to a count, a mean of x - shift and a sum of squared deviations (m2), stored
    # at row pid_g.
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    shift = _load_shift(x_ptr, c, c_mask, stride_c, USE_INT64)
    count = tl.zeros([], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    first = pid_g * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    for t in range(first, last):
        n = t // num_s_blocks
        s_start = (t % num_s_blocks) * BLOCK_S
        s = s_start + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        offsets = _tile_offsets(n, s, c, stride_n, stride_c, stride_s, USE_INT64)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - shift[None, :], 0.0)

        # tile statistics, with the deviations taken from the tile's own mean
        tile_count = tl.minimum(S - s_start, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x, axis=0) / tile_count
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)

        # merge: with delta = mean_b - mean_a, mean = mean_a + delta * n_b / n and
        # m2 = m2_a + m2_b + delta^2 * n_a * n_b / n
        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / new_count)
        m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
        count = new_count

    tl.store(count_ptr + pid_g, count)
    tl.store(mean_ptr + pid_g * C + c, mean, mask=c_mask)
    tl.store(m2_ptr + pid_g * C + c, m2, mask=c_mask)


@_jit
def _stats_finalize_kernel(
    x_ptr, count_ptr, partial_mean_ptr, partial_m2_ptr,
    mean_ptr, var_ptr, invstd_ptr,
    C, num_partials, stride_c, eps,
    BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr,
):  # fmt: skip
    # Merges the num_partials rows of (count, mean, m2) per channel.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    shift = _load_shift(x_ptr, c, c_mask, stride_c, USE_INT64)
    count = tl.zeros([], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for g in range(num_partials):
        part_count = tl.load(count_ptr + g)
        part_mean = tl.load(partial_mean_ptr + g * C + c, mask=c_mask, other=0.0)
        part_m2 = tl.load(partial_m2_ptr + g * C + c, mask=c_mask, other=0.0)
        new_count = count + part_count
        delta = part_mean - mean
        mean += delta * (part_count / new_count)
        m2 += part_m2 + delta * delta * (count * part_count / new_count)
        count = new_count
    var = m2 / count
    tl.store(mean_ptr + c, shift + mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    tl.store(invstd_ptr + c, 1.0 / tl.sqrt_rn(var + eps), mask=c_mask)


@_jit
def _normalize_kernel(
    x_ptr, y_ptr, mean_ptr, spread_ptr, weight_ptr, bias_ptr,
    C, S, num_s_blocks, stride_n, stride_c, stride_s, eps,
    SPREAD_IS_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr,
):  # fmt: skip
    # y = (x - mean) * invstd * weight + bias on one tile. spread_ptr contains invstd, or
    # the variance when SPREAD_IS_VAR (eval mode with running statistics).
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n = t // num_s_blocks
    s = (t % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (s < S)[:, None] & c_mask[None, :]

    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    spread = tl.load(spread_ptr + c, mask=c_mask, other=1.0).to(tl.float32)
    if SPREAD_IS_VAR:
        scale = 1.0 / tl.sqrt_rn(spread + eps)
    else:
        scale = spread
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)

    offsets = _tile_offsets(n, s, c, stride_n, stride_c, stride_s, USE_INT64)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _grad_partial_kernel(
    grad_y_ptr, x_ptr, mean_ptr, sum_dy_ptr, sum_dy_xmu_ptr,
    C, S, num_s_blocks, num_tiles, tiles_per_program,
    stride_n, stride_c, stride_s,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr,
):  # fmt: skip
    # Partial sums of dy and dy * (x - mean) over a range of tiles, stored at row pid_g.
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    sum_dy = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    first = pid_g * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    for t in range(first, last):
        n = t // num_s_blocks
        s = (t % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        offsets = _tile_offsets(n, s, c, stride_n, stride_c, stride_s, USE_INT64)
        dy = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # Masked lanes have dy == 0, so they add nothing to either sum.
        sum_dy += dy
        sum_dy_xmu += dy * (x - mean[None, :])
    tl.store(sum_dy_ptr + pid_g * C + c, tl.sum(sum_dy, axis=0), mask=c_mask)
    tl.store(sum_dy_xmu_ptr + pid_g * C + c, tl.sum(sum_dy_xmu, axis=0), mask=c_mask)


@_jit
def _grad_finalize_kernel(
    partial_dy_ptr, partial_dy_xmu_ptr, invstd_ptr, weight_ptr,
    dweight_ptr, dbias_ptr, scale_ptr, mean_dy_ptr, proj_ptr,
    C, num_partials, num_values,
    HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Sums the partial rows and writes dweight, dbias and the per-channel coefficients of
    # dx = (dy - mean_dy - (x - mean) * proj) * scale.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sum_dy = tl.zeros([BLOCK_C], tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_C], tl.float32)
    for g in range(num_partials):
        sum_dy += tl.load(partial_dy_ptr + g * C + c, mask=c_mask, other=0.0)
        sum_dy_xmu += tl.load(partial_dy_xmu_ptr + g * C + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    scale = invstd
    if HAS_WEIGHT:
        scale *= tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(
        dweight_ptr + c,
        (sum_dy_xmu * invstd).to(dweight_ptr.dtype.element_ty),
        mask=c_mask,
    )
    tl.store(dbias_ptr + c, sum_dy.to(dbias_ptr.dtype.element_ty), mask=c_mask)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(mean_dy_ptr + c, sum_dy / num_values, mask=c_mask)
    tl.store(proj_ptr + c, sum_dy_xmu * invstd * invstd / num_values, mask=c_mask)


@_jit
def _grad_input_kernel(
    grad_y_ptr, x_ptr, dx_ptr, mean_ptr, scale_ptr, mean_dy_ptr, proj_ptr,
    C, S, num_s_blocks, stride_n, stride_c, stride_s,
    TRAINING: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr,
):  # fmt: skip
    # dx on one tile. In eval the statistics are constants, so dx = dy * scale.
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    n = t // num_s_blocks
    s = (t % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (s < S)[:, None] & c_mask[None, :]
    offsets = _tile_offsets(n, s, c, stride_n, stride_c, stride_s, USE_INT64)

    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)
    dy = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if TRAINING:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        mean_dy = tl.load(mean_dy_ptr + c, mask=c_mask, other=0.0)
        proj = tl.load(proj_ptr + c, mask=c_mask, other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dx = (dy - mean_dy[None, :] - (x - mean[None, :]) * proj[None, :]) * scale[
            None, :
        ]
    else:
        dx = dy * scale[None, :]
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# triton.jit decides when this module is imported, from TRITON_INTERPRET, whether the
# kernels compile for the GPU or run in Triton's NumPy interpreter.
_INTERPRET = type(_normalize_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------------------------
# Host side: layout, launch geometry and argument checks.
# ---------------------------------------------------------------------------------------


class _Geometry:
    """Shape of an input seen as (N, C, S), with its strides and tile sizes."""

    def __init__(
        self, input: Tensor, channels_last: bool, reduce_programs: int
    ) -> None:
        batch, channels = input.shape[:2]
        positions = math.prod(input.shape[2:])
        self.C = channels
        if channels_last:
            # The address is (n * S + s) * C + c, so N and S merge into one dimension.
            self.N, self.S = 1, batch * positions
            self.stride_n, self.stride_c, self.stride_s = 0, 1, channels
            self.BLOCK_C = min(triton.next_power_of_2(channels), 64)
            self.BLOCK_S = min(triton.next_power_of_2(self.S), 2048 // self.BLOCK_C)
        else:
            self.N, self.S = batch, positions
            self.stride_n, self.stride_c, self.stride_s = (
                channels * positions,
                positions,
                1,
            )
            self.BLOCK_S = min(triton.next_power_of_2(self.S), 1024)
            self.BLOCK_C = min(triton.next_power_of_2(channels), 2048 // self.BLOCK_S)
        # NOTE: the tile sizes and the program count are first guesses that no GPU run has
        # tuned. An NCHW input with few positions (say (N, C, 3)) fills few lanes per tile.
        # CUDA limits grid axis 1, the channel blocks, to 65535 (C above about 131000).

        # tiles, channel blocks, and the split of the tiles across reduction programs
        self.num_s_blocks = triton.cdiv(self.S, self.BLOCK_S)
        self.num_tiles = self.N * self.num_s_blocks
        self.num_c_blocks = triton.cdiv(channels, self.BLOCK_C)

        groups = max(
            1, min(self.num_tiles, triton.cdiv(reduce_programs, self.num_c_blocks))
        )
        self.tiles_per_program = triton.cdiv(self.num_tiles, groups)
        # Recounted so that no program gets an empty range of tiles.
        self.num_groups = triton.cdiv(self.num_tiles, self.tiles_per_program)
        self.use_int64 = input.numel() >= _INT32_LIMIT

    def view_args(self) -> tuple:
        return (self.C, self.S, self.num_s_blocks)

    def stride_args(self) -> tuple:
        return (self.stride_n, self.stride_c, self.stride_s)

    def blocks(self) -> dict:
        return {
            "BLOCK_S": self.BLOCK_S,
            "BLOCK_C": self.BLOCK_C,
            "USE_INT64": self.use_int64,
        }


def _channels_last_order(dim: int) -> tuple[int, ...]:
    # (0, 2, 3, 1) for 4 dimensions: the order of a channels-last tensor in memory.
    return (0, *range(2, dim), 1)


def _is_channels_last(input: Tensor) -> bool:
    # True for channels_last, channels_last_3d, a transposed (N, L, C) and any (N, C).
    # A tensor with C == 1 or one position per channel is dense in both layouts.
    return input.permute(_channels_last_order(input.dim())).is_contiguous()


def _to_layout(tensor: Tensor, channels_last: bool) -> Tensor:
    # Returns a dense tensor with the given memory order, copying only when needed.
    if not channels_last:
        return tensor.contiguous()
    if _is_channels_last(tensor):
        return tensor
    order = _channels_last_order(tensor.dim())
    inverse = sorted(range(tensor.dim()), key=order.__getitem__)
    return tensor.permute(order).contiguous().permute(inverse)


def _empty_like_layout(tensor: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty_strided(
        tensor.shape, tensor.stride(), dtype=dtype or tensor.dtype, device=tensor.device
    )


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _reduce_programs(device: torch.device) -> int:
    # Target number of programs of a reduction: 8 per streaming multiprocessor. The
    # interpreter gets 4, which still splits the tests' inputs across programs.
    if device.type != "cuda":
        return 4
    return 8 * _multiprocessor_count(device.index or torch.cuda.current_device())


def _device_context(tensor: Tensor):
    # Triton launches on the current CUDA device, so switch to the input's device.
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def is_available(tensor: Tensor) -> bool:
    """Return whether Triton is importable and ``tensor`` is a CUDA tensor of a supported dtype.

    In interpreter mode (``TRITON_INTERPRET=1``) CPU tensors count as supported too.
    """
    if triton is None or tensor.dtype not in SUPPORTED_DTYPES:
        return False
    return tensor.is_cuda or _INTERPRET


def _check_input(input: Tensor) -> None:
    if triton is None:
        raise RuntimeError(
            "triton is not installed, so the Triton Batch Normalization kernels are "
            "unavailable; install triton or use torch.nn.functional.batch_norm"
        )
    if input.dim() < 2:
        raise ValueError(
            f"expected an input of shape (N, C, *) with at least 2 dimensions, "
            f"got shape {tuple(input.shape)}"
        )
    if input.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"input dtype must be float32, float16 or bfloat16, got {input.dtype}; "
            f"use torch.nn.functional.batch_norm for other dtypes"
        )
    if not input.is_cuda and not _INTERPRET:
        raise ValueError(
            f"expected a CUDA tensor, got one on device {input.device}; use "
            f"torch.nn.functional.batch_norm, or set TRITON_INTERPRET=1 before importing "
            f"triton to run the kernels on the CPU"
        )


def _check_channel_vector(name: str, vector: Tensor | None, input: Tensor) -> None:
    if vector is None:
        return
    channels = input.size(1)
    if vector.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) for an input with {channels} channels, "
            f"got {tuple(vector.shape)}"
        )
    if not vector.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {vector.dtype}")
    if vector.device != input.device:
        raise ValueError(
            f"{name} is on device {vector.device} but the input is on {input.device}; "
            f"move both to one device"
        )


def _prepare(input: Tensor, reduce: bool) -> tuple[Tensor, bool, _Geometry]:
    channels_last = _is_channels_last(input)
    input = _to_layout(input, channels_last)
    programs = _reduce_programs(input.device) if reduce else 1
    return input, channels_last, _Geometry(input, channels_last, programs)


def _scratch(shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------
# Public functions.
# ---------------------------------------------------------------------------------------


def forward_train(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize ``input`` with its own per-channel batch statistics.

    Args:
        input: ``(N, C, *)`` float32, float16 or bfloat16 tensor.
        weight, bias: ``(C,)`` affine parameters, or ``None`` for 1 and 0.
        eps: added to the variance before the square root.

    Returns:
        ``(y, mean, invstd, var)``: ``y = (x - mean) * invstd * weight + bias`` in the
        input's dtype and memory format, and float32 ``(C,)`` tensors of the mean, of
        ``1 / sqrt(var + eps)`` and of the biased variance. An input with no values per
        channel gives an empty ``y``, a zero mean and variance, and ``invstd =
        1 / sqrt(eps)``.
    """
    _check_input(input)
    _check_channel_vector("weight", weight, input)
    _check_channel_vector("bias", bias, input)
    input, _, geometry = _prepare(input, reduce=True)
    channels, device = geometry.C, input.device
    mean = torch.zeros(channels, dtype=torch.float32, device=device)
    var = torch.zeros_like(mean)
    invstd = torch.full_like(mean, 1.0 / math.sqrt(eps))
    output = _empty_like_layout(input)
    if input.numel() == 0:
        return output, mean, invstd, var

    groups = geometry.num_groups
    partial_count = _scratch((groups,), device)
    partial_mean = _scratch((groups, channels), device)
    partial_m2 = _scratch((groups, channels), device)
    finalize_block = min(triton.next_power_of_2(channels), 1024)
    with _device_context(input):
        _stats_partial_kernel[(geometry.num_c_blocks, groups)](
            input, partial_count, partial_mean, partial_m2,
            *geometry.view_args(), geometry.num_tiles, geometry.tiles_per_program,
            *geometry.stride_args(), **geometry.blocks(),
        )  # fmt: skip
        _stats_finalize_kernel[(triton.cdiv(channels, finalize_block),)](
            input, partial_count, partial_mean, partial_m2, mean, var, invstd,
            channels, groups, geometry.stride_c, eps,
            BLOCK_C=finalize_block, USE_INT64=geometry.use_int64,
        )  # fmt: skip
        _launch_normalize(
            input, output, mean, invstd, weight, bias, eps, geometry, False
        )
    return output, mean, invstd, var


def forward_eval(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Normalize ``input`` with the running statistics.

    Returns ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in the
    input's dtype and memory format.
    """
    _check_input(input)
    for name, vector in (("running_mean", running_mean), ("running_var", running_var)):
        if vector is None:
            raise ValueError(f"{name} is required in eval mode, got None")
        _check_channel_vector(name, vector, input)
    _check_channel_vector("weight", weight, input)
    _check_channel_vector("bias", bias, input)
    input, _, geometry = _prepare(input, reduce=False)
    output = _empty_like_layout(input)
    if input.numel() == 0:
        return output
    with _device_context(input):
        _launch_normalize(
            input, output, running_mean, running_var, weight, bias, eps, geometry, True
        )
    return output


def _launch_normalize(
    input: Tensor,
    output: Tensor,
    mean: Tensor,
    spread: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    geometry: _Geometry,
    spread_is_var: bool,
) -> None:
    # The kernel never reads a missing weight or bias, so the mean is passed as its pointer.
    _normalize_kernel[(geometry.num_tiles, geometry.num_c_blocks)](
        input, output, mean, spread,
        mean if weight is None else weight, mean if bias is None else bias,
        *geometry.view_args(), *geometry.stride_args(), eps,
        SPREAD_IS_VAR=spread_is_var, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, **geometry.blocks(),
    )  # fmt: skip


def backward(
    grad_y: Tensor,
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    training: bool,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Compute the gradients of Batch Normalization from ``grad_y``.

    With ``M`` values per channel, ``sum_dy = sum(dy)`` and ``sum_dy_xmu = sum(dy * (x -
    mean))`` per channel, ``dbias = sum_dy`` and ``dweight = sum_dy_xmu * invstd``. In
    training ``dx = (dy - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) * invstd *
    weight``, and in eval, where the statistics are constants, ``dx = dy * invstd * weight``.

    Args:
        grad_y: gradient of the output, the input's shape; any memory format.
        input: the forward's input.
        mean, invstd: ``(C,)`` statistics the forward normalized with.
        weight: ``(C,)`` weight, or ``None``.
        training: whether the forward used batch statistics.

    Returns:
        ``(dx, dweight, dbias)``: ``dx`` in the input's dtype and memory format,
        ``dweight`` (``None`` without a weight) and ``dbias`` in the weight's dtype, or
        float32 without a weight.
    """
    _check_input(input)
    if grad_y.shape != input.shape:
        raise ValueError(
            f"grad_y must have the input's shape {tuple(input.shape)}, "
            f"got {tuple(grad_y.shape)}"
        )
    if grad_y.device != input.device:
        raise ValueError(
            f"grad_y is on device {grad_y.device} but the input is on {input.device}; "
            f"move both to one device"
        )
    for name, vector in (("mean", mean), ("invstd", invstd), ("weight", weight)):
        _check_channel_vector(name, vector, input)
    input, channels_last, geometry = _prepare(input, reduce=True)
    grad_y = _to_layout(grad_y, channels_last)
    channels, device = geometry.C, input.device
    param_dtype = torch.float32 if weight is None else weight.dtype
    dweight = torch.zeros(channels, dtype=param_dtype, device=device)
    dbias = torch.zeros_like(dweight)
    grad_input = _empty_like_layout(input, dtype=input.dtype)
    if input.numel() == 0:
        return grad_input, None if weight is None else dweight, dbias

    groups = geometry.num_groups
    partial_dy = _scratch((groups, channels), device)
    partial_dy_xmu = _scratch((groups, channels), device)
    scale, mean_dy, proj = _scratch((3, channels), device).unbind()
    finalize_block = min(triton.next_power_of_2(channels), 1024)
    num_values = input.numel() // channels
    with _device_context(input):
        _grad_partial_kernel[(geometry.num_c_blocks, groups)](
            grad_y, input, mean, partial_dy, partial_dy_xmu,
            *geometry.view_args(), geometry.num_tiles, geometry.tiles_per_program,
            *geometry.stride_args(), **geometry.blocks(),
        )  # fmt: skip
        _grad_finalize_kernel[(triton.cdiv(channels, finalize_block),)](
            partial_dy, partial_dy_xmu, invstd, invstd if weight is None else weight,
            dweight, dbias, scale, mean_dy, proj,
            channels, groups, float(num_values),
            HAS_WEIGHT=weight is not None, BLOCK_C=finalize_block,
        )  # fmt: skip
        _grad_input_kernel[(geometry.num_tiles, geometry.num_c_blocks)](
            grad_y, input, grad_input, mean, scale, mean_dy, proj,
            *geometry.view_args(), *geometry.stride_args(),
            TRAINING=training, **geometry.blocks(),
        )  # fmt: skip
    return grad_input, None if weight is None else dweight, dbias
