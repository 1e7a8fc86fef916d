"""The classification training loop: seeded, stopped early when the loss diverges."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..models import CNN, MLP
from .config import TrainConfig

logger = logging.getLogger(__name__)

FINISHED = "finished"
DIVERGED = "diverged"

EVAL_CHUNK = 2048

SCALED_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# The constructor arguments of each normalization, out of TrainConfig's norm_momentum
# (passed as ``momentum``) and norm_eps (passed as ``eps``). A normalization missing
# here gets neither.
NORM_OPTIONS = {
    "batchnorm": ("momentum", "eps"),
    "torch-batchnorm": ("momentum", "eps"),
    "frozen-batchnorm": ("eps",),
    "layernorm": ("eps",),
    "groupnorm": ("eps",),
    "instancenorm": ("eps",),
}


@dataclass
class RunResult:
    """What one training run produced.

    Attributes:
        status: ``"finished"`` or ``"diverged"``.
        steps: optimizer steps taken.
        diverged_step: the step whose loss was NaN/Inf or above ``diverge_loss``, else None.
        final: final metrics, ``train_loss``, ``train_acc``, ``val_loss``, ``val_acc``,
            ``test_loss``, ``test_acc`` (NaN for a diverged run) and ``best_val_acc``.
            The train metrics cover the samples the run trained on (see ``train_size``).
        history: one row per evaluation: ``step``, ``epoch``, ``train_loss`` (mean over the
            steps since the previous row), ``val_loss``, ``val_acc``.
        step_loss: the training loss of every step.
        wall_time: seconds spent in training and evaluation.
    """

    status: str
    steps: int
    diverged_step: Optional[int]
    final: dict
    history: list[dict] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    wall_time: float = 0.0


def build_model(config: TrainConfig, data) -> nn.Module:
    """Build the model that ``config`` names, sized for ``data``.

    The weights get PyTorch's default initialization, then :func:`scale_weights`
    multiplies them by ``config.init_scale``.
    """
    if config.model == "mlp":
        model = MLP(
            data.in_features,
            config.hidden,
            data.num_classes,
            norm=config.norm,
            activation=config.activation,
            dropout=config.dropout,
            order=config.order,
            dropout_position=config.dropout_position,
            norm_kwargs=norm_kwargs(config),
        )
    else:
        model = CNN(
            data.in_channels, data.num_classes, data.image_size, norm=config.norm
        )
    scale_weights(model, config.init_scale)
    return model


def norm_kwargs(config: TrainConfig) -> dict:
    """Return the ``momentum`` and ``eps`` that the config's normalization accepts."""
    values = {"momentum": config.norm_momentum, "eps": config.norm_eps}
    return {name: values[name] for name in NORM_OPTIONS.get(config.norm, ())}


