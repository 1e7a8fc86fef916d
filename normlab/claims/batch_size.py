"""Batch sizes of 16 to 64 work best for BN, and small batches make BN unstable.

BatchNorm normalizes with the mean and variance of the current batch, so at small batch
sizes its statistics are noisy, and they differ from the running statistics that eval
mode uses. Group and layer normalization compute their statistics per sample, so the
batch size reaches them only through the optimizer (Wu & He, 2018, "Group
Normalization"). Practitioners quote 16 to 64 as the range where BatchNorm
works best.

Hypothesis: from a batch size in that range down to batch size 2, the final validation
accuracy drops more with BatchNorm than with GroupNorm.

Grid: batch sizes 2, 8, 32 and 128 (quick) or 2, 4, ..., 256 (full), for BatchNorm,
GroupNorm (normlab's default for (N, C) features, 5 groups of 20 units for 100
units) and LayerNorm, each over the seeds. Every run trains for the same number of
epochs: the budget's epochs at full scale, and at most ``QUICK_EPOCHS`` (4) at quick
scale, because batch size 2 takes 538 steps per epoch on digits and the quick grid must
stay near a minute on one CPU thread; for the same reason quick MNIST runs train on the
first 6,000 images only. The learning rate follows the linear scaling
rule, lr = 0.1 * batch size / 64, so every run takes SGD steps of the same size per
sample seen (SGD momentum 0.9). The steps between two evaluations scale as 64 / batch
size, so every run is evaluated after the same numbers of samples.

Metric: final validation accuracy in eval mode, where a diverged run counts as chance
accuracy. The reference batch size is the largest batch size of the grid in [16, 64]
(32 quick, 64 full). Per seed and norm, drop = acc(reference) - acc(batch size 2). The
effect is drop(BatchNorm) - drop(GroupNorm), in accuracy (1.0 = 100 points), paired by
seed. Beside it, the details state per seed whether BatchNorm's best batch size lies in
[16, 64] (a seed counts when a batch size in range ties for the best accuracy), and
whether it does in most seeds.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.01 (1 accuracy point). NOT SUPPORTED when the upper
end of the interval is below 0.01. INCONCLUSIVE otherwise, or when no seed has all four
runs.
"""

from __future__ import annotations

from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, BUDGETS, base_config
from .stats import accuracy_table, decide_effects

# the config fields that tell this grid's cells apart, for accuracy_table
TABLE_FIELDS = ("norm", "batch_size")

GN, LN = "groupnorm", "layernorm"
NORMS = (BN, GN, LN)
NORM_LABELS = {BN: "BatchNorm", GN: "GroupNorm", LN: "LayerNorm"}
BATCH_SIZES = {
    "quick": [2, 8, 32, 128],
    "full": [2, 4, 8, 16, 32, 64, 128, 256],
}
SMALL_BATCH = 2
BEST_RANGE = (16, 64)  # the batch sizes that the claim calls best for BatchNorm
QUICK_EPOCHS = 4
# At quick scale MNIST trains on its first 6,000 images: batch size 2 over all 55,000
# would take 27,500 steps per epoch.
QUICK_TRAIN_SIZE = {"mnist": 6000}
# the linear scaling rule: lr = REFERENCE_LR * batch size / REFERENCE_BATCH
REFERENCE_LR, REFERENCE_BATCH = 0.1, 64
MIN_EFFECT = 0.01  # accuracy, 1 point


def reference_batch(scale: str) -> int:
    """Return the largest batch size of the grid inside ``BEST_RANGE``."""
    low, high = BEST_RANGE
    return max(b for b in BATCH_SIZES[scale] if low <= b <= high)


def scaled_lr(batch_size: int) -> float:
    return REFERENCE_LR * batch_size / REFERENCE_BATCH


