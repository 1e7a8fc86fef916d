"""Dropout before BN hurts, because it shifts BN's input variance (Li et al., 2019).

Li, Chen, Hu and Yang (2019, "Understanding the Disharmony between Dropout and Batch
Normalization by Variance Shift", CVPR) argue that dropout placed before a BatchNorm
layer changes the variance of that layer's input between training and test. In
training, inverted dropout keeps each unit with probability 1 - p and scales it by
1 / (1 - p), which raises the variance of a unit h from Var[h] to E[h^2] / (1 - p) -
E[h]^2. BatchNorm normalizes with that larger variance in training and accumulates it
in its running variance. In eval mode dropout is off, so the input has the smaller
variance Var[h], and dividing by the running statistics scales it down.

Hypothesis: an MLP with dropout directly before each BatchNorm layer reaches a lower
validation accuracy in eval mode than the same MLP with dropout at the end of each
block, after the activation, at dropout rate 0.5.

Grid: the MLP 100-100 with BatchNorm in Linear -> BN -> ReLU order, SGD momentum 0.9 at
lr 0.1 and the budget of the data set. Conditions: no dropout, and dropout "before"
(Linear -> Dropout -> BN -> ReLU) or "after" (Linear -> BN -> ReLU -> Dropout) at the
rates 0.1 and 0.5 (quick) or 0.05, 0.1, 0.2, 0.3 and 0.5 (full), each over the seeds.
In the "after" layout the second BN layer still receives the dropout of the first
block through the second linear layer.

Measurement: after training, :func:`measure_variance_shift` records the input of every
BatchNorm layer with a forward pre-hook on the held-out validation split, once with the
whole model in eval mode and ``VARIANCE_PASSES`` (4) times with only the dropout layers
in train mode. Per layer, the variance shift is mean over units of the train-mode
variance / mean over units of the eval-mode variance: how much larger the variance that
BN normalizes with in training is than the one its input has at test time. The running
shift is mean(running_var) / mean of the eval-mode variance, the mismatch that eval mode
applies. Both are 1 without dropout.

Metric: final validation accuracy in eval mode, where a diverged run counts as chance
accuracy. The effect is acc(after, 0.5) - acc(before, 0.5), in accuracy (1.0 = 100
points), paired by seed. The variance shifts of every condition are in the details.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.01 (1 accuracy point). NOT SUPPORTED when the upper
end of the interval is below 0.01. INCONCLUSIVE otherwise, or when no seed has both
runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..report import plots
from ..sweep import register_trainer
from ..train import loop
from ..train.config import TrainConfig, register_config
from .base import Claim, StudyContext, Verdict
from .budget import BN, base_config
from .stats import accuracy_table, decide_effects

# the config fields that tell this grid's cells apart, for accuracy_table
TABLE_FIELDS = ("dropout_position", "dropout")

BEFORE, AFTER = "before", "after"
POSITIONS = (BEFORE, AFTER)
POSITION_LABELS = {
    BEFORE: "dropout before BN",
    AFTER: "dropout after the block",
}
POSITION_COLORS = {BEFORE: "tab:red", AFTER: "tab:green"}
RATES = {"quick": [0.1, 0.5], "full": [0.05, 0.1, 0.2, 0.3, 0.5]}
DECISION_RATE = 0.5
VARIANCE_PASSES = 4
LR = 0.1
MIN_EFFECT = 0.01  # accuracy, 1 point
HIDDEN_LAYERS = 2  # BatchNorm layers of the MLP 100-100


@register_config
@dataclass(frozen=True)
class VarianceShiftConfig(TrainConfig):
    """A classification run followed by a variance-shift measurement of its BN layers.

    The run trains exactly as the :class:`TrainConfig` with the same fields. Then
    :func:`measure_variance_shift` adds ``var_shift_bn{i}`` and ``running_shift_bn{i}``
    (i = 1, 2, ... in forward order) to the final metrics of a finished run.

    Attributes:
        variance_passes: passes over the validation split with dropout active.
    """

    task: ClassVar[str] = "classify-variance-shift"

    variance_passes: int = VARIANCE_PASSES

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.variance_passes, int) or self.variance_passes < 1:
            raise ValueError(
                f"variance_passes must be a positive integer, got "
                f"{self.variance_passes!r}"
            )


def train_with_variance_shift(config: VarianceShiftConfig, data) -> loop.RunResult:
    """Train ``config`` with ``train_classifier``, then measure the variance shift.

    A diverged run gets no measurement.
    """
    models: list[nn.Module] = []
    result = loop.train_classifier(config, data, on_end=models.append)
    if result.status == loop.FINISHED:
        device = torch.device(config.device)
        shifts = measure_variance_shift(
            models[-1], data.val.x.to(device), config.variance_passes, config.seed
        )
        result.final.update(shifts)
    return result


register_trainer(VarianceShiftConfig.task, train_with_variance_shift)


def measure_variance_shift(
    model: nn.Module, x: torch.Tensor, passes: int = VARIANCE_PASSES, seed: int = 0
) -> dict[str, float]:
    """Measure the variance shift and running shift of every BN layer of ``model``.

    The input of each layer with a ``running_var`` is recorded on ``x`` with the model
    in eval mode, then over ``passes`` forward passes with only the ``nn.Dropout``
    layers in train mode. BatchNorm uses its running statistics in both, so dropout is
    the only difference. For layer i (from 1, in forward order) the result holds
    ``var_shift_bn{i}`` = mean train-mode variance / mean eval-mode variance over units,
    and ``running_shift_bn{i}`` = mean running_var / mean eval-mode variance. Dropout
    masks come from a generator seeded by ``seed`` inside ``fork_rng``, so the caller's
    random state is left alone. The model's train or eval mode is restored. Both ratios
    are NaN for a layer whose input has zero variance in eval mode.
    """
    norms = [m for m in model.modules() if getattr(m, "running_var", None) is not None]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    inputs: dict[int, list[torch.Tensor]] = {}

    def recorder(index):
        def hook(module, args):
            inputs.setdefault(index, []).append(args[0].detach().flatten(1))

        return hook

    handles = [
        norm.register_forward_pre_hook(recorder(i)) for i, norm in enumerate(norms)
    ]
    modes = {m: m.training for m in model.modules()}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.eval()
            model(x)
            eval_var = {i: _unit_variance(v) for i, v in inputs.items()}
            inputs.clear()
            for dropout in dropouts:
                dropout.train()
            for _ in range(passes):
                model(x)
            train_var = {i: _unit_variance(v) for i, v in inputs.items()}
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)

    shifts = {}
    for i, norm in enumerate(norms):
        reference = eval_var[i].mean().item()
        running = norm.running_var.float().mean().item()
        train = train_var[i].mean().item()
        # an input that is constant in eval mode has no variance to compare with
        if reference > 0:
            shifts[f"var_shift_bn{i + 1}"] = train / reference
            shifts[f"running_shift_bn{i + 1}"] = running / reference
        else:
            shifts[f"var_shift_bn{i + 1}"] = math.nan
            shifts[f"running_shift_bn{i + 1}"] = math.nan
    return shifts


def _unit_variance(batches: list[torch.Tensor]) -> torch.Tensor:
    """Return the variance of each unit over all samples of ``batches``."""
    return torch.cat(batches).float().var(dim=0, unbiased=False)


def conditions(scale: str) -> list[tuple[str, float]]:
    """Return the ``(dropout position, rate)`` pairs of ``scale``, no dropout first.

    No dropout is one run, stored with the default position ``"after"``.
    """
    return [(AFTER, 0.0)] + [(p, r) for p in POSITIONS for r in RATES[scale]]


def condition_name(position: str, rate: float) -> str:
    return "no dropout" if rate == 0 else f"{position}, rate {rate:g}"


class Dropout(Claim):
    id = "dropout"
    statement = (
        "Dropout before BatchNorm hurts eval accuracy compared with dropout after it, "
        "because dropout shifts the variance that BatchNorm sees between training and "
        "test."
    )
    hypothesis = (
        "At dropout rate 0.5, the MLP with dropout directly before each BatchNorm "
        "layer reaches a lower eval-mode validation accuracy than with dropout at the "
        "end of each block (after BN and ReLU)."
    )
    metric = (
        "Final validation accuracy in eval mode, diverged runs counting as chance; "
        "effect = acc(after, 0.5) - acc(before, 0.5), paired by seed. Details: train- "
        "over eval-mode input variance of each BN layer on the validation split."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MIN_EFFECT} ({MIN_EFFECT * 100:.0f} point); NOT SUPPORTED if the "
        f"interval's upper end is below {MIN_EFFECT}; otherwise INCONCLUSIVE."
    )

    def configs(self, ctx: StudyContext):
        configs = []
        for position, rate in conditions(ctx.scale):
            for seed in ctx.seed_list:
                config = base_config(
                    ctx.dataset, ctx.scale, ctx.device,
                    norm=BN, lr=LR, dropout=rate, dropout_position=position, seed=seed,
                )
                configs.append(VarianceShiftConfig(**config.to_dict()))
        return configs

    def grid(self, ctx: StudyContext) -> str:
        rates = ", ".join(f"{r:g}" for r in RATES[ctx.scale])
        return (
            f"no dropout and {{dropout before BN, dropout after the block}} x rates "
            f"{rates} x {ctx.seeds} seeds, MLP 100-100 with BatchNorm, SGD momentum "
            f"0.9 at lr {LR}; variance shift measured on the validation split."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        chance = 1.0 / ctx.data.num_classes
        runs = list(records.values())
        table = accuracy_table(runs, chance, TABLE_FIELDS)
        pairs = conditions(ctx.scale)
        details = {
            "lr": LR,
            "decision_rate": DECISION_RATE,
            "mean_val_acc": {
                condition_name(p, r): _mean(_seed_values(table, p, r)) for p, r in pairs
            },
            "variance_shift": {
                condition_name(p, r): shift_means(runs, p, r, "var_shift")
                for p, r in pairs
            },
            "running_shift": {
                condition_name(p, r): shift_means(runs, p, r, "running_shift")
                for p, r in pairs
            },
        }
        label = (
            f"eval-mode val acc, dropout after - dropout before, rate {DECISION_RATE:g}"
        )

        after, before = {}, {}
        for s in ctx.seed_list:
            after[s] = table.get((AFTER, DECISION_RATE, s))
            before[s] = table.get((BEFORE, DECISION_RATE, s))
        seeds = [
            s for s in ctx.seed_list
            if after[s] is not None and before[s] is not None
        ]
        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"No seed has a finished or diverged run with dropout "
                f"{DECISION_RATE:g} both before and after BN; rerun normlab verify.",
            )
        effects = [after[s] - before[s] for s in seeds]
        verdict, mean, low, high = decide_effects(effects, margin=MIN_EFFECT)
        details["per_seed_effect"] = effects

        names = [condition_name(p, r) for p, r in pairs]
        accs = ", ".join(
            f"{name} {_fmt(details['mean_val_acc'][name])}" for name in names
        )
        shifts = "; ".join(
            f"{name} {_fmt_shift(details['variance_shift'][name])}"
            for name in names[1:]
        )
        summary = (
            f"Eval-mode validation accuracy: {accs}. At rate {DECISION_RATE:g}, "
            f"acc(after) - acc(before) is {mean:+.3f} (95% CI {low:+.3f} to "
            f"{high:+.3f}). Train- over eval-mode input variance of BN "
            f"layers 1 and 2 on the validation split: {shifts}."
        )
        diverged = sorted(
            {condition_name(r.config.dropout_position, r.config.dropout)
             for r in runs if r.status != "finished"}
        )
        if diverged:
            summary += (
                f" Diverged runs ({', '.join(diverged)}) count as chance accuracy."
            )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        chance = 1.0 / ctx.data.num_classes
        table = accuracy_table(records.values(), chance, TABLE_FIELDS)
        runs = list(records.values())
        rates = [0.0] + RATES[ctx.scale]
        # no dropout is the same network for both positions, so both lines start there
        accuracy_lines = [
            (
                POSITION_LABELS[p],
                POSITION_COLORS[p],
                {r: _seed_values(table, AFTER if r == 0 else p, r) for r in rates},
            )
            for p in POSITIONS
        ]
        panels = [
            ("validation accuracy", "final validation accuracy (eval mode)",
             accuracy_lines, None),
        ]
        for layer in range(1, HIDDEN_LAYERS + 1):
            lines = [
                (
                    POSITION_LABELS[p],
                    POSITION_COLORS[p],
                    {
                        r: shift_values(runs, AFTER if r == 0 else p, r,
                                        f"var_shift_bn{layer}")
                        for r in rates
                    },
                )
                for p in POSITIONS
            ]
            panels.append(
                (f"BN layer {layer}: variance shift",
                 "input variance, train mode / eval mode", lines, (1.0, "no shift"))
            )
        path = plots.setting_lines(
            panels,
            xlabel="dropout rate",
            title=f"dropout on {ctx.dataset}: BatchNorm MLP, lr {LR}, mean and seeds",
            path=out_dir / "dropout_accuracy_shift.png",
        )
        return [path]


def shift_values(records, position: str, rate: float, name: str) -> list[float]:
    """Return the finite values of final metric ``name`` over a condition's seeds."""
    values = [
        r.final.get(name, math.nan) for r in records
        if r.status == "finished"
        and r.config.dropout_position == position and r.config.dropout == rate
    ]
    return [v for v in values if math.isfinite(v)]


def shift_means(records, position: str, rate: float, prefix: str) -> dict:
    """Return ``{"bn1": mean, "bn2": mean}`` of ``{prefix}_bn{i}`` over seeds."""
    records = list(records)
    return {
        f"bn{layer}": _mean(
            shift_values(records, position, rate, f"{prefix}_bn{layer}")
        )
        for layer in range(1, HIDDEN_LAYERS + 1)
    }


def _seed_values(table: dict, position: str, rate: float) -> list[float]:
    return [a for (p, r, _), a in table.items() if p == position and r == rate]


def _mean(values: list[float]):
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_shift(means: dict) -> str:
    return " and ".join(_fmt(v) for v in means.values())
