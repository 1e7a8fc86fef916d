"""BN makes the loss landscape smoother (Santurkar et al., 2018, section 3.1).

Santurkar, Tsipras, Ilyas and Madry (2018, "How Does Batch Normalization Help
Optimization?", https://arxiv.org/abs/1805.11604) measure, along the gradient direction
during training, how much the loss and its gradient change, and find both change less
with BatchNorm.

Hypothesis: along training at the same learning rate, the effective beta-smoothness of
the loss is lower with BatchNorm than without normalization.

Grid: the MLP 100-100 with ReLU, SGD with momentum 0.9 at learning rate 0.1 and the
budget of the data set, with BatchNorm and with no normalization, each over the seeds.
Every 5 evaluation intervals, ``normlab.probes.landscape_step`` moves the parameters
along the gradient of the batch of the next update, by 4 step sizes from 0.05 to 0.4
times the learning rate, and measures the loss variation, the gradient predictiveness
(max ||grad(w - eta g) - g||) and the effective beta-smoothness (max ||grad(w - eta g)
- g|| / ||eta g||).

Metric: per run, the mean beta over its probes (step 0 included). The effect is
log10(mean beta without normalization / mean beta with BatchNorm), in decades, paired by
seed. The same ratio for the loss variation and the gradient predictiveness is
reported beside it.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least log10(1.5), so beta is at least 1.5 times lower with
BatchNorm. NOT SUPPORTED when the upper end of the interval is below log10(1.5).
INCONCLUSIVE otherwise, or when a seed lacks a finite beta in either condition.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, CONDITION_COLORS, CONDITION_LABELS, NO_NORM
from .ics import probed_config, run_mean
from .stats import decide, t_interval

LR = 0.1
LANDSCAPE_POINTS = 4
MIN_RATIO = 1.5
MEASURES = {
    "beta": "effective beta-smoothness",
    "loss_variation": "loss variation",
    "grad_pred": "gradient predictiveness",
}


class Smoothness(Claim):
    id = "smoothness"
    task = "classify-probed"
    statement = "BatchNorm makes the loss landscape smoother."
    hypothesis = (
        "Along training at the same learning rate, the effective beta-smoothness of "
        "the loss along the gradient is lower with BatchNorm than without "
        "normalization."
    )
    metric = (
        "Per run, the mean effective beta-smoothness over the probes (Santurkar et al. "
        "2018, along the gradient, step sizes 0.05 to 0.4 times lr); effect = "
        "log10(beta none / beta BN), in decades, paired by seed."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least log10({MIN_RATIO}) = {math.log10(MIN_RATIO):.3f} decade; NOT SUPPORTED "
        f"if the interval's upper end is below {math.log10(MIN_RATIO):.3f}; otherwise "
        "INCONCLUSIVE (also when a seed lacks a finite beta)."
    )

    def configs(self, ctx: StudyContext):
        return [
            self._config(ctx, norm, seed)
            for norm in (BN, NO_NORM)
            for seed in ctx.seed_list
        ]

    def _config(self, ctx: StudyContext, norm: str, seed: int):
        return probed_config(
            ctx, ["landscape"], seed, norm=norm, lr=LR,
            landscape_points=LANDSCAPE_POINTS,
        )

    def grid(self, ctx: StudyContext) -> str:
        probe_every = self._config(ctx, BN, 0).probe_every
        return (
            f"{{BatchNorm, none}} x {ctx.seeds} seeds, MLP 100-100 ReLU, SGD momentum "
            f"0.9, lr {LR:g}; landscape probed every {probe_every} steps with "
            f"{LANDSCAPE_POINTS} step sizes from {0.05 * LR:g} to {0.4 * LR:g}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        runs = {(r.config.norm, r.config.seed): r for r in records.values()}
        means = {
            name: {
                norm: {
                    seed: run_mean(runs[(norm, seed)], name)
                    for seed in ctx.seed_list
                    if (norm, seed) in runs
                }
                for norm in (BN, NO_NORM)
            }
            for name in MEASURES
        }
        details = {
            "run_means": {
                name: {n: {str(s): v for s, v in m.items()} for n, m in by_norm.items()}
                for name, by_norm in means.items()
            },
            "log10_ratio_none_over_bn": {},
        }

        ratios = {name: log_ratios(means[name], ctx.seed_list) for name in MEASURES}
        for name, values in ratios.items():
            if values is not None:
                mean, low, high = t_interval(values)
                details["log10_ratio_none_over_bn"][name] = {
                    "mean": mean, "interval": [low, high], "per_seed": values
                }
        label = "log10(mean beta none / mean beta BatchNorm), decades"
        if ratios["beta"] is None:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="Some seeds have no finite beta-smoothness in one condition, "
                "so the paired ratio is unknown.",
            )

        mean, low, high = t_interval(ratios["beta"])
        verdict = decide(low, high, mean, margin=math.log10(MIN_RATIO))

        parts = []
        for name, text in MEASURES.items():
            entry = details["log10_ratio_none_over_bn"].get(name)
            if entry is None:
                continue
            bn = _mean(means[name][BN])
            none = _mean(means[name][NO_NORM])
            ratio_low, ratio_high = (10**v for v in entry["interval"])
            parts.append(
                f"{text} BN {bn:.3g} vs none {none:.3g} (none/BN "
                f"{10 ** entry['mean']:.2f}x, 95% CI {ratio_low:.2f}x to "
                f"{ratio_high:.2f}x)"
            )
        summary = (
            f"Mean over training: {'; '.join(parts)}. Effect {mean:+.3f} decades "
            f"(95% CI {low:+.3f} to {high:+.3f})."
        )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        panels = [(name, text, True) for name, text in MEASURES.items()]
        groups = [
            (
                CONDITION_LABELS[norm],
                CONDITION_COLORS[norm],
                [r for r in records.values() if r.config.norm == norm],
            )
            for norm in (BN, NO_NORM)
        ]
        path = plots.metric_bands(
            panels,
            groups,
            title=f"smoothness on {ctx.dataset}: landscape along the gradient against "
            "step (mean, band = min to max over seeds)",
            path=out_dir / "smoothness_curves.png",
        )
        return [path]


def log_ratios(means: dict, seeds) -> list[float] | None:
    """Return log10(none / BN) per seed, or None when a seed lacks a positive value."""
    values = []
    for seed in seeds:
        bn = means[BN].get(seed, math.nan)
        none = means[NO_NORM].get(seed, math.nan)
        if not (math.isfinite(bn) and math.isfinite(none) and bn > 0 and none > 0):
            return None
        values.append(math.log10(none / bn))
    return values


def _mean(values: dict) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
