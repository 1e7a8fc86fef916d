"""BN allows higher learning rates (Ioffe & Szegedy, 2015, section 3.3).

Hypothesis: the largest learning rate at which an MLP still trains is higher with BatchNorm
than without.

Grid: learning rates 10^(k/2) on a half-decade log grid, for BatchNorm and for no
normalization, each over the seeds; SGD with momentum 0.9 and the budget of the data set.

Metric: per seed, the largest learning rate of the grid at which the run trains. A run
trains when its loss stays finite and below the divergence limit, and its final
validation accuracy reaches at least half of the way from chance to the best final
validation accuracy of any run in this grid. The effect is log10(max lr with BN / max lr
without), in decades, averaged over seeds.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least one grid step (0.5 decade); NOT SUPPORTED when the upper
end of the interval is below one grid step; INCONCLUSIVE otherwise, or when both conditions
train at the top of the grid for every seed, so the grid cannot tell them apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, CONDITION_LABELS, NO_NORM, base_config
from .stats import INCONCLUSIVE, decide_effects

GRID_STEP = 0.5  # decades between neighbouring learning rates
LR_EXPONENTS = {"quick": range(-4, 4), "full": range(-6, 5)}


def lr_grid(scale: str) -> list[float]:
    return [round(10 ** (k * GRID_STEP), 6) for k in LR_EXPONENTS[scale]]


class HigherLearningRate(Claim):
    id = "higher-lr"
    statement = "BatchNorm allows higher learning rates."
    hypothesis = (
        "The largest learning rate at which the MLP still trains is higher with BatchNorm "
        "than without normalization."
    )
    metric = (
        "log10(largest trainable lr with BN / largest trainable lr without), in decades, "
        "per seed. A run trains when its loss stays finite and its final validation accuracy "
        "is at least halfway from chance to the best run of the grid."
    )
    decision_rule = (
        "SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at least "
        "one grid step (0.5 decade); NOT SUPPORTED if the interval's upper end is below 0.5 "
        "decade; otherwise INCONCLUSIVE (also when both train at the top of the grid)."
    )

    def configs(self, ctx: StudyContext):
        return [
            base_config(ctx.dataset, ctx.scale, ctx.device, norm=norm, lr=lr, seed=seed)
            for norm in (BN, NO_NORM)
            for lr in lr_grid(ctx.scale)
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        grid = lr_grid(ctx.scale)
        return (
            f"{len(grid)} learning rates from {grid[0]:.3g} to {grid[-1]:.3g} (half-decade steps)"
            f" x {{BatchNorm, none}} x {ctx.seeds} seeds, MLP 100-100, SGD momentum 0.9."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        table = sweep_table(records.values())
        threshold = trains_threshold(records.values(), ctx.data.num_classes)
        grid = lr_grid(ctx.scale)
        max_lr = {
            norm: {s: largest_trainable_lr(table, norm, s, threshold) for s in ctx.seed_list}
            for norm in (BN, NO_NORM)
        }
        details = {
            "lr_grid": grid,
            "trains_threshold_val_acc": threshold,
            "max_trainable_lr": {n: {str(s): v for s, v in m.items()} for n, m in max_lr.items()},
        }
        label = "log10(max lr BN / max lr none), decades"
        if any(v is None for m in max_lr.values() for v in m.values()):
            missing = [n for n, m in max_lr.items() if any(v is None for v in m.values())]
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"No learning rate of the grid trained for {', '.join(missing)} in "
                "some seed, so the largest trainable learning rate is unknown.",
            )
        # grid values are rounded, so snap the ratio to whole grid steps
        diffs = [_grid_steps(max_lr[BN][s] / max_lr[NO_NORM][s]) * GRID_STEP for s in ctx.seed_list]
        verdict, mean, low, high = decide_effects(diffs, margin=GRID_STEP)
        top = grid[-1]
        censored = all(max_lr[BN][s] == top for s in ctx.seed_list)
        if censored and all(max_lr[NO_NORM][s] == top for s in ctx.seed_list):
            verdict = INCONCLUSIVE
        details["per_seed_decades"] = diffs
        summary = (
            f"Largest trainable lr: BatchNorm {_lr_list(max_lr[BN])}, none "
            f"{_lr_list(max_lr[NO_NORM])}; BN is {mean:+.2f} decades "
            f"(95% CI {low:+.2f} to {high:+.2f})."
        )
        if censored:
            summary += (
                f" BatchNorm trained at the top of the grid ({top:.3g}) in every seed, so its "
                "true limit is higher and the effect is a lower bound."
            )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        table = sweep_table(records.values())
        threshold = trains_threshold(records.values(), ctx.data.num_classes)
        sweep = plots.lr_sweep(
            table,
            conditions=[(n, CONDITION_LABELS[n]) for n in (BN, NO_NORM)],
            threshold=threshold,
            title=f"higher-lr on {ctx.dataset}: final validation accuracy against lr",
            path=out_dir / "higher-lr_sweep.png",
        )
        curves = plots.curves_by_lr(
            records.values(),
            conditions=[(n, CONDITION_LABELS[n]) for n in (BN, NO_NORM)],
            title=f"higher-lr on {ctx.dataset}: validation accuracy against step",
            path=out_dir / "higher-lr_curves.png",
        )
        return [sweep, curves]


def sweep_table(records) -> dict:
    """Return ``{(norm, lr, seed): final val acc}``, NaN for a diverged run."""
    table = {}
    for record in records:
        acc = record.final.get("val_acc", math.nan) if record.status == "finished" else math.nan
        table[(record.config.norm, record.config.lr, record.config.seed)] = acc
    return table


def trains_threshold(records, num_classes: int) -> float:
    """Return the validation accuracy a run must reach to count as trained."""
    chance = 1.0 / num_classes
    finals = [
        r.final.get("val_acc", math.nan) for r in records if r.status == "finished"
    ]
    finals = [a for a in finals if math.isfinite(a)]
    best = max(finals, default=chance)
    return chance + 0.5 * (best - chance)


def largest_trainable_lr(table: dict, norm: str, seed: int, threshold: float):
    """Return the largest lr at which ``norm`` trains for ``seed``, or None."""
    trained = [
        lr for (n, lr, s), acc in table.items()
        if n == norm and s == seed and np.isfinite(acc) and acc >= threshold
    ]
    return max(trained, default=None)


def _grid_steps(ratio: float) -> int:
    return round(math.log10(ratio) / GRID_STEP)


def _lr_list(values: dict) -> str:
    return "[" + ", ".join(f"{v:.3g}" for _, v in sorted(values.items())) + "]"
