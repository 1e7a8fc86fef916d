"""BN makes training less sensitive to the initialization (Ioffe & Szegedy, 2015, 3.3).

Hypothesis: when every weight of the MLP is multiplied by a common factor after
PyTorch's default initialization, the final validation accuracy changes less across
factors with BatchNorm than without normalization. A layer followed by BatchNorm gives
the same output for any scale of its weight, so only the output layer's scale is left to
matter.

Grid: init scales 0.01, 0.1, 1 and 10 (quick) or 0.01 to 10 in half-decade steps (full),
for BatchNorm and for no normalization, each over the seeds. Every run uses the fixed
learning rate 0.1, SGD momentum 0.9 and the budget of the data set. ``init_scale``
multiplies the weight of every linear layer, the output layer included, and leaves the
biases alone.

Metric: per seed and condition, the spread of the final validation accuracy across init
scales: max minus min. A diverged run counts as chance accuracy (1 / number of classes).
The effect is spread(none) - spread(BN), in accuracy (1.0 = 100 points), paired by seed.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.05 (5 accuracy points). NOT SUPPORTED when the upper
end of the interval is below 0.05. INCONCLUSIVE otherwise, or when no seed has every
run.
"""

from __future__ import annotations

from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, CONDITION_LABELS, NO_NORM, base_config
from .stats import accuracy_table, decide_effects

# the config fields that tell this grid's cells apart, for accuracy_table
TABLE_FIELDS = ("norm", "init_scale")

SCALES = {
    "quick": [0.01, 0.1, 1.0, 10.0],
    "full": [0.01, 0.031623, 0.1, 0.316228, 1.0, 3.162278, 10.0],
}
LR = 0.1
MIN_EFFECT = 0.05  # accuracy, 5 points


class InitInsensitivity(Claim):
    id = "init-insensitivity"
    statement = "BatchNorm makes training less sensitive to the initialization."
    hypothesis = (
        "Across init scales (a factor on every weight after PyTorch's default init), "
        "the final validation accuracy varies less with BatchNorm than without "
        "normalization."
    )
    metric = (
        "Per seed, spread = max - min of the final validation accuracy across init "
        "scales (diverged runs count as chance); effect = spread(none) - spread(BN), "
        "in accuracy."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MIN_EFFECT} ({MIN_EFFECT * 100:.0f} points); NOT SUPPORTED if the "
        f"interval's upper end is below {MIN_EFFECT}; otherwise INCONCLUSIVE."
    )

    def configs(self, ctx: StudyContext):
        return [
            base_config(
                ctx.dataset, ctx.scale, ctx.device,
                norm=norm, lr=LR, init_scale=scale, seed=seed,
            )
            for norm in (BN, NO_NORM)
            for scale in SCALES[ctx.scale]
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        scales = ", ".join(f"{s:.3g}" for s in SCALES[ctx.scale])
        return (
            f"init scales {scales} x {{BatchNorm, none}} x {ctx.seeds} seeds, "
            f"MLP 100-100, SGD momentum 0.9 at lr {LR}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        chance = 1.0 / ctx.data.num_classes
        table = accuracy_table(records.values(), chance, TABLE_FIELDS)
        scales = SCALES[ctx.scale]
        spread = {
            norm: {s: accuracy_spread(table, norm, scales, s) for s in ctx.seed_list}
            for norm in (BN, NO_NORM)
        }
        # seeds with a run at every init scale in both conditions
        seeds = [
            s for s in ctx.seed_list
            if spread[BN][s] is not None and spread[NO_NORM][s] is not None
        ]
        details = {
            "init_scales": scales,
            "lr": LR,
            "chance_val_acc": chance,
            "spread": {n: {str(s): v for s, v in m.items()} for n, m in spread.items()},
            "mean_val_acc": {
                norm: {str(scale): _mean_acc(table, norm, scale) for scale in scales}
                for norm in (BN, NO_NORM)
            },
        }
        label = "spread(none) - spread(BN) of final val acc across init scales"

        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="No seed has a finished or diverged run at every init scale "
                "for both conditions, so the spread is unknown; rerun normlab verify.",
            )
        effects = [spread[NO_NORM][s] - spread[BN][s] for s in seeds]
        verdict, mean, low, high = decide_effects(effects, margin=MIN_EFFECT)
        details["per_seed_effect"] = effects

        summary = (
            f"Spread of final validation accuracy across init scales: BatchNorm "
            f"{_values(spread[BN], seeds)}, none {_values(spread[NO_NORM], seeds)}; "
            f"BN narrows it by {mean:+.3f} (95% CI {low:+.3f} to {high:+.3f})."
        )
        diverged = sorted(
            {(r.config.norm, r.config.init_scale) for r in records.values()
             if r.status != "finished"}
        )
        if diverged:
            cells = ", ".join(f"{n} at {s:.3g}" for n, s in diverged)
            summary += f" Diverged runs ({cells}) count as chance accuracy."
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        chance = 1.0 / ctx.data.num_classes
        path = plots.accuracy_sweep(
            accuracy_table(records.values(), chance, TABLE_FIELDS),
            conditions=[(n, CONDITION_LABELS[n]) for n in (BN, NO_NORM)],
            xlabel="init scale: factor on every weight (log scale)",
            reference=(chance, "chance (diverged runs count here)"),
            title=f"init-insensitivity on {ctx.dataset}: final validation accuracy, "
            f"lr {LR}",
            path=out_dir / "init-insensitivity_sweep.png",
        )
        return [path]


def accuracy_spread(table: dict, norm: str, scales, seed: int):
    """Return max - min accuracy of ``norm`` across ``scales`` for ``seed``, or None.

    None means a run of the grid is missing, because it failed or has not run.
    """
    accs = [table.get((norm, scale, seed)) for scale in scales]
    if any(a is None for a in accs):
        return None
    return max(accs) - min(accs)


def _mean_acc(table: dict, norm: str, scale: float):
    accs = [a for (n, s, _), a in table.items() if n == norm and s == scale]
    return sum(accs) / len(accs) if accs else None


def _values(values: dict, seeds) -> str:
    return "[" + ", ".join(f"{values[s]:.3f}" for s in seeds) + "]"
