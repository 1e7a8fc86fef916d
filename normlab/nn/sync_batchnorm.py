r"""Batch Normalization with statistics taken over every process of a process group.

In data-parallel training each process receives a slice of the global batch. A normlab
``BatchNorm1d/2d/3d`` in training mode, with ``process_group`` set or left ``None`` for
the default group, normalizes with the mean and variance of the global batch, as
:class:`torch.nn.SyncBatchNorm` does. Unlike torch's layer it runs on any
``torch.distributed`` backend that has ``all_gather`` and ``all_reduce``, so gloo with CPU
tensors works as well as NCCL with CUDA tensors. :func:`convert_sync` sets the group on every BatchNorm layer of a model.

Each process computes per-channel ``(count, mean, M2)`` of its own slice with the
corrected two-pass algorithm of :func:`normlab.nn.batchnorm._batch_statistics`, where
``M2`` is the sum of squared deviations from the slice mean. One ``all_gather`` of
``2 C + 1`` float64 values per process exchanges them, and every process merges them in
the same order with the parallel formula of Chan, Golub and LeVeque (1979):

.. math::

    n = \sum_i n_i, \quad \bar{x} = \frac{1}{n} \sum_i n_i \bar{x}_i, \quad
    M_2 = \sum_i M_{2,i} + \sum_i n_i (\bar{x}_i - \bar{x})^2

The backward all-reduces the per-channel sums ``sum(dy)`` and ``sum(dy * (x - mean))``
and computes the input gradient locally. The weight and bias gradients stay the sums over
the local slice, as in ``torch.nn.SyncBatchNorm`` (torch 2.13): DistributedDataParallel
averages them over the processes like any other parameter gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch import distributed as dist

from ._autograd import first_order_only
from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _batch_statistics,
    _BatchNorm,
    _check_input,
    _compute_dtype,
    _params_in_input_dtype,
    _per_channel_view,
    _reduction_dims,
    _suggest_memory_format,
    _update_running_stats,
    _values_per_channel,
    batch_norm,
)

__all__ = ["SyncBatchNorm", "convert_sync", "sync_batch_norm"]


def _group_size(process_group) -> int:
    # Number of processes whose inputs share statistics; 1 without an initialized group.
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _all_gather(tensor: Tensor, process_group, world_size: int) -> Tensor:
    # Stack every process's tensor into (world_size, *tensor.shape), in rank order.
    # gloo has no all_gather_into_tensor in torch 2.13, so it takes the list form.
    if dist.get_backend(process_group) == dist.Backend.GLOO:
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor, group=process_group)
        return torch.stack(gathered)
    # NOTE: this NCCL branch is covered only by a test that needs 2 CUDA devices.
    output = tensor.new_empty((world_size,) + tuple(tensor.shape))
    dist.all_gather_into_tensor(output, tensor, group=process_group)
    return output


def _merge_statistics(
    gathered: Tensor, num_channels: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge per-process ``(count, mean, M2)`` rows into the statistics of the union.

    Args:
        gathered: float64 of shape ``(P, 1 + 2 C)``, one row ``[n_i, mean_i, M2_i]``
            per process. A process with ``n_i = 0`` contributes nothing.

    Returns:
        ``(count, mean, var, means)``: the global count as a 0-d tensor, the global mean
        and biased variance of shape ``(C,)``, and the per-process means ``(P, C)``.
    """
    counts = gathered[:, :1]
    means = gathered[:, 1 : 1 + num_channels]
    m2 = gathered[:, 1 + num_channels :]
    count = counts.sum()
    mean = (counts * means).sum(dim=0) / count
    # Deviations from the global mean, so no large sum of squares ever cancels.
    spread = (counts * (means - mean).square()).sum(dim=0)
    var = (m2.sum(dim=0) + spread) / count
    return count, mean, var, means


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode Batch Normalization over the union of the inputs of a group.

    The local steps follow ``_BatchNormFunction`` of ``normlab.nn.batchnorm``: the
    forward saves ``centered = x - m1`` (``m1`` the rough local mean) and an ``offset``
    with ``centered - offset = x - mean``, here with the global mean.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        process_group,
        world_size: int,
    ) -> Tensor:
        compute_dtype = _compute_dtype(input.dtype)
        memory_format = _suggest_memory_format(input)
        input = input.contiguous(memory_format=memory_format)
        num_channels = input.size(1)
        view = _per_channel_view(input)

        # local statistics, exchanged as float64 rows [n, mean, M2]
        local_mean, centered, residual, local_var = _batch_statistics(
            input, compute_dtype
        )
        local_count = _values_per_channel(input)
        rough_mean = _rough_mean(local_mean, residual)
        local_row = torch.cat(
            [
                torch.tensor([float(local_count)], dtype=torch.float64, device=input.device),
                rough_mean + residual.double(),
                local_var.double() * local_count,
            ]
        )
        gathered = _all_gather(local_row, process_group, world_size)
        count, mean64, var64, _ = _merge_statistics(gathered, num_channels)
        global_count = int(count.item())
        if global_count <= 1:
            raise ValueError(
                "expected more than 1 value per channel across the process group when "
                f"training, got {global_count} in total over {world_size} processes "
                f"(this process: input size {tuple(input.size())}). Use larger batches."
            )

        mean = mean64.to(compute_dtype)
        var = var64.to(compute_dtype)
        if running_mean is not None:
            _update_running_stats(
                running_mean, running_var, mean, var, global_count, momentum
            )

        # x - mean = centered - (mean - m1), with mean - m1 taken in float64
        offset64 = mean64 - rough_mean
        invstd = torch.rsqrt(var + eps)
        if _params_in_input_dtype(input, weight, bias, running_mean):
            # Round the global mean and invstd to the input dtype, as the
            # single-process path does.
            rounded_mean = mean.to(input.dtype).double()
            offset64 = offset64 + (rounded_mean - mean64)
            invstd = invstd.to(input.dtype).to(compute_dtype)
        offset = offset64.to(compute_dtype)
        scale = invstd if weight is None else invstd * weight.to(compute_dtype)
        shift = -offset * scale
        if bias is not None:
            shift = shift + bias.to(compute_dtype)
        output = torch.addcmul(shift.view(view), centered, scale.view(view))

        ctx.save_for_backward(centered, weight, offset, invstd)
        ctx.global_count = global_count
        ctx.process_group = process_group
        ctx.memory_format = memory_format
        ctx.input_dtype = input.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output.to(input.dtype)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_output: Tensor):
        centered, weight, offset, invstd = ctx.saved_tensors
        needs_input_grad, needs_weight_grad, needs_bias_grad = ctx.needs_input_grad[:3]
        compute_dtype = offset.dtype
        dims = _reduction_dims(centered)
        view = _per_channel_view(centered)

        grad = grad_output.contiguous(memory_format=ctx.memory_format)
        grad = grad.to(compute_dtype)
        grad_input = grad_weight = grad_bias = None

        # local sums: sum(g) and sum(g * (x - mean)) = sum(g * centered) - offset * sum(g)
        grad_sum = grad.sum(dim=dims)
        grad_dot_centered = (grad * centered).sum(dim=dims) - offset * grad_sum
        # dweight and dbias are local sums, and DistributedDataParallel averages them.
        if needs_weight_grad:
            grad_weight = (grad_dot_centered * invstd).to(weight.dtype)
        if needs_bias_grad:
            grad_bias = grad_sum.to(ctx.bias_dtype)

        if needs_input_grad:
            # Every process of the group takes this branch, because each input of
            # the same layer requires grad or none does, so the all_reduce matches.
            sums = torch.cat([grad_sum, grad_dot_centered])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
            total_grad_sum, total_grad_dot_centered = sums.chunk(2)
            input_scale = invstd
            if weight is not None:
                input_scale = invstd * weight.to(compute_dtype)
            # dx = a * (g - sum(g) / M - (x - mean) * invstd^2 * sum(g * (x - mean)) / M)
            # with a = weight * invstd and M the global count, as in _BatchNormFunction.
            num_values = ctx.global_count
            centered_coef = -input_scale * invstd.square() * total_grad_dot_centered
            centered_coef = centered_coef / num_values
            constant = -input_scale * total_grad_sum / num_values - centered_coef * offset
            grad_input = grad.mul(input_scale.view(view))
            grad_input.addcmul_(centered, centered_coef.view(view))
            grad_input.add_(constant.view(view))
            grad_input = grad_input.to(ctx.input_dtype)

        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _rough_mean(mean: Tensor, residual: Tensor) -> Tensor:
    """Recover, in float64, the rough mean ``m1`` that ``_batch_statistics`` centered on.

    ``_batch_statistics`` returns ``mean = m1 + residual`` rounded to the compute dtype,
    and ``centered = x - m1``. ``mean - residual`` differs from ``m1`` by at most half a
    unit in the last place of ``mean``, and ``m1`` is a number of the compute dtype, so
    rounding the difference back to that dtype gives ``m1``. The exception is a mean
    whose rounding crossed a power of two, which leaves an error of one unit in the last
    place, the accuracy of ``mean`` itself.
    """
    difference = mean.double() - residual.double()
    return difference.to(mean.dtype).double()


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> Tensor:
    r"""Apply training-mode Batch Normalization with statistics over a process group.

    Every process of ``process_group`` must call this for the same layer with inputs of
    the same channel count, dtype and device type. The local batches may differ in size,
    and a process may have one value or none per channel, as long as the group has more
    than one in total.

    Args:
        input (Tensor): this process's slice of the batch, of shape :math:`(N_i, C, *)`.
        running_mean, running_var (Tensor or None): running statistics, updated in place
            with the global mean and the unbiased global variance (divide by
            :math:`M - 1`, :math:`M` the number of values per channel in the group).
        weight, bias (Tensor, optional): per-channel scale and shift.
        momentum (float): weight of the batch statistics in the running update.
        eps (float): value added to the variance before the square root.
        process_group (ProcessGroup, optional): the group to synchronize over. Default:
            ``None``, the default group.

    Returns:
        Tensor: the normalized slice, with the shape, dtype and memory format of
        ``input``. Without an initialized ``torch.distributed`` or with a group of one
        process, the result is :func:`normlab.nn.batch_norm` with ``training=True``.

    Raises:
        ValueError: if the group has only one value per channel in total, or for the
            shape, dtype and ``eps`` errors of :func:`normlab.nn.batch_norm`.
    """
    world_size = _group_size(process_group)
    if world_size == 1:
        return batch_norm(
            input, running_mean, running_var, weight, bias, True, momentum, eps
        )
    # The value count is checked over the whole group after the all_gather, so the
    # local checks run on an empty slice that keeps the input's shape and dtype.
    local_shape = input[:0] if input.dim() > 0 else input
    _check_input(local_shape, running_mean, running_var, weight, bias, True, eps)
    return _SyncBatchNormFunction.apply(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        momentum,
        eps,
        process_group,
        world_size,
    )