def run_settings(ctx: StudyContext, batch_size: int) -> dict:
    """Return the epochs, eval interval and lr of a run at ``batch_size``."""
    budget = BUDGETS[(ctx.dataset, ctx.scale)]
    epochs = budget["epochs"]
    if ctx.scale == "quick":
        epochs = min(epochs, QUICK_EPOCHS)
    eval_every = max(1, round(budget["eval_every"] * REFERENCE_BATCH / batch_size))
    settings = {
        "batch_size": batch_size,
        "epochs": epochs,
        "eval_every": eval_every,
        "lr": scaled_lr(batch_size),
    }
    if ctx.scale == "quick" and ctx.dataset in QUICK_TRAIN_SIZE:
        settings["train_size"] = QUICK_TRAIN_SIZE[ctx.dataset]
    return settings


class BatchSize(Claim):
    id = "batch-size"
    statement = (
        "Batch sizes of 16 to 64 work best for BatchNorm, and small batches make "
        "BatchNorm unstable."
    )
    hypothesis = (
        "From a batch size in [16, 64] down to batch size 2, the final validation "
        "accuracy drops more with BatchNorm than with GroupNorm (same epochs, lr "
        "scaled linearly with the batch size)."
    )
    metric = (
        "Per seed and norm, drop = val acc(largest batch size of the grid in [16, 64]) "
        "- val acc(batch size 2), diverged runs counting as chance; effect = "
        "drop(BatchNorm) - drop(GroupNorm), in accuracy."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MIN_EFFECT} ({MIN_EFFECT * 100:.0f} point); NOT SUPPORTED if the "
        f"interval's upper end is below {MIN_EFFECT}; otherwise INCONCLUSIVE."
    )

    def configs(self, ctx: StudyContext):
        return [
            base_config(
                ctx.dataset, ctx.scale, ctx.device,
                norm=norm, seed=seed, **run_settings(ctx, batch_size),
            )
            for norm in NORMS
            for batch_size in BATCH_SIZES[ctx.scale]
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        sizes = ", ".join(str(b) for b in BATCH_SIZES[ctx.scale])
        epochs = run_settings(ctx, SMALL_BATCH)["epochs"]
        return (
            f"batch sizes {sizes} x {{BatchNorm, GroupNorm, LayerNorm}} x {ctx.seeds} "
            f"seeds, MLP 100-100, {epochs} epochs each, SGD momentum 0.9 at lr "
            f"{REFERENCE_LR} * batch size / {REFERENCE_BATCH}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        chance = 1.0 / ctx.data.num_classes
        table = accuracy_table(records.values(), chance, TABLE_FIELDS)
        sizes = BATCH_SIZES[ctx.scale]
        reference = reference_batch(ctx.scale)
        drops = {
            norm: {s: accuracy_drop(table, norm, reference, s) for s in ctx.seed_list}
            for norm in NORMS
        }
        best_in_range = {
            s: best_in_best_range(table, BN, sizes, s) for s in ctx.seed_list
        }
        decided = [v for v in best_in_range.values() if v is not None]
        in_most = len(decided) > 0 and sum(decided) > len(decided) / 2
        details = {
            "batch_sizes": sizes,
            "reference_batch_size": reference,
            "epochs": run_settings(ctx, SMALL_BATCH)["epochs"],
            "lr": {str(b): scaled_lr(b) for b in sizes},
            "mean_val_acc": {
                norm: {str(b): _mean(table, norm, b) for b in sizes} for norm in NORMS
            },
            "drop": {n: {str(s): v for s, v in m.items()} for n, m in drops.items()},
            "bn_best_batch_size": {
                str(s): best_batch_sizes(table, BN, sizes, s) for s in ctx.seed_list
            },
            "bn_best_in_16_64": {str(s): v for s, v in best_in_range.items()},
            "bn_best_in_16_64_in_most_seeds": in_most,
        }
        label = (
            f"val acc drop from batch {reference} to {SMALL_BATCH}, "
            "BatchNorm - GroupNorm"
        )

        seeds = [
            s for s in ctx.seed_list
            if drops[BN][s] is not None and drops[GN][s] is not None
        ]
        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"No seed has a finished or diverged run at batch sizes "
                f"{SMALL_BATCH} and {reference} for both BatchNorm and GroupNorm; "
                "rerun normlab verify.",
            )
        effects = [drops[BN][s] - drops[GN][s] for s in seeds]
        verdict, mean, low, high = decide_effects(effects, margin=MIN_EFFECT)
        details["per_seed_effect"] = effects

        accs = details["mean_val_acc"]
        by_norm = "; ".join(
            f"{NORM_LABELS[n]} "
            + ", ".join(f"{b}: {_fmt(accs[n][str(b)])}" for b in sizes)
            for n in NORMS
        )
        best_range = "holds" if in_most else "does not hold"
        summary = (
            f"Mean validation accuracy by batch size: {by_norm}. From batch "
            f"{reference} to {SMALL_BATCH}, BatchNorm loses "
            f"{_fmt_mean(drops[BN], seeds)} and "
            f"GroupNorm {_fmt_mean(drops[GN], seeds)}, so BatchNorm loses {mean:+.3f} "
            f"more (95% CI {low:+.3f} to {high:+.3f}). BatchNorm's best batch size "
            f"lies in [16, 64] in {sum(decided)} of {len(decided)} seeds, so the "
            f"'16 to 64 works best' part {best_range} here."
        )
        diverged = sorted(
            {(r.config.norm, r.config.batch_size) for r in records.values()
             if r.status != "finished"}
        )
        if diverged:
            cells = ", ".join(f"{NORM_LABELS[n]} at {b}" for n, b in diverged)
            summary += f" Diverged runs ({cells}) count as chance accuracy."
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        chance = 1.0 / ctx.data.num_classes
        epochs = run_settings(ctx, SMALL_BATCH)["epochs"]
        path = plots.accuracy_sweep(
            accuracy_table(records.values(), chance, TABLE_FIELDS),
            conditions=[(n, NORM_LABELS[n]) for n in NORMS],
            xlabel=f"batch size (log scale), lr = {REFERENCE_LR} * batch size / "
            f"{REFERENCE_BATCH}",
            reference=(chance, "chance (diverged runs count here)"),
            title=f"batch-size on {ctx.dataset}: final validation accuracy after "
            f"{epochs} epochs",
            path=out_dir / "batch-size_sweep.png",
        )
        return [path]


def accuracy_drop(table: dict, norm: str, reference: int, seed: int):
    """Return acc(reference) - acc(batch size 2) of ``norm`` for ``seed``, or None."""
    large = table.get((norm, reference, seed))
    small = table.get((norm, SMALL_BATCH, seed))
    if large is None or small is None:
        return None
    return large - small


def best_batch_sizes(table: dict, norm: str, sizes, seed: int) -> list[int]:
    """Return the batch sizes at which ``norm`` reaches its best accuracy for ``seed``.

    Ties give several batch sizes, and a missing run gives an empty list.
    """
    accs = {b: table.get((norm, b, seed)) for b in sizes}
    if any(a is None for a in accs.values()):
        return []
    best = max(accs.values())
    return [b for b, a in accs.items() if a == best]


def best_in_best_range(table: dict, norm: str, sizes, seed: int):
    """Return whether a best batch size of ``seed`` lies in ``BEST_RANGE``, or None.

    None means a run of the seed is missing.
    """
    best = best_batch_sizes(table, norm, sizes, seed)
    if not best:
        return None
    low, high = BEST_RANGE
    return any(low <= b <= high for b in best)


def _seed_values(table: dict, norm: str, batch_size: int) -> list[float]:
    return [a for (n, b, _), a in table.items() if n == norm and b == batch_size]


def _mean(table: dict, norm: str, batch_size: int):
    values = _seed_values(table, norm, batch_size)
    return sum(values) / len(values) if values else None


def _fmt_mean(values: dict, seeds) -> str:
    return f"{sum(values[s] for s in seeds) / len(seeds):.3f}"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
