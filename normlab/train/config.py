"""The configuration of one training run, validated and hashed into a stable key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import ClassVar

from ..models.mlp import DROPOUT_POSITIONS, ORDERS
from ..nn.factory import resolve_norm_name

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adam")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
# fields that the CNN, which builds its blocks in one fixed layout, cannot honour
MLP_ONLY_FIELDS = ("order", "dropout", "dropout_position", "norm_momentum", "norm_eps")


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
        order: position of the normalization in each hidden MLP block: ``"norm-act"``
            for ``Linear -> norm -> activation``, ``"act-norm"`` for
            ``Linear -> activation -> norm``.
        dropout: dropout probability in each hidden MLP block, in [0, 1).
        dropout_position: ``"before"`` puts dropout directly before the normalization.
            ``"after"`` puts it at the end of the block, which is after the activation
            in ``"norm-act"`` order and after the normalization in ``"act-norm"`` order.
        init_scale: factor that multiplies the weight of every linear and convolution
            layer after PyTorch's default initialization (biases are left as they are).
        norm_momentum: ``momentum`` of the normalization layers that track running
            statistics, in PyTorch's convention ``running = (1 - momentum) * running +
            momentum * batch``, so 0.1 here is 0.9 in Keras and TensorFlow; None keeps a
            cumulative average. Ignored by normalizations without running statistics.
        norm_eps: ``eps`` added to the variance by the normalization layers that take
            one. Ignored by "none" and "weightnorm".
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty added by the optimizer.
        batch_size: samples per step.
        epochs: passes over the training split.
        train_size: number of leading samples of the training split to train on, None
            for all. The final training metrics are measured on those samples.
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
    order: str = "norm-act"
    dropout: float = 0.0
    dropout_position: str = "after"
    init_scale: float = 1.0
    norm_momentum: float | None = 0.1
    norm_eps: float = 1e-5
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    train_size: int | None = None
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
        self._validate_architecture()
        if self.train_size is not None and (
            not isinstance(self.train_size, int) or self.train_size < 2
        ):
            raise ValueError(
                f"train_size must be None or an integer >= 2, got {self.train_size!r}"
            )

    def _validate_architecture(self) -> None:
        _choice("order", self.order, ORDERS)
        _choice("dropout_position", self.dropout_position, DROPOUT_POSITIONS)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _positive_finite("init_scale", self.init_scale)
        _positive_finite("norm_eps", self.norm_eps)
        if self.norm_momentum is not None and not (
            isinstance(self.norm_momentum, (int, float))
            and 0.0 <= self.norm_momentum <= 1.0
        ):
            raise ValueError(
                f"norm_momentum must be None or in [0, 1], got {self.norm_momentum!r}"
            )
        if self.model != "mlp":
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name in MLP_ONLY_FIELDS:
                default = defaults[name]
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} applies to model 'mlp' only, "
                        f"got model {self.model!r}; leave {name} at {default!r}"
                    )

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
