"""BN keeps gradients of deep networks on the same scale across layers.

Hypothesis: in deep MLPs, the ratio of the weight-gradient norms of the first and the
last layer, ||grad W_1|| / ||grad W_L||, stays closer to 1 with BatchNorm than without
normalization, at initialization and early in training, with sigmoid and with ReLU.

Grid: MLPs of 4, 8 and 16 hidden layers (quick) or 4 to 32 (full), 64 units each, with
sigmoid and with ReLU, with BatchNorm and with no normalization, each over the seeds.
Each run takes the first 50 (quick) or 200 (full) SGD updates at learning rate 0.1 with
momentum 0.9 and PyTorch's default initialization. Every 10 steps, from step 0, the
probed trainer stores the ratio from the backward pass of that step's update. W_1 is the
first hidden layer and W_L the output layer.

Metric: per run, the mean of |log10 ratio| over its probes, in decades; a ratio of 0 or
infinity (a gradient that underflowed or overflowed) counts as 40 decades. The effect
is, at the deepest depth of the grid and paired by seed, mean |log10 ratio| without
normalization minus with BatchNorm, averaged over the two activations. Effects per
activation and per depth are reported beside it.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.5 decade. NOT SUPPORTED when the upper end of the
interval is below 0.5 decade. INCONCLUSIVE otherwise, or when a seed lacks a run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, CONDITION_COLORS, CONDITION_LABELS, NO_NORM
from .ics import probed_config
from .stats import decide_effects, t_interval

LR = 0.1
WIDTH = 64
ACTIVATIONS = ("sigmoid", "relu")
DEPTHS = {"quick": [4, 8, 16], "full": [4, 8, 16, 32]}
MAX_STEPS = {"quick": 50, "full": 200}
PROBE_EVERY = 10
MARGIN = 0.5  # decades
MAX_DECADES = 40.0  # the |log10 ratio| given to a ratio of 0 or infinity


class GradientStability(Claim):
    id = "gradient-stability"
    task = "classify-probed"
    statement = (
        "BatchNorm keeps the gradients of the first and the last layer of a deep "
        "network on the same scale."
    )
    hypothesis = (
        "In deep MLPs (sigmoid and ReLU), ||grad W_1|| / ||grad W_L|| stays closer "
        "to 1 with BatchNorm than without normalization, at initialization and early "
        "in training."
    )
    metric = (
        "Per run, mean |log10(||grad W_1|| / ||grad W_L||)| over probes every "
        f"{PROBE_EVERY} steps from step 0; effect = that value without normalization "
        "minus with BatchNorm at the deepest depth, averaged over sigmoid and ReLU, "
        "paired by seed, in decades."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is at "
        f"least {MARGIN} decade; NOT SUPPORTED if the interval's upper end is below "
        f"{MARGIN}; otherwise INCONCLUSIVE (also when a seed lacks a run)."
    )

    def configs(self, ctx: StudyContext):
        return [
            self._config(ctx, norm, activation, depth, seed)
            for norm in (BN, NO_NORM)
            for activation in ACTIVATIONS
            for depth in DEPTHS[ctx.scale]
            for seed in ctx.seed_list
        ]

    def _config(self, ctx, norm: str, activation: str, depth: int, seed: int):
        config = probed_config(
            ctx, ["grad-ratio"], seed, norm=norm, lr=LR, activation=activation,
            hidden=(WIDTH,) * depth, max_steps=MAX_STEPS[ctx.scale],
        )
        return config.replace(probe_every=PROBE_EVERY)

    def grid(self, ctx: StudyContext) -> str:
        depths = ", ".join(str(d) for d in DEPTHS[ctx.scale])
        return (
            f"hidden layers {{{depths}}} of {WIDTH} units x {{sigmoid, ReLU}} x "
            f"{{BatchNorm, none}} x {ctx.seeds} seeds; first {MAX_STEPS[ctx.scale]} "
            f"updates of SGD momentum 0.9 at lr {LR:g}, gradient ratio every "
            f"{PROBE_EVERY} steps."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        table = decades_table(records.values())
        deepest = max(DEPTHS[ctx.scale])
        details = {
            "mean_abs_log10_ratio": {
                f"{norm}/{activation}/{depth}": {str(s): v for s, v in by_seed.items()}
                for (norm, activation, depth), by_seed in sorted(table.items())
            },
            "ratio_at_init": init_ratios(records.values()),
            "effect_by_activation": {},
        }
        label = (
            f"mean |log10 grad ratio| none - BatchNorm at depth {deepest}, decades"
        )

        per_activation = {}
        for activation in ACTIVATIONS:
            gaps = paired_gaps(table, activation, deepest, ctx.seed_list)
            if gaps is None:
                continue
            per_activation[activation] = gaps
            mean, low, high = t_interval(gaps)
            details["effect_by_activation"][activation] = {
                "mean": mean, "interval": [low, high], "per_seed": gaps
            }
        if len(per_activation) < len(ACTIVATIONS):
            missing = [a for a in ACTIVATIONS if a not in per_activation]
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"Some seeds have no run at depth {deepest} with "
                f"{', '.join(missing)}, so the paired effect is unknown.",
            )

        effects = [
            float(np.mean([per_activation[a][i] for a in ACTIVATIONS]))
            for i in range(len(ctx.seed_list))
        ]
        verdict, mean, low, high = decide_effects(effects, margin=MARGIN)
        details["per_seed_effect"] = effects

        parts = []
        for activation in ACTIVATIONS:
            bn = _mean(table.get((BN, activation, deepest), {}))
            none = _mean(table.get((NO_NORM, activation, deepest), {}))
            entry = details["effect_by_activation"][activation]
            parts.append(
                f"{activation}: none {none:.2f}, BN {bn:.2f} decades (difference "
                f"{entry['mean']:+.2f}, 95% CI {entry['interval'][0]:+.2f} to "
                f"{entry['interval'][1]:+.2f})"
            )
        summary = (
            f"Mean |log10 grad ratio| at depth {deepest}: {'; '.join(parts)}. Effect "
            f"{mean:+.2f} decades (95% CI {low:+.2f} to {high:+.2f})."
        )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        panels = []
        for activation in ACTIVATIONS:
            lines = []
            for norm in (BN, NO_NORM):
                runs = [
                    r for r in records.values()
                    if r.config.norm == norm and r.config.activation == activation
                ]
                for when, style in (("init", "-"), ("last", "--")):
                    lines.append((
                        f"{CONDITION_LABELS[norm]}, {_when_label(when, runs)}",
                        CONDITION_COLORS[norm],
                        style,
                        ratios_by_depth(runs, when),
                    ))
            panels.append((activation, lines))
        path = plots.depth_lines(
            panels,
            ylabel="||grad W_1|| / ||grad W_L|| (log scale)",
            title=f"gradient-stability on {ctx.dataset}: first / last layer gradient "
            "norm against depth (geometric mean over seeds, dots = seeds)",
            path=out_dir / "gradient-stability_ratio.png",
        )
        return [path]


def abs_decades(ratio: float) -> float:
    """Return |log10 ratio|, capped at ``MAX_DECADES``; NaN for a NaN ratio."""
    if math.isnan(ratio):
        return math.nan
    if ratio <= 0 or math.isinf(ratio):
        return MAX_DECADES
    return min(abs(math.log10(ratio)), MAX_DECADES)


def probe_ratios(record) -> list[tuple[int, float]]:
    """Return ``(step, grad_ratio)`` for every probe row of ``record``.

    The store writes a ratio of 0 as 0 and an infinite one as missing (NaN), so a row
    with both gradient norms but no ratio is rebuilt from them.
    """
    ratios = []
    for row in record.history:
        if "grad_ratio" not in row and "grad_first" not in row:
            continue
        ratio = row.get("grad_ratio", math.nan)
        if ratio is None or math.isnan(ratio):
            first = row.get("grad_first", math.nan)
            last = row.get("grad_last", math.nan)
            if math.isfinite(first) and math.isfinite(last) and first > 0:
                ratio = first / last if last > 0 else math.inf
            else:
                ratio = math.nan
        ratios.append((row["step"], ratio))
    return ratios


def decades_table(records) -> dict:
    """Return ``{(norm, activation, depth): {seed: mean |log10 ratio|}}``."""
    table: dict = {}
    for record in records:
        config = record.config
        values = [abs_decades(r) for _, r in probe_ratios(record)]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            continue
        key = (config.norm, config.activation, len(config.hidden))
        table.setdefault(key, {})[config.seed] = float(np.mean(values))
    return table


def paired_gaps(table: dict, activation: str, depth: int, seeds) -> list[float] | None:
    """Return none - BatchNorm per seed at ``depth``, or None if a seed lacks a run."""
    bn = table.get((BN, activation, depth), {})
    none = table.get((NO_NORM, activation, depth), {})
    if any(s not in bn or s not in none for s in seeds):
        return None
    return [none[s] - bn[s] for s in seeds]


def init_ratios(records) -> dict:
    """Return the geometric mean over seeds of the step-0 ratio, per run setting."""
    by_key: dict = {}
    for record in records:
        ratios = dict(probe_ratios(record))
        if 0 in ratios:
            c = record.config
            key = f"{c.norm}/{c.activation}/{len(c.hidden)}"
            by_key.setdefault(key, []).append(ratios[0])
    return {key: _geometric_mean(values) for key, values in sorted(by_key.items())}


def ratios_by_depth(runs, when: str) -> dict:
    """Return ``{depth: [ratio per run]}`` at step 0 (``"init"``) or the last probe."""
    by_depth: dict = {}
    for record in runs:
        ratios = [(s, r) for s, r in probe_ratios(record) if math.isfinite(r) and r > 0]
        if not ratios:
            continue
        step, ratio = ratios[0] if when == "init" else ratios[-1]
        if when == "init" and step != 0:
            continue
        by_depth.setdefault(len(record.config.hidden), []).append(ratio)
    return by_depth


def _when_label(when: str, runs) -> str:
    if when == "init":
        return "step 0"
    last = max(
        (s for r in runs for s, ratio in probe_ratios(r) if math.isfinite(ratio)),
        default=0,
    )
    return f"last probe (step {last})"


def _geometric_mean(values) -> float:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if not positive:
        return math.nan
    return float(10 ** np.mean(np.log10(positive)))


def _mean(values: dict) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
