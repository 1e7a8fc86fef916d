"""Train a group of classification runs at once, as one batched computation.

The claims train one MLP under many settings: learning rates, seeds, init scales.
:func:`train_classifiers` trains K such configs together. Every tensor of the model and
the optimizer gets a leading run dimension of size K, linear layers become ``torch.bmm``
and BatchNorm takes its statistics per run. Each run keeps its own parameters, running
statistics, momentum buffers and data order, and gets the ``RunResult`` that
:func:`normlab.train.train_classifier` returns for the same config.

Each run's slice goes through the tensor operations that the one-run trainer applies,
and the losses are summed per run by the same ``nll_loss`` calls. On the CPU with torch
2.13, a group's results are therefore bit-equal to one-by-one training when normlab's
BatchNorm runs its pure-PyTorch path (``_BatchNormFunction``), which the batched
BatchNorm mirrors, and always for configs without normalization.

NOTE: normlab's BatchNorm may run C++ kernels instead (its backend ``"auto"``), which
round differently. BatchNorm runs then agree with one-by-one training to float rounding
only. A run near the edge of stability amplifies that rounding and can end with another
accuracy or status, as it would with another thread count. The sweep trains every config
that has a group key here, alone or in a group, so a stored run's numbers do not depend on
the other runs pending with it.

:func:`group_key` decides which configs can share a group: they must differ only in the
fields of ``BATCHED_FIELDS``. Configs with dropout, a CNN, Adam or a normalization other
than normlab's BatchNorm or none get the key None and train alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.batchnorm import BatchNorm1d
from .config import TrainConfig
from .loop import (
    DIVERGED,
    EVAL_CHUNK,
    FINISHED,
    RunResult,
    build_model,
    training_samples,
)

logger = logging.getLogger(__name__)

# config fields that may differ between the runs of one group
BATCHED_FIELDS = ("lr", "init_scale", "seed", "weight_decay")
BATCHED_NORMS = ("batchnorm", "none")

# NOTE: measured on 2026-12-04 with benchmarks/sweep_speed.py on a shared 2-core AMD
# EPYC, one torch thread, torch 2.13 and digits. The one-by-one / batched time ratio of
# the quick higher-lr and init-insensitivity grids was 3.1 and 2.9 with groups of at
# most 16 runs, 3.3 and 3.2 with 20, and 3.6 and 3.2 with 40. The time per run is about
# flat from 16 to 40 runs per group, so 40 gains by leaving fewer small remainder groups,
# because each grid has 20 or 40 configs per group key. Sweeps with many worker
# processes may prefer smaller groups, so that every worker gets one.
MAX_GROUP = 40

# rows of activations, summed over the runs, that one batched evaluation computes at once
EVAL_ROWS = 2048

_ACTIVATIONS = {nn.ReLU: torch.relu, nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh}
# the in-place forms, for evaluation, where no backward needs the input
_INPLACE_ACTIVATIONS = {
    nn.ReLU: torch.relu_,
    nn.Sigmoid: torch.sigmoid_,
    nn.Tanh: torch.tanh_,
}


def group_key(config) -> tuple | None:
    """Return the key of the group ``config`` can train in, or None to train it alone.

    Configs with equal keys differ at most in ``lr``, ``init_scale``, ``seed`` and
    ``weight_decay``, and :func:`train_classifiers` trains them together. The key is None
    for anything other than an MLP without dropout, trained by SGD, with normlab's
    BatchNorm or no normalization.
    """
    if type(config) is not TrainConfig:
        return None
    if config.model != "mlp" or config.optimizer != "sgd" or config.dropout != 0.0:
        return None
    if config.norm not in BATCHED_NORMS:
        return None
    shared = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in BATCHED_FIELDS
    }
    return (config.task,) + tuple(sorted(shared.items()))


def train_classifiers(configs: Sequence[TrainConfig], data) -> list[RunResult]:
    """Train ``configs`` together on ``data`` and return their results in the same order.

    Every config must have the same non-None :func:`group_key`. A run that diverges stops
    there, as in :func:`normlab.train.train_classifier`, and leaves the batch, so the others
    go on with fewer runs. Each result's ``wall_time`` is the group's time divided by the
    number of configs.

    Raises:
        ValueError: if a config cannot be batched or the configs differ in a field
            outside ``BATCHED_FIELDS``.
    """
    configs = list(configs)
    if not configs:
        return []
    _check_group(configs)
    first = configs[0]
    if first.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {first.device!r} requested but CUDA is not available; use --device cpu"
        )
    started = time.perf_counter()
    # NOTE: only CPU results were compared with one-by-one training. On CUDA, batched
    # matrix products may round otherwise than the one-run trainer's.
    device = torch.device(first.device)
    group = _GroupTraining(configs, data, device)
    group.train()
    results = group.results()
    wall_time = (time.perf_counter() - started) / len(configs)
    for result in results:
        result.wall_time = wall_time
    return results


def _check_group(configs: Sequence[TrainConfig]) -> None:
    keys = [group_key(config) for config in configs]
    for config, key in zip(configs, keys):
        if key is None:
            raise ValueError(
                f"config {config.key()} (model {config.model!r}, norm {config.norm!r}, "
                f"optimizer {config.optimizer!r}, dropout {config.dropout}) cannot be "
                "batched; train it with train_classifier"
            )
    first = dataclasses.asdict(configs[0])
    for config, key in zip(configs[1:], keys[1:]):
        if key != keys[0]:
            other = dataclasses.asdict(config)
            fields = [name for name in first if first[name] != other[name]]
            differing = [name for name in fields if name not in BATCHED_FIELDS]
            raise ValueError(
                f"configs of one group may differ only in {', '.join(BATCHED_FIELDS)}, "
                f"but config {config.key()} differs from the first in "
                f"{', '.join(differing)}; group them by group_key"
            )


class _BatchNormFunction(torch.autograd.Function):
    """normlab's BatchNorm in training mode for K runs at once, with input (K, N, C).

    Each run's slice goes through the operations of ``normlab.nn.batchnorm``'s
    ``_BatchNormFunction`` for a float32 input with weight and bias, with the batch
    dimension 1 in place of 0, so its output and gradients are the same numbers.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        # the corrected two-pass statistics of normlab's _batch_statistics
        rough_mean = input.mean(dim=1)
        centered = input - rough_mean.unsqueeze(1)
        offset = centered.mean(dim=1)
        var = centered.square().mean(dim=1) - offset.square()
        var = var.clamp_min_(0)
        mean = rough_mean + offset

        # running update with the unbiased variance, as _update_running_stats does it
        num_values = input.size(1)
        unbiased_var = var * (num_values / (num_values - 1))
        keep = 1 - momentum
        running_mean.copy_(mean * momentum + running_mean * keep)
        running_var.copy_(unbiased_var * momentum + running_var * keep)

        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight
        shift = -offset * scale
        shift = shift + bias
        output = torch.addcmul(shift.unsqueeze(1), centered, scale.unsqueeze(1))
        ctx.save_for_backward(centered, weight, offset, invstd)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        centered, weight, offset, invstd = ctx.saved_tensors
        num_values = centered.size(1)
        grad = grad_output.contiguous()

        grad_sum = grad.sum(dim=1)
        grad_dot_centered = (grad * centered).sum(dim=1)
        grad_dot_centered = grad_dot_centered - offset * grad_sum
        grad_weight = grad_dot_centered * invstd
        grad_bias = grad_sum

        # dx = a * g + b * (x - mean) - a * sum(g) / M per channel, see normlab's backward
        input_scale = invstd * weight
        centered_coef = -input_scale * invstd.square() * grad_dot_centered
        centered_coef = centered_coef / num_values
        constant = -input_scale * grad_sum / num_values - centered_coef * offset
        grad_input = grad.mul(input_scale.unsqueeze(1))
        grad_input.addcmul_(centered, centered_coef.unsqueeze(1))
        grad_input.add_(constant.unsqueeze(1))
        return grad_input, grad_weight, grad_bias, None, None, None, None


