"""Normalization layers written from the math, and one factory that builds any of them."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm
from .factory import NORMS, create_norm, register_norm, resolve_norm_name

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "NORMS",
    "batch_norm",
    "create_norm",
    "register_norm",
    "resolve_norm_name",
]
