"""Swap the Batch Normalization layers of a built model for another normalization."""

from __future__ import annotations

import torch
from torch import nn

from . import batchnorm, norms
from .factory import NormSpec, create_norm, resolve_norm_name

__all__ = ["convert_norm"]


# Spatial rank (the factory's ``dims``) of each layer class that convert_norm replaces.
_BATCHNORM_DIMS: dict[type[nn.Module], int] = {
    batchnorm.BatchNorm1d: 1,
    batchnorm.BatchNorm2d: 2,
    batchnorm.BatchNorm3d: 3,
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    norms.FrozenBatchNorm1d: 1,
    norms.FrozenBatchNorm2d: 2,
    norms.FrozenBatchNorm3d: 3,
}

_TRAINABLE_BATCHNORMS = (batchnorm._BatchNorm, nn.modules.batchnorm._BatchNorm)
_BATCHNORM_STATE = (
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
)


def _batchnorm_dims(module: nn.Module) -> int | None:
    # The dims of a layer that convert_norm replaces, or None for any other module.
    for cls, dims in _BATCHNORM_DIMS.items():
        if isinstance(module, cls):
            return dims
    return None


def _inherited_kwargs(old: nn.Module, to: NormSpec) -> dict:
    # Hyperparameters that carry over from one BatchNorm-family layer to another, so
    # the new layer computes the same function in eval mode. A frozen layer takes only
    # eps, and other targets take none.
    target = resolve_norm_name(to) if isinstance(to, str) else None
    if target not in ("batchnorm", "torch-batchnorm", "frozen-batchnorm"):
        return {}
    kwargs = {"eps": old.eps}
    if target != "frozen-batchnorm" and isinstance(old, _TRAINABLE_BATCHNORMS):
        kwargs["momentum"] = old.momentum
        kwargs["affine"] = old.affine
        kwargs["track_running_stats"] = old.track_running_stats
        if old.affine and old.bias is None:
            kwargs["bias"] = False
    return kwargs


def _placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    # Device and floating-point dtype of the module's own tensors, if it has any.
    for tensor in list(module.parameters(recurse=False)) + list(
        module.buffers(recurse=False)
    ):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def _copy_batchnorm_state(old: nn.Module, new: nn.Module) -> None:
    # Copy every statistic and affine tensor that both layers have.
    with torch.no_grad():
        for name in _BATCHNORM_STATE:
            source = getattr(old, name, None)
            target = getattr(new, name, None)
            if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor):
                target.copy_(source)


def _convert_layer(old: nn.Module, dims: int, to: NormSpec, kwargs: dict) -> nn.Module:
    layer_kwargs = {**_inherited_kwargs(old, to), **kwargs}
    new = create_norm(to, old.num_features, dims, **layer_kwargs)
    device, dtype = _placement(old)
    if device is not None:
        new = new.to(device=device, dtype=dtype)
    if _batchnorm_dims(new) is not None:
        _copy_batchnorm_state(old, new)
    # a parameter frozen with requires_grad_(False) stays frozen
    for name, parameter in new.named_parameters(recurse=False):
        source = getattr(old, name, None)
        if isinstance(source, torch.Tensor):
            parameter.requires_grad_(source.requires_grad)
    new.train(old.training)
    return new


def convert_norm(model: nn.Module, to: NormSpec, **kwargs) -> nn.Module:
    """Replace every Batch Normalization layer of ``model`` by ``create_norm(to, ...)``.

    The replaced layers are normlab's ``BatchNorm1d/2d/3d``, torch's
    ``nn.BatchNorm1d/2d/3d`` and normlab's ``FrozenBatchNorm1d/2d/3d``, found
    recursively. Each new layer is ``create_norm(to, num_features, dims, **kwargs)``,
    with ``dims`` from the old layer's class. It takes the old layer's device,
    floating-point dtype and train or eval mode. Other layers, including
    ``nn.SyncBatchNorm``, are left as they are.

    When the target is "batchnorm", "torch-batchnorm" or "frozen-batchnorm", the new
    layer inherits ``eps`` and, between trainable BatchNorms, ``momentum``,
    ``affine``, ``track_running_stats`` and ``bias``. Explicit ``kwargs`` override
    them. The ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` tensors that both layers have are copied. The model's
    eval-mode outputs therefore stay the same to within rounding, provided the old
    layers track running statistics.

    Other targets get only ``kwargs``. "none" and "weightnorm" put ``nn.Identity`` in
    place of each layer. convert_norm only swaps normalization layers. To
    weight-normalize the preceding Linear and Conv layers, call
    ``factory.wrap_layer(layer, "weightnorm")`` or :func:`normlab.nn.weight_norm` on
    them.

    Args:
        model (nn.Module): the model, modified in place.
        to (str or callable): a registered name (see ``NORMS``) or a callable, as in
            :func:`normlab.nn.create_norm`.
        **kwargs: passed to every new layer, for example ``num_groups=8``.

    Returns:
        nn.Module: ``model``, or the new layer when ``model`` is itself a Batch
        Normalization layer, as :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`
        does.

    Raises:
        ValueError: if ``to`` is not a registered name (before any layer changes).
    """
    if isinstance(to, str):
        resolve_norm_name(to)
    dims = _batchnorm_dims(model)
    if dims is not None:
        return _convert_layer(model, dims, to, kwargs)
    for name, child in model.named_children():
        converted = convert_norm(child, to, **kwargs)
        if converted is not child:
            setattr(model, name, converted)
    return model