class _LinearFunction(torch.autograd.Function):
    """``F.linear`` for K runs at once: input (K, N, in), weight (K, out, in), bias (K, out).

    The backward computes the weight gradient as ``grad^T @ input``, the product that
    autograd's ``addmm`` backward picks for a transposed weight. ``torch.bmm``'s own
    backward computes ``(input^T @ grad)^T``, which the BLAS can round differently.
    """

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        weight_t = weight.transpose(1, 2)
        if bias is None:
            return torch.bmm(input, weight_t)
        return torch.baddbmm(bias.unsqueeze(1), input, weight_t)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.bmm(grad_output, weight)
        grad_weight = torch.bmm(grad_output.transpose(1, 2), input)
        if ctx.has_bias:
            grad_bias = grad_output.sum(dim=1)
        return grad_input, grad_weight, grad_bias


@dataclass
class _Layer:
    """One layer of the batched MLP, with its tensors stacked over the runs."""

    kind: str  # "linear", "batchnorm" or "activation"
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    momentum: float | None = None
    eps: float = 0.0
    activation: type | None = None  # the module class, a key of _ACTIVATIONS

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def select(self, index: torch.Tensor) -> None:
        """Keep the runs at positions ``index``."""
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(self, name)
            if tensor is not None:
                kept = tensor.detach().index_select(0, index)
                setattr(self, name, kept.requires_grad_(tensor.requires_grad))


