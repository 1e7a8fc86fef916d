"""Weight normalization trains as fast as BN but generalizes worse (Gitman & Ginsburg).

Gitman and Ginsburg (2017, "Comparison of Batch Normalization and Weight Normalization
Algorithms for the Large-scale Image Classification") train ResNet-50 on ImageNet with
each and report that weight normalization lowers the training loss faster but ends
about 6 points lower in test accuracy than BatchNorm.

Hypothesis: each at its own best learning rate, the MLP with weight normalization
reaches a lower final test accuracy than the MLP with BatchNorm.

Grid: five learning rates 0.01 to 1 (half-decade steps, the grid of
``faster-convergence``, so the BatchNorm runs are shared) for BatchNorm and for weight
normalization (``norm="weightnorm"``: every hidden linear layer reparameterized as
w = g * v / ||v|| per output unit, no normalization layer), each over the seeds. SGD
momentum 0.9 and the budget of the data set. Weight normalization starts from PyTorch's
default initialization with g = ||v||, so it computes the same function as the plain
MLP at step 0. The data-dependent initialization of Salimans and Kingma
(``normlab.nn.init_weight_norm_``) is not used, because ``TrainConfig`` has no field
for it.

Metric: each condition uses the learning rate with the highest mean final validation
accuracy over seeds, and a tie goes to the lower learning rate. At those learning
rates, the effect is test acc(BatchNorm) - test acc(weight norm), in accuracy (1.0 =
100 points), paired by seed. A diverged run counts as chance accuracy throughout.
The details hold the final training accuracy, the generalization gap (training accuracy
- test accuracy, both in eval mode) and the mean training loss over the first quarter of
the steps, which shows which condition trains faster.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.01 (1 accuracy point). NOT SUPPORTED when the upper
end of the interval is below 0.01. INCONCLUSIVE otherwise, or when no seed has a run of
both conditions at the selected learning rates.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, base_config
from .faster_convergence import LRS
from .stats import decide_effects

WN = "weightnorm"
NORMS = (BN, WN)
NORM_LABELS = {BN: "BatchNorm", WN: "weight norm"}
MIN_EFFECT = 0.01  # accuracy, 1 point
EARLY_FRACTION = 0.25  # share of the steps over which the early training loss is taken


class WeightNormGeneralization(Claim):
    id = "weightnorm-generalization"
    statement = (
        "Weight normalization trains as fast as BatchNorm but generalizes worse: its "
        "test accuracy is lower."
    )
    hypothesis = (
        "Each at its own best learning rate (selected on validation accuracy), the MLP "
        "with weight normalization reaches a lower final test accuracy than with "
        "BatchNorm."
    )
    metric = (
        "Final test accuracy in eval mode at each condition's best lr, diverged runs "
        "counting as chance; effect = test acc(BatchNorm) - test acc(weight norm), "
        "paired by seed."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MIN_EFFECT} ({MIN_EFFECT * 100:.0f} point); NOT SUPPORTED if the "
        f"interval's upper end is below {MIN_EFFECT}; otherwise INCONCLUSIVE."
    )

    def configs(self, ctx: StudyContext):
        return [
            base_config(ctx.dataset, ctx.scale, ctx.device, norm=norm, lr=lr, seed=seed)
            for norm in NORMS
            for lr in LRS
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        return (
            f"learning rates {', '.join(f'{lr:.3g}' for lr in LRS)} x {{BatchNorm, "
            f"weight norm}} x {ctx.seeds} seeds, MLP 100-100, SGD momentum 0.9; each "
            "condition at the lr with the best mean validation accuracy."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        chance = 1.0 / ctx.data.num_classes
        runs = list(records.values())
        best = {norm: best_lr(runs, norm, chance) for norm in NORMS}
        details = {
            "best_lr": best,
            "data_dependent_init": False,
            "mean_val_acc": {
                norm: {f"{lr:.3g}": _mean(_lr_values(runs, norm, lr, "val_acc", chance))
                       for lr in LRS}
                for norm in NORMS
            },
            "at_best_lr": {
                norm: _selected_details(runs, norm, best[norm], chance)
                for norm in NORMS
            },
        }
        label = "test acc, BatchNorm - weight norm, each at its best lr"

        test = {
            norm: {s: _metric(_find(runs, norm, best[norm], s), "test_acc", chance)
                   for s in ctx.seed_list}
            for norm in NORMS
        }
        seeds = [
            s for s in ctx.seed_list
            if test[BN][s] is not None and test[WN][s] is not None
        ]
        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="No seed has a run of both BatchNorm and weight norm at their "
                "selected learning rates; rerun normlab verify.",
            )
        effects = [test[BN][s] - test[WN][s] for s in seeds]
        verdict, mean, low, high = decide_effects(effects, margin=MIN_EFFECT)
        details["per_seed_effect"] = effects

        selected = details["at_best_lr"]
        per_norm = "; ".join(
            f"{NORM_LABELS[n]} at lr {best[n]:.3g}: train "
            f"{_fmt(selected[n]['mean_train_acc'])}, test "
            f"{_fmt(selected[n]['mean_test_acc'])}, gap "
            f"{_fmt(selected[n]['mean_gap'])}, early training loss "
            f"{_fmt(selected[n]['mean_early_train_loss'])}"
            for n in NORMS
        )
        summary = (
            f"Final accuracy in eval mode: {per_norm}. BatchNorm tests higher by "
            f"{mean:+.3f} (95% CI {low:+.3f} to {high:+.3f}). Weight norm uses "
            "PyTorch's default init, not the data-dependent one."
        )
        diverged = [
            NORM_LABELS[n] for n in NORMS
            if any(_find(runs, n, best[n], s) is not None
                   and _find(runs, n, best[n], s).status != "finished"
                   for s in ctx.seed_list)
        ]
        if diverged:
            summary += (
                f" Diverged runs of {', '.join(diverged)} at the selected lr count as "
                "chance accuracy."
            )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        chance = 1.0 / ctx.data.num_classes
        runs = list(records.values())
        best = {norm: best_lr(runs, norm, chance) for norm in NORMS}
        panels = []
        for panel_title, name in (
            ("final training accuracy", "train_acc"),
            ("final test accuracy", "test_acc"),
            ("gap: train acc - test acc", "gap"),
        ):
            points = [
                (
                    f"{NORM_LABELS[n]}\nlr {best[n]:.3g}",
                    _lr_values(runs, n, best[n], name, chance),
                )
                for n in NORMS
            ]
            panels.append((panel_title, points))
        bars = plots.point_panels(
            panels,
            title=f"weightnorm-generalization on {ctx.dataset}: each at its best lr "
            "(by validation accuracy), eval mode, mean and seeds",
            path=out_dir / "weightnorm-generalization_accuracy.png",
        )
        table = {
            (r.config.norm, r.config.lr, r.config.seed): _metric(r, "val_acc", chance)
            for r in runs
        }
        sweep = plots.accuracy_sweep(
            table,
            conditions=[(n, NORM_LABELS[n]) for n in NORMS],
            xlabel="learning rate (log scale)",
            reference=(chance, "chance (diverged runs count here)"),
            title=f"weightnorm-generalization on {ctx.dataset}: lr selection",
            path=out_dir / "weightnorm-generalization_lr.png",
        )
        return [bars, sweep]


def best_lr(runs, norm: str, chance: float):
    """Return the lr with the highest mean final val acc of ``norm``, or None.

    Diverged runs count as ``chance``, and a tie goes to the lower lr.
    """
    lrs = sorted({r.config.lr for r in runs if r.config.norm == norm})
    if not lrs:
        return None
    return max(lrs, key=lambda lr: _mean(_lr_values(runs, norm, lr, "val_acc", chance)))


def _metric(record, name: str, chance: float):
    """Return a final metric of ``record``: chance accuracy if it diverged.

    ``name`` is a key of ``final`` or one of ``"gap"`` (train acc - test acc) and
    ``"early_train_loss"``. Returns None for a missing record, and NaN for a diverged
    run's gap and losses, which have no value.
    """
    if record is None:
        return None
    finished = record.status == "finished"
    if name == "early_train_loss":
        count = max(1, math.ceil(EARLY_FRACTION * len(record.step_loss)))
        losses = record.step_loss[:count]
        return sum(losses) / len(losses) if finished and losses else math.nan
    if name == "gap":
        if not finished:
            return math.nan
        return record.final["train_acc"] - record.final["test_acc"]
    value = record.final.get(name, math.nan)
    if name.endswith("_acc") and (not finished or not math.isfinite(value)):
        return chance
    return value


def _lr_values(runs, norm: str, lr, name: str, chance: float) -> list[float]:
    values = [
        _metric(r, name, chance) for r in runs
        if r.config.norm == norm and r.config.lr == lr
    ]
    return [v for v in values if v is not None and math.isfinite(v)]


def _selected_details(runs, norm: str, lr, chance: float) -> dict:
    details = {}
    for name in ("train_acc", "test_acc", "gap", "train_loss", "early_train_loss"):
        details[f"mean_{name}"] = _mean(_lr_values(runs, norm, lr, name, chance))
    return details


def _find(runs, norm: str, lr, seed: int):
    for record in runs:
        c = record.config
        if c.norm == norm and c.lr == lr and c.seed == seed:
            return record
    return None


def _mean(values: list[float]):
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
