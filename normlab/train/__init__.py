"""Training loops and the configuration of one run."""

from .config import TrainConfig
from .loop import DIVERGED, FINISHED, RunResult, build_model, evaluate, train_classifier

__all__ = [
    "DIVERGED",
    "FINISHED",
    "RunResult",
    "TrainConfig",
    "build_model",
    "evaluate",
    "train_classifier",
]
