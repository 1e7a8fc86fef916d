"""Normalization layers written from the math, and one factory that builds any of them."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from .convert import convert_norm
from .factory import (
    NORMS,
    create_norm,
    register_norm,
    resolve_norm_name,
    uses_bias,
    wrap_layer,
)
from .norms import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    default_num_groups,
    group_norm,
)
from .sync_batchnorm import SyncBatchNorm, convert_sync, sync_batch_norm
from .weightnorm import WeightNorm, init_weight_norm_, remove_weight_norm, weight_norm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "NORMS",
    "SyncBatchNorm",
    "WeightNorm",
    "batch_norm",
    "convert_norm",
    "convert_sync",
    "create_norm",
    "default_num_groups",
    "group_norm",
    "init_weight_norm_",
    "register_norm",
    "remove_weight_norm",
    "resolve_norm_name",
    "sync_batch_norm",
    "uses_bias",
    "weight_norm",
    "wrap_layer",
]
