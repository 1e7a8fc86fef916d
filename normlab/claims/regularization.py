"""BN regularizes the model (Ioffe & Szegedy, 2015, section 3.4).

Hypothesis: trained on a small training set, where the MLP overfits, the gap between
training and held-out accuracy is smaller with BatchNorm than without normalization.

Grid: {BatchNorm, none} x {no dropout, dropout 0.5 after each hidden activation}, each
over the seeds, trained on the first ``TRAIN_SIZES[dataset]`` training samples (300 of
the 1,077 on digits). SGD momentum 0.9 at lr 0.1. The budget's epochs are scaled up by
(training split size / train_size) so that a run takes as many steps as the budget gives
on the whole training split.

Metric: the generalization gap, final training accuracy minus final test accuracy, both
in eval mode, with the training accuracy measured on the samples the run trained on. The
effect is gap(none, no dropout) - gap(BN, no dropout), in accuracy (1.0 = 100 points),
paired by seed. The dropout cells and the loss gaps (test loss - training loss) are
reported in the details.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.01 (1 accuracy point). NOT SUPPORTED when the upper
end of the interval is below 0.01. INCONCLUSIVE otherwise, or when a cell diverged or is
missing in every seed.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, BUDGETS, CONDITION_LABELS, NO_NORM, base_config
from .stats import decide_effects

# training samples per data set; each is a small fraction of its training split
TRAIN_SIZES = {"digits": 300, "mnist": 1000, "cifar10": 2000}
DROPOUT = 0.5
LR = 0.1
MIN_EFFECT = 0.01  # accuracy, 1 point
CELLS = [(BN, 0.0), (NO_NORM, 0.0), (BN, DROPOUT), (NO_NORM, DROPOUT)]


class Regularization(Claim):
    id = "regularization"
    statement = "BatchNorm regularizes the model."
    hypothesis = (
        "On a small training set, the gap between training and test accuracy is "
        "smaller with BatchNorm than without normalization (both without dropout)."
    )
    metric = (
        "Gap = final training accuracy (on the samples trained on) - final test "
        "accuracy, both in eval mode; effect = gap(none) - gap(BN) without dropout, in "
        "accuracy."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MIN_EFFECT} ({MIN_EFFECT * 100:.0f} point); NOT SUPPORTED if the "
        f"interval's upper end is below {MIN_EFFECT}; otherwise INCONCLUSIVE."
    )

    def configs(self, ctx: StudyContext):
        train_size, epochs = small_data_budget(ctx)
        return [
            base_config(
                ctx.dataset, ctx.scale, ctx.device,
                norm=norm, lr=LR, dropout=dropout, seed=seed,
                train_size=train_size, epochs=epochs,
            )
            for norm, dropout in CELLS
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        train_size, epochs = small_data_budget(ctx)
        return (
            f"{{BatchNorm, none}} x {{no dropout, dropout {DROPOUT}}} x {ctx.seeds} "
            f"seeds, MLP 100-100 trained on the first {train_size} training samples "
            f"for {epochs} epochs, SGD momentum 0.9 at lr {LR}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        gaps = gap_table(records.values())
        details = {
            "train_size": small_data_budget(ctx)[0],
            "epochs": small_data_budget(ctx)[1],
            "dropout": DROPOUT,
            "cells": {
                cell_name(norm, dropout): _cell_details(records.values(), norm, dropout)
                for norm, dropout in CELLS
            },
        }
        label = "gap(none) - gap(BN), train acc - test acc, without dropout"

        seeds = [
            s for s in ctx.seed_list
            if (BN, 0.0, s) in gaps and (NO_NORM, 0.0, s) in gaps
        ]
        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="No seed has a finished run with and without BatchNorm (no "
                "dropout), so the gaps cannot be compared.",
            )
        effects = [gaps[(NO_NORM, 0.0, s)] - gaps[(BN, 0.0, s)] for s in seeds]
        verdict, mean, low, high = decide_effects(effects, margin=MIN_EFFECT)
        details["per_seed_effect"] = effects

        cells = details["cells"]
        summary = (
            f"Train - test accuracy gap without dropout: BatchNorm "
            f"{_fmt(cells[cell_name(BN, 0.0)]['mean_gap'])}, none "
            f"{_fmt(cells[cell_name(NO_NORM, 0.0)]['mean_gap'])}; BN shrinks it by "
            f"{mean:+.3f} (95% CI {low:+.3f} to {high:+.3f}). With dropout {DROPOUT}: "
            f"BatchNorm {_fmt(cells[cell_name(BN, DROPOUT)]['mean_gap'])}, none "
            f"{_fmt(cells[cell_name(NO_NORM, DROPOUT)]['mean_gap'])}."
        )
        if len(seeds) < ctx.seeds:
            summary += (
                f" {ctx.seeds - len(seeds)} seeds lack a finished run in a cell and "
                "are left out."
            )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        panels = []
        for ylabel, metric in (
            ("final accuracy on the training samples", "train_acc"),
            ("final test accuracy", "test_acc"),
            ("gap: train acc - test acc", "gap"),
        ):
            points = [
                (
                    cell_label(norm, dropout),
                    _cell_values(records.values(), norm, dropout, metric),
                )
                for norm, dropout in CELLS
            ]
            panels.append((ylabel, points))
        train_size = small_data_budget(ctx)[0]
        path = plots.point_panels(
            panels,
            title=f"regularization on {ctx.dataset}: {train_size} training samples, "
            "mean and seeds",
            path=out_dir / "regularization_gap.png",
        )
        return [path]


def small_data_budget(ctx: StudyContext) -> tuple[int, int]:
    """Return ``(train_size, epochs)`` for the small training set.

    The epochs take as many steps as the budget's epochs do on the whole training split.
    """
    train_size = TRAIN_SIZES[ctx.dataset]
    epochs = BUDGETS[(ctx.dataset, ctx.scale)]["epochs"]
    return train_size, math.ceil(epochs * len(ctx.data.train) / train_size)


def cell_name(norm: str, dropout: float) -> str:
    return f"{norm}, dropout {dropout:g}"


def cell_label(norm: str, dropout: float) -> str:
    dropout_text = f"dropout {dropout:g}" if dropout else "no dropout"
    return f"{CONDITION_LABELS[norm]}\n{dropout_text}"


def gap_table(records) -> dict:
    """Return ``{(norm, dropout, seed): train acc - test acc}`` of the finished runs."""
    table = {}
    for record in records:
        gap = _metric(record, "gap")
        if math.isfinite(gap):
            c = record.config
            table[(c.norm, c.dropout, c.seed)] = gap
    return table


def _metric(record, name: str) -> float:
    if record.status != "finished":
        return math.nan
    final = record.final
    if name == "gap":
        return final.get("train_acc", math.nan) - final.get("test_acc", math.nan)
    if name == "loss_gap":
        return final.get("test_loss", math.nan) - final.get("train_loss", math.nan)
    return final.get(name, math.nan)


def _cell_values(records, norm: str, dropout: float, name: str) -> list[float]:
    values = [
        _metric(r, name) for r in records
        if r.config.norm == norm and r.config.dropout == dropout
    ]
    return [v for v in values if math.isfinite(v)]


def _cell_details(records, norm: str, dropout: float) -> dict:
    records = list(records)
    details = {}
    for name in ("train_acc", "test_acc", "gap", "loss_gap"):
        values = _cell_values(records, norm, dropout, name)
        details[f"mean_{name}"] = sum(values) / len(values) if values else None
    details["finished_runs"] = len(_cell_values(records, norm, dropout, "gap"))
    return details


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
