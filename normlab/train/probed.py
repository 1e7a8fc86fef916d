"""Classification runs that measure the network with probes while it trains.

A :class:`ProbedConfig` is a :class:`TrainConfig` plus the probes to run and how often.
:func:`train_probed` trains exactly as :func:`normlab.train.train_classifier` does (same
seeding, data order, updates, evaluation and divergence check) and, every
``probe_every`` steps, measures the model on the batch of the next update before that
update. The probes never touch the random number generators, so a probed run takes
the same updates as the same run without probes.

Probe values go into the run's history rows, keyed by ``step`` (the number of updates
taken before the probe, so step 0 is the initialization), next to the evaluation rows:

- ``"ics"``: for each linear layer after the first, numbered from 1 in forward order,
  ``ics_l2_layer{i}``, ``ics_cos_layer{i}`` and ``ics_grad_layer{i}`` from
  :func:`normlab.probes.ics_step` with the run's optimizer. The first layer is left out
  because its internal covariate shift is 0 by definition.
- ``"landscape"``: ``loss_variation``, ``grad_pred`` (gradient predictiveness) and
  ``beta`` (effective beta-smoothness) from :func:`normlab.probes.landscape_step`, with
  ``landscape_points`` step sizes from ``default_step_sizes(lr)``, and ``probe_loss``.
- ``"grad-ratio"``: ``grad_first`` and ``grad_last``, the L2 norms of the weight
  gradients of the first and the last linear layer in the training backward pass of
  that step, and ``grad_ratio = grad_first / grad_last``.

Each probe starts from the random state of the update that follows it, so dropout and
:class:`NoisyBatchNorm` draw the same masks and noise in the probe as in that update.
``noise_shift`` and ``noise_scale`` turn every BatchNorm layer into a
:class:`NoisyBatchNorm`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as TorchBatchNorm

from ..nn.batchnorm import _BatchNorm as NormlabBatchNorm
from ..probes import default_step_sizes, ics_step, landscape_step
from ..sweep import register_trainer
from .config import TrainConfig, register_config
from .loop import (
    DIVERGED,
    FINISHED,
    RunResult,
    build_model,
    build_optimizer,
    evaluation_row,
    final_metrics,
    training_samples,
)

PROBES = ("ics", "landscape", "grad-ratio")
NOISY_NORMS = ("batchnorm", "torch-batchnorm")


class NoisyBatchNorm(nn.Module):
    r"""A BatchNorm layer followed by noise that changes at every training step.

    In train mode the output is :math:`y = \mathrm{BN}(x) \cdot s + m`, where ``s`` and
    ``m`` hold one value per channel, drawn afresh at every forward pass from the
    global torch generator:

    - :math:`m_c \sim U(-\text{shift}, \text{shift})`, a non-zero mean;
    - :math:`s_c \sim U(1 - \text{scale}, 1 + \text{scale})`, a non-unit variance.

    All samples of a batch get the same ``s`` and ``m``, so the distribution of every
    channel moves as a whole from one step to the next. In eval mode the layer is the
    plain BatchNorm. Santurkar et al. (2018, https://arxiv.org/abs/1805.11604) inject
    such noise after BatchNorm to show that BatchNorm trains well even when the input
    distributions of later layers keep shifting. They draw the noise per sample and
    activation, while this module draws it per channel.

    Args:
        norm (nn.Module): the BatchNorm layer; its parameters and buffers stay in it.
        shift (float): half-width of the uniform distribution of ``m``, >= 0.
        scale (float): half-width of the uniform distribution of ``s``, in [0, 1).
    """

    def __init__(self, norm: nn.Module, shift: float, scale: float) -> None:
        super().__init__()
        if not (math.isfinite(shift) and shift >= 0):
            raise ValueError(f"shift must be a finite number >= 0, got {shift}")
        if not 0 <= scale < 1:
            raise ValueError(f"scale must be in [0, 1), got {scale}")
        self.norm = norm
        self.shift = float(shift)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if not self.training:
            return y
        # one value per channel, broadcast over the batch and any positions
        shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
        uniform = torch.rand((2,) + shape, device=y.device, dtype=y.dtype)
        m = (2 * uniform[0] - 1) * self.shift
        s = 1 + (2 * uniform[1] - 1) * self.scale
        return y * s + m

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}"


def add_batchnorm_noise(model: nn.Module, shift: float, scale: float) -> int:
    """Wrap every BatchNorm layer of ``model`` in a :class:`NoisyBatchNorm`, in place.

    The parameter order of ``named_parameters()`` stays the same, which the ICS probe
    relies on. Returns the number of wrapped layers.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (NormlabBatchNorm, TorchBatchNorm))
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, NoisyBatchNorm(module, shift, scale))
    return len(targets)


