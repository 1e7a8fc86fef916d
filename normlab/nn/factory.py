"""A registry of normalization layers, so that any model can swap its normalization.

Every builder takes the channel count first, as PyTorch's normalization layers do, plus
``dims``: 1 for ``(N, C)`` or ``(N, C, L)`` features, 2 for images, 3 for volumes.
"""

from __future__ import annotations

from typing import Callable, Union

from torch import nn

from . import batchnorm, norms

NormBuilder = Callable[..., nn.Module]
NormSpec = Union[str, Callable[[int], nn.Module]]

NORMS: dict[str, NormBuilder] = {}


def register_norm(name: str) -> Callable[[NormBuilder], NormBuilder]:
    """Register ``builder(num_features, dims, **kwargs)`` under ``name``."""

    def decorator(builder: NormBuilder) -> NormBuilder:
        key = _canonical(name)
        if key in NORMS:
            raise ValueError(f"a normalization named {key!r} is already registered")
        NORMS[key] = builder
        return builder

    return decorator


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def resolve_norm_name(name: str) -> str:
    """Return the registered spelling of ``name``, or raise ``ValueError`` listing the names."""
    if not isinstance(name, str):
        raise TypeError(f"norm name must be a string, got {type(name).__name__}")
    key = _canonical(name)
    if key not in NORMS:
        valid = ", ".join(sorted(NORMS))
        raise ValueError(f"unknown normalization {name!r}; valid names are: {valid}")
    return key


def create_norm(norm: NormSpec, num_features: int, dims: int = 2, **kwargs) -> nn.Module:
    """Build a normalization layer for ``num_features`` channels.

    Args:
        norm (str or callable): a registered name (see ``NORMS``) or a callable such as a
            class or ``functools.partial`` that is called as ``norm(num_features, **kwargs)``.
        num_features (int): number of channels ``C`` of the input ``(N, C, ...)``.
        dims (int): spatial rank of the features: 1 for ``(N, C)`` or ``(N, C, L)``, 2 for
            ``(N, C, H, W)``, 3 for ``(N, C, D, H, W)``. Default: 2.
        **kwargs: passed to the layer, for example ``eps`` or ``momentum``.
    """
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    if callable(norm) and not isinstance(norm, str):
        return norm(num_features, **kwargs)
    return NORMS[resolve_norm_name(norm)](num_features, dims, **kwargs)


def is_identity(norm: NormSpec) -> bool:
    """Return True when ``norm`` names the no-op normalization."""
    return isinstance(norm, str) and resolve_norm_name(norm) == "none"


_OURS = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}
_TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@register_norm("batchnorm")
def _batchnorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    return _OURS[dims](num_features, **kwargs)


@register_norm("torch-batchnorm")
def _torch_batchnorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    return _TORCH[dims](num_features, **kwargs)


@register_norm("none")
def _none(num_features: int, dims: int, **kwargs) -> nn.Module:
    return nn.Identity()


def uses_bias(norm: NormSpec) -> bool:
    """Return True when a conv or linear layer followed by ``norm`` should keep its bias.

    A normalization that subtracts a mean and adds its own shift makes the bias of the layer
    before it redundant. "none" and "weightnorm" do not subtract a mean, so those keep
    the bias. "frozen-batchnorm" drops it like "batchnorm", so that a model built with
    either loads the other's checkpoint. An unknown callable keeps the bias.
    """
    if not isinstance(norm, str):
        return True
    return resolve_norm_name(norm) in ("none", "weightnorm")


def wrap_layer(layer: nn.Module, norm: NormSpec) -> nn.Module:
    """Return ``layer`` reparametrized by weight normalization when ``norm`` is "weightnorm".

    Weight normalization acts on the weight of the conv or linear layer itself, so models
    call this on every such layer and put ``create_norm(norm, ...)`` (an identity for
    "weightnorm") where other normalizations go.
    """
    if isinstance(norm, str) and resolve_norm_name(norm) == "weightnorm":
        from .weightnorm import weight_norm

        return weight_norm(layer)
    return layer


_FROZEN = {
    1: norms.FrozenBatchNorm1d,
    2: norms.FrozenBatchNorm2d,
    3: norms.FrozenBatchNorm3d,
}
_INSTANCE = {1: norms.InstanceNorm1d, 2: norms.InstanceNorm2d, 3: norms.InstanceNorm3d}


@register_norm("frozen-batchnorm")
def _frozen_batchnorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    return _FROZEN[dims](num_features, **kwargs)


@register_norm("layernorm")
def _layernorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    # One class for every dims: (N, C) features give torch's LayerNorm(C), and
    # (N, C, *) features give torch's GroupNorm(1, C).
    return norms.LayerNorm(num_features, **kwargs)


@register_norm("groupnorm")
def _groupnorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    # num_groups defaults to the largest divisor of num_features that is at most 32. For
    # dims=1 the features may be (N, C) with no positions, where a group of one or two
    # values normalizes to a constant or a sign, so each group gets at least 16 features.
    if dims == 1 and kwargs.get("num_groups") is None:
        kwargs["num_groups"] = norms.default_num_groups(num_features, min_group_size=16)
    return norms.GroupNorm(num_features, **kwargs)


@register_norm("instancenorm")
def _instancenorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    # dims=1 takes (N, C, L) input only, because (N, C) features have no positions to
    # take instance statistics over.
    return _INSTANCE[dims](num_features, **kwargs)


@register_norm("weightnorm")
def _weightnorm(num_features: int, dims: int, **kwargs) -> nn.Module:
    # Weight normalization reparametrizes the preceding layer (see wrap_layer), so the
    # normalization slot itself computes nothing.
    return nn.Identity()
