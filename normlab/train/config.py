"""The configuration of one training run, validated and hashed into a stable key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from ..nn.factory import resolve_norm_name

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
ACTIVATIONS = ("relu", "sigmoid", "tanh")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the numbers of one classification run.

    Two configs with equal fields give the same numbers on the same machine, and
    :meth:`key` identifies a run in the run store. Fields that only change how a run is
    shown (progress bars, logging) do not belong here.

    Attributes:
        dataset: data set name, see ``normlab.data.DATASETS``.
        model: ``"mlp"`` or ``"cnn"``.
        norm: normalization name, see ``normlab.nn.NORMS``.
        hidden: widths of the MLP's hidden layers (ignored by the CNN).
        activation: hidden activation of the MLP.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty added by the optimizer.
        batch_size: samples per step.
        epochs: passes over the training split.
        eval_every: steps between evaluations on the validation split.
        seed: seeds the weight initialization, the data order and dropout.
        diverge_loss: a training loss above this (or NaN/Inf) stops the run as diverged.
        device: ``"cpu"`` or ``"cuda"``.
    """

    task: ClassVar[str] = "classify"

    dataset: str = "digits"
    model: str = "mlp"
    norm: str = "batchnorm"
    hidden: tuple[int, ...] = (100, 100)
    activation: str = "relu"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    eval_every: int = 10
    seed: int = 0
    diverge_loss: float = 1e3
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))
        object.__setattr__(self, "norm", resolve_norm_name(self.norm))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        _choice("model", self.model, MODELS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("activation", self.activation, ACTIVATIONS)
        _positive_finite("lr", self.lr)
        _positive_finite("diverge_loss", self.diverge_loss)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "epochs", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def key(self) -> str:
        """Return a stable hex digest of every field; equal configs share one stored run."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}")


def _positive_finite(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


CONFIG_TYPES: dict[str, type] = {TrainConfig.task: TrainConfig}


def register_config(cls: type) -> type:
    """Register a config class under its ``task``, so the run store can load it."""
    CONFIG_TYPES[cls.task] = cls
    return cls


def config_from_dict(task: str, data: dict):
    """Rebuild the config of ``task`` from :meth:`to_dict` output."""
    if task not in CONFIG_TYPES:
        raise ValueError(
            f"unknown task {task!r} in the run store; known: {', '.join(CONFIG_TYPES)}"
        )
    return CONFIG_TYPES[task].from_dict(data)