@torch.no_grad()
def scale_weights(model: nn.Module, scale: float) -> None:
    """Multiply the weight of every linear and convolution layer by ``scale``.

    Biases and normalization parameters are left as they are. A weight-normalized layer
    is assigned the scaled weight, so its length ``g`` scales and its direction ``v``
    keeps its direction.
    """
    if scale == 1.0:
        return
    for module in model.modules():
        kind = parametrize.type_before_parametrizations(module)
        if not issubclass(kind, SCALED_LAYERS):
            continue
        if parametrize.is_parametrized(module, "weight"):
            module.weight = module.weight * scale
        else:
            module.weight.mul_(scale)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of ``model`` in eval mode on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_CHUNK):
        logits = model(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss_sum / len(x), correct / len(x)


def train_classifier(
    config: TrainConfig,
    data,
    on_step: Optional[Callable[[int, int], None]] = None,
    on_end: Optional[Callable[[nn.Module], None]] = None,
) -> RunResult:
    """Train the classifier that ``config`` describes on ``data`` and return its metrics.

    The run draws every random number (initialization, data order, dropout) from generators
    seeded by ``config.seed``, inside :func:`torch.random.fork_rng`, so the caller's global
    random state is left as it was and the same config gives the same numbers.

    Args:
        config: the run's settings.
        data: a ``normlab.data.ClassificationData``.
        on_step: called as ``on_step(step, total_steps)`` after every step, for progress.
        on_end: called with the trained model when training ends, before the final
            evaluation, for measurements that need the model itself.
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {config.device!r} requested but CUDA is not available; use --device cpu"
        )
    device = torch.device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _train(config, data, device, on_step, on_end)


def _train(config, data, device, on_step, on_end=None) -> RunResult:
    started = time.perf_counter()
    model = build_model(config, data).to(device)
    optimizer = build_optimizer(config, model)
    order_generator = torch.Generator().manual_seed(config.seed)

    train_x, train_y = training_samples(config, data)
    train_x, train_y = train_x.to(device), train_y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    num_train = len(train_x)
    # a last batch of one sample has no batch statistics, so it is dropped
    steps_per_epoch = num_train // config.batch_size + (num_train % config.batch_size > 1)
    total_steps = steps_per_epoch * config.epochs

    history: list[dict] = []
    step_loss: list[float] = []
    best_val_acc = 0.0
    step, diverged_step = 0, None
    model.train()
    for epoch in range(config.epochs):
        # one gather per epoch; the batches are then views of contiguous rows, which is
        # several times faster than indexing every batch
        permutation = torch.randperm(num_train, generator=order_generator).to(device)
        epoch_x = train_x.index_select(0, permutation)
        epoch_y = train_y.index_select(0, permutation)
        for start in range(0, num_train, config.batch_size):
            batch_x = epoch_x[start : start + config.batch_size]
            batch_y = epoch_y[start : start + config.batch_size]
            if len(batch_x) < 2:
                continue

            # forward and backward
            loss = F.cross_entropy(model(batch_x), batch_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            # divergence check: NaN, Inf or an exploding loss ends the run
            loss_value = loss.item()
            step_loss.append(loss_value)
            if not math.isfinite(loss_value) or loss_value > config.diverge_loss:
                diverged_step = step
                break
            if on_step is not None:
                on_step(step, total_steps)

            # periodic evaluation on the validation split
            if step % config.eval_every == 0 or step == total_steps:
                row = evaluation_row(model, step, epoch, step_loss, history, val_x, val_y)
                history.append(row)
                if not math.isfinite(row["val_loss"]):
                    diverged_step = step
                    break
                best_val_acc = max(best_val_acc, row["val_acc"])
        if diverged_step is not None:
            break

    splits = {
        "train": (train_x, train_y),
        "val": (val_x, val_y),
        "test": (data.test.x.to(device), data.test.y.to(device)),
    }
    if on_end is not None:
        on_end(model)
    final = final_metrics(model, splits, diverged_step is not None)
    final["best_val_acc"] = best_val_acc
    status = DIVERGED if diverged_step is not None else FINISHED
    if diverged_step is not None:
        logger.debug("run %s diverged at step %d (lr=%g)", config.key(), step, config.lr)
    return RunResult(
        status=status,
        steps=step,
        diverged_step=diverged_step,
        final=final,
        history=history,
        step_loss=step_loss,
        wall_time=time.perf_counter() - started,
    )


def evaluation_row(model, step, epoch, step_loss, history, val_x, val_y) -> dict:
    """Evaluate ``model`` on the validation split and return the history row of ``step``,
    with the mean training loss of the steps since the previous row."""
    since = history[-1]["step"] if history else 0
    recent = step_loss[since:step]
    val_loss, val_acc = evaluate(model, val_x, val_y)
    return {
        "step": step,
        "epoch": epoch + 1,
        "train_loss": sum(recent) / len(recent),
        "val_loss": val_loss,
        "val_acc": val_acc,
    }


def training_samples(config: TrainConfig, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the training split, cut to its first ``config.train_size`` samples."""
    x, y = data.train.x, data.train.y
    if config.train_size is None:
        return x, y
    if config.train_size > len(x):
        raise ValueError(
            f"train_size {config.train_size} exceeds the {len(x)} training samples of "
            f"{config.dataset}; use at most {len(x)} or None"
        )
    return x[: config.train_size], y[: config.train_size]


def final_metrics(model, splits: dict, diverged: bool) -> dict:
    """Return the final loss and accuracy of each split, ``{split}_loss`` and
    ``{split}_acc``, NaN for a diverged run."""
    final = {}
    for split, (x, y) in splits.items():
        if diverged:
            loss, acc = math.nan, math.nan
        else:
            loss, acc = evaluate(model, x, y)
        final[f"{split}_loss"] = loss
        final[f"{split}_acc"] = acc
    return final