class _BatchedMLP:
    """K copies of normlab's MLP with the layers of ``models``, trained side by side."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.layers: list[_Layer] = []
        self.num_batches_tracked = 0
        for modules in zip(*(model.layers for model in models)):
            layer = _stack_layer(modules)
            if layer is not None:
                self.layers.append(layer)

    def parameters(self) -> list[torch.Tensor]:
        return [p for layer in self.layers for p in layer.parameters()]

    def select(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the training-mode logits ``(K, N, classes)`` of input ``(K, N, in)``.

        BatchNorm normalizes with the batch statistics and updates its running ones.
        """
        self.num_batches_tracked += 1
        for layer in self.layers:
            if layer.kind == "linear":
                x = _LinearFunction.apply(x, layer.weight, layer.bias)
            elif layer.kind == "activation":
                x = _ACTIVATIONS[layer.activation](x)
            else:
                x = self._batch_norm(layer, x)
        return x

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, runs: slice) -> torch.Tensor:
        """Return the eval-mode logits ``(R, N, classes)`` of the runs in ``runs``.

        ``x`` is one input ``(N, in_features)``, the same for every run.
        """
        num_runs = self.layers[0].weight[runs].size(0)
        x = x.unsqueeze(0).expand(num_runs, -1, -1)
        for layer in self.layers:
            if layer.kind == "linear":
                weight_t = layer.weight[runs].transpose(1, 2)
                if layer.bias is None:
                    x = torch.bmm(x, weight_t)
                else:
                    x = torch.baddbmm(layer.bias[runs].unsqueeze(1), x, weight_t)
            elif layer.kind == "activation":
                x = _INPLACE_ACTIVATIONS[layer.activation](x)
            else:
                x = self._eval_batch_norm(layer, x, runs)
        return x

    def _batch_norm(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        momentum = layer.momentum
        if momentum is None:
            # a cumulative moving average, as BatchNorm does with momentum=None
            momentum = 1.0 / float(self.num_batches_tracked)
        return _BatchNormFunction.apply(
            x,
            layer.weight,
            layer.bias,
            layer.running_mean,
            layer.running_var,
            momentum,
            layer.eps,
        )

    @staticmethod
    def _eval_batch_norm(layer: _Layer, x: torch.Tensor, runs: slice) -> torch.Tensor:
        # normalize with the running statistics, by the operations of normlab's eval mode
        invstd = torch.rsqrt(layer.running_var[runs] + layer.eps)
        scale = invstd * layer.weight[runs]
        shift = -layer.running_mean[runs] * scale
        shift = shift + layer.bias[runs]
        return torch.addcmul(shift.unsqueeze(1), x, scale.unsqueeze(1))


def _stack_layer(modules: Sequence[nn.Module]) -> _Layer | None:
    """Return the batched form of one layer taken from every run's model."""
    first = modules[0]
    if isinstance(first, (nn.Flatten, nn.Identity)):
        return None
    if isinstance(first, nn.Linear):
        return _Layer(
            "linear",
            weight=_stack([m.weight for m in modules], grad=True),
            bias=None
            if first.bias is None
            else _stack([m.bias for m in modules], True),
        )
    if isinstance(first, BatchNorm1d) and first.affine and first.track_running_stats:
        return _Layer(
            "batchnorm",
            weight=_stack([m.weight for m in modules], grad=True),
            bias=_stack([m.bias for m in modules], grad=True),
            running_mean=_stack([m.running_mean for m in modules], grad=False),
            running_var=_stack([m.running_var for m in modules], grad=False),
            momentum=first.momentum,
            eps=first.eps,
        )
    if type(first) in _ACTIVATIONS:
        return _Layer("activation", activation=type(first))
    raise ValueError(
        f"layer {first!r} of the MLP has no batched form; train this config with "
        "train_classifier"
    )


def _stack(tensors: Sequence[torch.Tensor], grad: bool) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors]).requires_grad_(grad)