class SyncBatchNorm(_BatchNorm):
    r"""Batch Normalization for input of any rank :math:`(N, C, *)`.

    The counterpart of :class:`torch.nn.SyncBatchNorm`, which also accepts any input
    with at least 2 dimensions. :func:`convert_sync` turns a ``torch.nn.SyncBatchNorm``
    into this class. It takes the constructor arguments of normlab's ``BatchNorm2d``,
    including ``process_group``, and behaves as ``BatchNorm1d/2d/3d`` do for input of
    their rank.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"expected at least 2D input (N, C, *), got {input.dim()}D input"
            )


# torch classes that convert_sync replaces, most specific first, because
# torch.nn.SyncBatchNorm is a subclass of torch's _BatchNorm like BatchNorm1d/2d/3d.
_TORCH_TO_NORMLAB: tuple[tuple[type[nn.Module], type[_BatchNorm]], ...] = (
    (nn.SyncBatchNorm, SyncBatchNorm),
    (nn.BatchNorm1d, BatchNorm1d),
    (nn.BatchNorm2d, BatchNorm2d),
    (nn.BatchNorm3d, BatchNorm3d),
)


def _from_torch(module: nn.Module, cls: type[_BatchNorm], process_group) -> _BatchNorm:
    # Build cls on the meta device, then hand it the old layer's tensors, which keeps
    # their device, dtype, requires_grad and identity (an optimizer built before the
    # conversion still updates them).
    new = cls(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        device="meta",
        bias=module.bias is not None,
        process_group=process_group,
    )
    for name, parameter in module.named_parameters(recurse=False):
        setattr(new, name, parameter)
    for name, buffer in module.named_buffers(recurse=False):
        setattr(new, name, buffer)
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_sync(module: nn.Module, process_group=None) -> nn.Module:
    """Make every BatchNorm layer of ``module`` take its statistics over ``process_group``.

    Mirrors :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` (torch 2.13). normlab's
    ``BatchNorm1d/2d/3d`` (and their subclasses) get ``process_group`` set in place.
    ``torch.nn.BatchNorm1d/2d/3d`` become normlab's class of the same rank and
    ``torch.nn.SyncBatchNorm`` becomes :class:`SyncBatchNorm`. The new layer keeps the
    old layer's parameter and buffer tensors themselves, so device, dtype,
    ``requires_grad``, values and optimizer references carry over, and it takes the old
    layer's train or eval mode. Frozen BatchNorms and other layers stay as they are.

    Args:
        module (nn.Module): the model, modified in place.
        process_group (ProcessGroup, optional): the group whose inputs share statistics.
            Default: ``None``, the default group at the time of each forward.

    Returns:
        nn.Module: ``module``, or the new layer when ``module`` is itself a torch
        BatchNorm layer.
    """
    if isinstance(module, _BatchNorm):
        module.process_group = process_group
        return module
    converted = module
    for torch_cls, normlab_cls in _TORCH_TO_NORMLAB:
        if isinstance(module, torch_cls):
            converted = _from_torch(module, normlab_cls, process_group)
            break
    for name, child in module.named_children():
        converted.add_module(name, convert_sync(child, process_group))
    return converted