@register_config
@dataclass(frozen=True)
class ProbedConfig(TrainConfig):
    """A classification run with probes; see the module docstring for what they store.

    Attributes:
        probes: names from ``PROBES`` to run, in any order.
        probe_every: steps between two probes; the first probe runs at step 0.
        landscape_points: step sizes of the ``"landscape"`` probe, spread evenly on a
            log scale from 0.05 to 0.4 times ``lr``.
        max_steps: stop after this many updates even when epochs remain; None trains
            every epoch.
        noise_shift: half-width of the per-channel shift of :class:`NoisyBatchNorm`.
        noise_scale: half-width of its per-channel scale around 1, in [0, 1). When
            either is above 0, every BatchNorm layer becomes a noisy one, and ``norm``
            must be ``"batchnorm"`` or ``"torch-batchnorm"``.
    """

    task: ClassVar[str] = "classify-probed"

    probes: tuple[str, ...] = ()
    probe_every: int = 10
    landscape_points: int = 4
    max_steps: Optional[int] = None
    noise_shift: float = 0.0
    noise_scale: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "probes", tuple(self.probes))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for probe in self.probes:
            if probe not in PROBES:
                raise ValueError(
                    f"probes must be names from {', '.join(PROBES)}, got {probe!r}"
                )
        for name in ("probe_every", "landscape_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.landscape_points < 2:
            raise ValueError(
                f"landscape_points must be at least 2, got {self.landscape_points}"
            )
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(
                f"max_steps must be None or a positive integer, got {self.max_steps!r}"
            )
        if not (math.isfinite(self.noise_shift) and self.noise_shift >= 0):
            raise ValueError(f"noise_shift must be >= 0, got {self.noise_shift!r}")
        if not 0 <= self.noise_scale < 1:
            raise ValueError(f"noise_scale must be in [0, 1), got {self.noise_scale!r}")
        if self.noisy and self.norm not in NOISY_NORMS:
            raise ValueError(
                f"noise_shift and noise_scale apply to norm batchnorm or "
                f"torch-batchnorm, got norm {self.norm!r}; set both to 0"
            )

    @property
    def noisy(self) -> bool:
        return self.noise_shift > 0 or self.noise_scale > 0

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["probes"] = list(self.probes)
        return data

    @classmethod
    def from_train_config(cls, config: TrainConfig, **changes) -> "ProbedConfig":
        """Return the probed run of ``config``, with ``changes`` applied."""
        return cls(**{**config.to_dict(), **changes})


def train_probed(config: ProbedConfig, data) -> RunResult:
    """Train the classifier of ``config`` on ``data`` and run its probes.

    Seeding follows :func:`normlab.train.train_classifier`: every random number comes
    from generators seeded by ``config.seed`` inside :func:`torch.random.fork_rng`, so
    the same config gives the same numbers and the caller's random state is left alone.
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {config.device!r} requested but CUDA is not available; "
            "use --device cpu"
        )
    device = torch.device(config.device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return _train_probed(config, data, device)


def _train_probed(config: ProbedConfig, data, device: torch.device) -> RunResult:
    started = time.perf_counter()
    model = build_model(config, data)
    if config.noisy:
        add_batchnorm_noise(model, config.noise_shift, config.noise_scale)
    model = model.to(device)
    optimizer = build_optimizer(config, model)
    order_generator = torch.Generator().manual_seed(config.seed)
    linear_layers = [m for m in model.modules() if isinstance(m, nn.Linear)]

    train_x, train_y = training_samples(config, data)
    train_x, train_y = train_x.to(device), train_y.to(device)
    val_x, val_y = data.val.x.to(device), data.val.y.to(device)
    num_train = len(train_x)
    # as in train_classifier, a last batch of one sample is dropped
    full_batches, remainder = divmod(num_train, config.batch_size)
    steps_per_epoch = full_batches + (remainder > 1)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    rows: dict[int, dict] = {}
    evaluations: list[dict] = []
    step_loss: list[float] = []
    best_val_acc = 0.0
    step, diverged_step = 0, None
    model.train()
    for epoch in range(config.epochs):
        permutation = torch.randperm(num_train, generator=order_generator).to(device)
        epoch_x = train_x.index_select(0, permutation)
        epoch_y = train_y.index_select(0, permutation)
        for start in range(0, num_train, config.batch_size):
            if step >= total_steps:
                break
            batch_x = epoch_x[start : start + config.batch_size]
            batch_y = epoch_y[start : start + config.batch_size]
            if len(batch_x) < 2:
                continue

            # probes that look at the model before this step's update
            probe_row = None
            if step % config.probe_every == 0:
                probe_row = _history_row(rows, step, steps_per_epoch)
                _run_model_probes(config, model, optimizer, batch_x, batch_y, probe_row)

            loss = F.cross_entropy(model(batch_x), batch_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if probe_row is not None and "grad-ratio" in config.probes:
                probe_row.update(_gradient_ratio(linear_layers))
            optimizer.step()
            step += 1

            loss_value = loss.item()
            step_loss.append(loss_value)
            if not math.isfinite(loss_value) or loss_value > config.diverge_loss:
                diverged_step = step
                break

            if step % config.eval_every == 0 or step == total_steps:
                row = evaluation_row(
                    model, step, epoch, step_loss, evaluations, val_x, val_y
                )
                evaluations.append(row)
                _history_row(rows, step, steps_per_epoch).update(row)
                if not math.isfinite(row["val_loss"]):
                    diverged_step = step
                    break
                best_val_acc = max(best_val_acc, row["val_acc"])
        if diverged_step is not None or step >= total_steps:
            break

    splits = {
        "train": (train_x, train_y),
        "val": (val_x, val_y),
        "test": (data.test.x.to(device), data.test.y.to(device)),
    }
    final = final_metrics(model, splits, diverged_step is not None)
    final["best_val_acc"] = best_val_acc
    return RunResult(
        status=DIVERGED if diverged_step is not None else FINISHED,
        steps=step,
        diverged_step=diverged_step,
        final=final,
        history=[rows[s] for s in sorted(rows)],
        step_loss=step_loss,
        wall_time=time.perf_counter() - started,
    )


def _history_row(rows: dict[int, dict], step: int, steps_per_epoch: int) -> dict:
    """Return the history row of ``step``, created with the epoch that contains it."""
    if step not in rows:
        # the epoch of the step's update, as in the evaluation rows; step 0 is epoch 0
        epoch = 0 if step == 0 else (step - 1) // steps_per_epoch + 1
        rows[step] = {"step": step, "epoch": epoch}
    return rows[step]


def _run_model_probes(config, model, optimizer, batch_x, batch_y, row: dict) -> None:
    if "ics" in config.probes:
        measured = ics_step(model, None, F.cross_entropy, batch_x, batch_y, optimizer)
        for index, layer in enumerate(measured[1:], start=2):
            row[f"ics_l2_layer{index}"] = layer["l2"]
            row[f"ics_cos_layer{index}"] = layer["cosine"]
            row[f"ics_grad_layer{index}"] = layer["grad_norm"]
    if "landscape" in config.probes:
        step_sizes = default_step_sizes(config.lr, config.landscape_points)
        measured = landscape_step(model, F.cross_entropy, batch_x, batch_y, step_sizes)
        row["probe_loss"] = measured["loss"]
        row["loss_variation"] = measured["loss_variation"]
        row["grad_pred"] = measured["gradient_predictiveness"]
        row["beta"] = measured["beta_smoothness"]


def _gradient_ratio(linear_layers: list[nn.Linear]) -> dict:
    first = _weight_grad_norm(linear_layers[0])
    last = _weight_grad_norm(linear_layers[-1])
    ratio = first / last if last > 0 else math.nan
    return {"grad_first": first, "grad_last": last, "grad_ratio": ratio}


def _weight_grad_norm(layer: nn.Linear) -> float:
    grad = layer.weight.grad
    if grad is None:
        return math.nan
    return float(grad.detach().to(torch.float64).norm())


register_trainer(ProbedConfig.task, train_probed)

__all__ = [
    "NoisyBatchNorm",
    "PROBES",
    "ProbedConfig",
    "add_batchnorm_noise",
    "train_probed",
]