class _BatchedSGD:
    """torch.optim.SGD (its single-tensor path) for K runs with their own lr and decay.

    ``momentum`` is shared by the group, and dampening is 0 and Nesterov off, as
    :func:`normlab.train.loop.build_optimizer` sets them.
    """

    def __init__(self, params, lrs, weight_decays, momentum: float) -> None:
        self.params = params
        self.momentum = momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(params)
        self.set_rates(lrs, weight_decays)

    def set_rates(self, lrs: torch.Tensor, weight_decays: torch.Tensor) -> None:
        self.lrs = lrs
        self.weight_decays = weight_decays
        self.decay = bool((weight_decays != 0).any())
        # per parameter, the rates shaped to broadcast over its (K, ...) tensor
        shapes = [(-1,) + (1,) * (param.dim() - 1) for param in self.params]
        self.neg_lr_views = [lrs.neg().view(shape) for shape in shapes]
        self.decay_views = [weight_decays.view(shape) for shape in shapes]

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = param.grad
            if self.decay:
                # grad + wd * param, bit-equal to grad.add(param, alpha=wd) per run
                grad = torch.addcmul(grad, param, self.decay_views[i])
            if self.momentum != 0:
                if self.buffers[i] is None:
                    self.buffers[i] = grad.detach().clone()
                else:
                    self.buffers[i].mul_(self.momentum).add_(grad)
                grad = self.buffers[i]
            # bit-equal to param.add_(grad, alpha=-lr) per run
            param.addcmul_(grad, self.neg_lr_views[i])

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def select(self, params, index: torch.Tensor) -> None:
        self.params = params
        self.buffers = [
            None if buffer is None else buffer.index_select(0, index)
            for buffer in self.buffers
        ]
        self.set_rates(
            self.lrs.index_select(0, index), self.weight_decays.index_select(0, index)
        )


@dataclass
class _RunRecord:
    """The metrics of one run so far, as the one-run trainer collects them."""

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    best_val_acc: float = 0.0
    steps: int = 0
    diverged_step: int | None = None
    final: dict = field(default_factory=dict)


