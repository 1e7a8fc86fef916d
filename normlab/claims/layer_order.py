"""BN belongs before the nonlinearity (Ioffe & Szegedy, 2015, section 3.2).

The paper adds BN "immediately before the nonlinearity", normalizing ``x = Wu + b``, and
most tutorials follow it; others report that ``Linear -> ReLU -> BN`` works as well.

Hypothesis: an MLP with hidden blocks ``Linear -> BN -> ReLU`` reaches a higher final
validation accuracy than the same MLP with ``Linear -> ReLU -> BN``.

Grid: the two orders, each over the seeds, with BatchNorm, SGD momentum 0.9 at lr 0.1
and the budget of the data set. In ``Linear -> ReLU -> BN`` the linear layer keeps its
bias, because the ReLU between them makes it matter.

Metric: final validation accuracy of norm-act minus that of act-norm, in accuracy (1.0 =
100 points), paired by seed. A diverged run counts as chance accuracy. The details add
the steps each order takes to the target accuracy of ``faster-convergence``.

Decision rule: SUPPORTED when the 95% t-interval of the difference across seeds lies
above 0 and the mean difference is at least 0.01 (1 accuracy point). NOT SUPPORTED when
the upper end of the interval is below 0.01: the orders are equal within 1 point, or
act-norm is better. INCONCLUSIVE otherwise, or when no seed has both runs.
"""

from __future__ import annotations

from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, base_config
from .faster_convergence import TARGETS, steps_to_target
from .stats import decide_effects, final_accuracy

NORM_ACT, ACT_NORM = "norm-act", "act-norm"
ORDER_LABELS = {NORM_ACT: "Linear -> BN -> ReLU", ACT_NORM: "Linear -> ReLU -> BN"}
LR = 0.1
MARGIN = 0.01  # accuracy, 1 point


class LayerOrder(Claim):
    id = "layer-order"
    statement = "BatchNorm works best before the activation (Linear -> BN -> ReLU)."
    hypothesis = (
        "With hidden blocks Linear -> BN -> ReLU the MLP reaches a higher final "
        "validation accuracy than with Linear -> ReLU -> BN."
    )
    metric = (
        "Final validation accuracy (norm-act) - final validation accuracy (act-norm), "
        "paired by seed; diverged runs count as chance."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MARGIN} ({MARGIN * 100:.0f} point); NOT SUPPORTED if the interval's "
        f"upper end is below {MARGIN} (equal within {MARGIN}, or act-norm better); "
        "otherwise INCONCLUSIVE."
    )

    def configs(self, ctx: StudyContext):
        return [
            base_config(
                ctx.dataset, ctx.scale, ctx.device,
                norm=BN, lr=LR, order=order, seed=seed,
            )
            for order in (NORM_ACT, ACT_NORM)
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        return (
            f"{{Linear -> BN -> ReLU, Linear -> ReLU -> BN}} x {ctx.seeds} seeds, "
            f"MLP 100-100, SGD momentum 0.9 at lr {LR}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        chance = 1.0 / ctx.data.num_classes
        target = TARGETS[ctx.dataset]
        runs = {(r.config.order, r.config.seed): r for r in records.values()}
        acc = {
            order: {
                s: final_accuracy(runs[(order, s)], chance) if (order, s) in runs else None
                for s in ctx.seed_list
            }
            for order in (NORM_ACT, ACT_NORM)
        }
        details = {
            "lr": LR,
            "final_val_acc": {
                order: {str(s): v for s, v in by_seed.items()}
                for order, by_seed in acc.items()
            },
            "target_val_acc": target,
            "steps_to_target": {
                order: {
                    str(s): steps_to_target(runs.get((order, s)), target)
                    for s in ctx.seed_list
                }
                for order in (NORM_ACT, ACT_NORM)
            },
        }
        label = "final val acc, norm-act - act-norm"

        seeds = [
            s for s in ctx.seed_list
            if acc[NORM_ACT][s] is not None and acc[ACT_NORM][s] is not None
        ]
        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="No seed has a finished or diverged run of both orders; rerun "
                "normlab verify.",
            )
        diffs = [acc[NORM_ACT][s] - acc[ACT_NORM][s] for s in seeds]
        verdict, mean, low, high = decide_effects(diffs, margin=MARGIN)
        details["per_seed_difference"] = diffs

        summary = (
            f"Final validation accuracy: {ORDER_LABELS[NORM_ACT]} "
            f"{_values(acc[NORM_ACT], seeds)}, {ORDER_LABELS[ACT_NORM]} "
            f"{_values(acc[ACT_NORM], seeds)}; difference {mean:+.3f} "
            f"(95% CI {low:+.3f} to {high:+.3f})."
        )
        if -MARGIN < low and high < MARGIN:
            summary += f" The orders are equal within {MARGIN} accuracy."
        elif high < 0:
            summary += " Linear -> ReLU -> BN is better."
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        selected = []
        for order in (NORM_ACT, ACT_NORM):
            runs = [r for r in records.values() if r.config.order == order]
            selected.append((ORDER_LABELS[order], runs))
        path = plots.accuracy_curves(
            selected,
            target=TARGETS[ctx.dataset],
            title=f"layer-order on {ctx.dataset}: BatchNorm before or after ReLU, "
            f"lr {LR}",
            path=out_dir / "layer-order_curves.png",
        )
        return [path]


def _values(values: dict, seeds) -> str:
    return "[" + ", ".join(f"{values[s]:.3f}" for s in seeds) + "]"
