"""Models that take a ``norm`` argument, so one switch changes their normalization."""

from .cnn import CNN
from .mlp import MLP

__all__ = ["CNN", "MLP"]