class _GroupTraining:
    """The training loop of :func:`normlab.train.train_classifier` for a group of runs."""

    def __init__(
        self, configs: Sequence[TrainConfig], data, device: torch.device
    ) -> None:
        self.config = configs[0]
        self.device = device
        self.runs = [_RunRecord(config) for config in configs]
        # positions in self.runs of the runs still training, in batch order
        self.active = list(range(len(configs)))

        models = [_build_seeded(config, data, device) for config in configs]
        self.model = _BatchedMLP(models)
        self.optimizer = _BatchedSGD(
            self.model.parameters(),
            lrs=torch.tensor([c.lr for c in configs], device=device),
            weight_decays=torch.tensor(
                [c.weight_decay for c in configs], device=device
            ),
            momentum=self.config.momentum,
        )
        self.generators = [torch.Generator().manual_seed(c.seed) for c in configs]

        train_x, train_y = training_samples(self.config, data)
        self.train_x = train_x.to(device).flatten(1)
        self.train_y = train_y.to(device)
        self.val = (data.val.x.to(device).flatten(1), data.val.y.to(device))
        self.test = (data.test.x.to(device).flatten(1), data.test.y.to(device))

    def train(self) -> None:
        config = self.config
        num_train = len(self.train_x)
        # a last batch of one sample has no batch statistics, so it is dropped
        steps_per_epoch = num_train // config.batch_size + (
            num_train % config.batch_size > 1
        )
        self.total_steps = steps_per_epoch * config.epochs
        step = 0
        for epoch in range(config.epochs):
            if not self.active:
                break
            # one gather per epoch, each run in the order of its own generator
            permutations = [
                torch.randperm(num_train, generator=self.generators[run])
                for run in self.active
            ]
            order = torch.stack(permutations).to(self.device)
            self.epoch_x = self.train_x[order]
            self.epoch_y = self.train_y[order]
            for start in range(0, num_train, config.batch_size):
                if start + 2 > num_train:
                    continue
                step += 1
                self._step(step, epoch, start)
                if not self.active:
                    break

        final_splits = {
            "train": (self.train_x, self.train_y),
            "val": self.val,
            "test": self.test,
        }
        for split, (x, y) in final_splits.items():
            losses, accs = self._evaluate(x, y)
            for run, loss, acc in zip(self.active, losses, accs):
                self.runs[run].final[f"{split}_loss"] = loss
                self.runs[run].final[f"{split}_acc"] = acc

    def _step(self, step: int, epoch: int, start: int) -> None:
        config = self.config
        batch_x = self.epoch_x[:, start : start + config.batch_size]
        batch_y = self.epoch_y[:, start : start + config.batch_size]

        # forward and backward; the sum of the runs' mean losses gives each run its gradient
        log_probs = F.log_softmax(self.model.forward(batch_x), dim=-1)
        picked = log_probs.gather(2, batch_y.unsqueeze(2)).squeeze(2)
        loss = -picked.mean(dim=1)
        self.optimizer.zero_grad()
        loss.sum().backward()
        self.optimizer.step()

        # divergence check: NaN, Inf or an exploding loss ends that run only
        loss_values = _nll_per_run(log_probs.detach(), batch_y, "mean")
        kept = []
        for position, run in enumerate(self.active):
            record = self.runs[run]
            record.steps = step
            record.step_loss.append(loss_values[position])
            value = loss_values[position]
            if not math.isfinite(value) or value > config.diverge_loss:
                record.diverged_step = step
            else:
                kept.append(position)
        self._keep(kept)

        # periodic evaluation on the validation split
        if self.active and (step % config.eval_every == 0 or step == self.total_steps):
            self._evaluation_rows(step, epoch)

    def _evaluation_rows(self, step: int, epoch: int) -> None:
        val_losses, val_accs = self._evaluate(*self.val)
        kept = []
        for position, run in enumerate(self.active):
            record = self.runs[run]
            since = record.history[-1]["step"] if record.history else 0
            recent = record.step_loss[since:step]
            record.history.append(
                {
                    "step": step,
                    "epoch": epoch + 1,
                    "train_loss": sum(recent) / len(recent),
                    "val_loss": val_losses[position],
                    "val_acc": val_accs[position],
                }
            )
            if not math.isfinite(val_losses[position]):
                record.diverged_step = step
            else:
                record.best_val_acc = max(record.best_val_acc, val_accs[position])
                kept.append(position)
        self._keep(kept)

    def _keep(self, positions: list[int]) -> None:
        """Drop every active run whose batch position is not in ``positions``."""
        if len(positions) == len(self.active):
            return
        for position, run in enumerate(self.active):
            if position not in positions:
                logger.debug(
                    "run %s diverged at step %d (lr=%g)",
                    self.runs[run].config.key(),
                    self.runs[run].diverged_step,
                    self.runs[run].config.lr,
                )
        self.active = [self.active[p] for p in positions]
        if not positions:
            return
        index = torch.tensor(positions, device=self.device)
        self.model.select(index)
        self.optimizer.select(self.model.parameters(), index)
        self.epoch_x = self.epoch_x.index_select(0, index)
        self.epoch_y = self.epoch_y.index_select(0, index)

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list, list]:
        """Return each active run's (mean cross-entropy, accuracy) in eval mode."""
        num_runs = len(self.active)
        loss_sums = [0.0] * num_runs
        corrects = [0] * num_runs
        for start in range(0, len(x), EVAL_CHUNK):
            chunk = x[start : start + EVAL_CHUNK]
            target = y[start : start + EVAL_CHUNK]
            # a few runs at a time, so that the activations stay in the CPU caches
            runs_per_piece = max(1, EVAL_ROWS // len(chunk))
            for first in range(0, num_runs, runs_per_piece):
                runs = slice(first, first + runs_per_piece)
                logits = self.model.evaluate(chunk, runs)
                log_probs = F.log_softmax(logits, dim=-1)
                targets = target.unsqueeze(0).expand(len(logits), -1)
                sums = _nll_per_run(log_probs, targets, "sum")
                correct = (logits.argmax(2) == target).sum(1).tolist()
                for offset in range(len(logits)):
                    loss_sums[first + offset] += sums[offset]
                    corrects[first + offset] += correct[offset]
        losses = [loss_sum / len(x) for loss_sum in loss_sums]
        accs = [correct / len(x) for correct in corrects]
        return losses, accs

    def results(self) -> list[RunResult]:
        results = []
        for record in self.runs:
            diverged = record.diverged_step is not None
            if diverged:
                final = {
                    f"{split}_{metric}": math.nan
                    for split in ("train", "val", "test")
                    for metric in ("loss", "acc")
                }
            else:
                final = dict(record.final)
            final["best_val_acc"] = record.best_val_acc
            results.append(
                RunResult(
                    status=DIVERGED if diverged else FINISHED,
                    steps=record.steps,
                    diverged_step=record.diverged_step,
                    final=final,
                    history=record.history,
                    step_loss=record.step_loss,
                )
            )
        return results


def _nll_per_run(log_probs: torch.Tensor, target: torch.Tensor, reduction: str) -> list:
    # one nll_loss call per run, because its sum over the batch runs in an order that a
    # batched sum does not reproduce, and the recorded losses should match bit for bit
    losses = [
        F.nll_loss(log_probs[k], target[k], reduction=reduction)
        for k in range(len(log_probs))
    ]
    return torch.stack(losses).tolist()


def _build_seeded(config: TrainConfig, data, device: torch.device) -> nn.Module:
    """Build the model of ``config`` with the weights the one-run trainer starts from."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return build_model(config, data).to(device)
