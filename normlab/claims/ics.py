"""BN does not work by reducing internal covariate shift (Santurkar et al., 2018).

Santurkar, Tsipras, Ilyas and Madry (2018, "How Does Batch Normalization Help
Optimization?", https://arxiv.org/abs/1805.11604) argue that BatchNorm does not reduce
internal covariate shift (ICS) in their gradient-based sense, yet trains better. They
also show that "noisy BatchNorm", BatchNorm followed by noise whose mean and variance
change at every step, still trains about as well as BatchNorm.

Hypothesis: an MLP whose BatchNorm layers are followed by such noise reaches a final
validation accuracy no more than 2 points below the same MLP with plain BatchNorm.

Grid: the MLP 100-100 with ReLU, SGD with momentum 0.9 at learning rate 0.1 and the
budget of the data set, for three conditions: no normalization, BatchNorm, and noisy
BatchNorm, each over the seeds. Noisy BatchNorm multiplies each channel after BatchNorm
by s ~ U(0.5, 1.5) and adds m ~ U(-1, 1). It draws s and m afresh per channel at every
training step and adds no noise in eval mode (``normlab.train.probed.NoisyBatchNorm``).
Every 5 evaluation intervals, the ICS of each linear layer after the first is measured
on the batch of the next update, with the run's optimizer (``normlab.probes.ics_step``):
l2 = ||G - G'|| and the cosine between G and G'.

Metric: per seed, d = final val acc(BatchNorm) - final val acc(noisy BatchNorm), in
accuracy (1.0 = 100 points). A diverged run counts as chance accuracy (1 / classes).
The ICS of each condition (mean l2 and cosine over layers and probes, then over seeds)
and the accuracy gain of BatchNorm over no normalization are reported beside it.

Decision rule: take the 95% t-interval of d across seeds. SUPPORTED when its upper end
is at most 0.02, so noisy BatchNorm is at most 2 points worse. NOT SUPPORTED when its
lower end is above 0.02, so noisy BatchNorm is worse by more than 2 points.
INCONCLUSIVE otherwise, or when a seed lacks a run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..report import plots
from ..store import RunRecord
from ..train.probed import ProbedConfig
from .base import Claim, StudyContext, Verdict
from .budget import BN, CONDITION_COLORS, CONDITION_LABELS, NO_NORM, base_config
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, final_accuracy, t_interval

LR = 0.1
MARGIN = 0.02  # accuracy, 2 points
NOISE_SHIFT = 1.0  # m ~ U(-1, 1)
NOISE_SCALE = 0.5  # s ~ U(0.5, 1.5)
# probes run every PROBE_EVALS evaluation intervals of the data set's budget
PROBE_EVALS = 5

NOISY_BN = "noisy-batchnorm"
CONDITIONS = (NO_NORM, BN, NOISY_BN)
LABELS = {**CONDITION_LABELS, NOISY_BN: "noisy BatchNorm"}
COLORS = {**CONDITION_COLORS, NOISY_BN: "tab:green"}
_LAYER_KEY = re.compile(r"ics_l2_layer(\d+)$")


def probed_config(ctx: StudyContext, probes, seed: int, **changes) -> ProbedConfig:
    """Return the data set's base MLP config for ``seed`` as a probed run.

    Probes run every ``PROBE_EVALS`` evaluation intervals of the budget.
    """
    base = base_config(ctx.dataset, ctx.scale, ctx.device, seed=seed)
    return ProbedConfig.from_train_config(
        base, probes=tuple(probes), probe_every=PROBE_EVALS * base.eval_every, **changes
    )


def metric_values(record: RunRecord, name: str) -> list[float]:
    """Return the finite values of ``name`` in the history of ``record``, by step."""
    values = [row.get(name, math.nan) for row in record.history]
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def run_mean(record: RunRecord, name: str) -> float:
    """Return the mean of the finite values of ``name`` over the run, or NaN."""
    values = metric_values(record, name)
    return float(np.mean(values)) if values else math.nan


def condition_of(config: ProbedConfig) -> str:
    if config.norm == BN and config.noisy:
        return NOISY_BN
    return config.norm


def ics_layers(records) -> list[int]:
    """Return the numbers of the layers whose ICS the runs stored, in order."""
    layers = set()
    for record in records:
        for row in record.history:
            for name in row:
                match = _LAYER_KEY.match(name)
                if match:
                    layers.add(int(match.group(1)))
    return sorted(layers)


class InternalCovariateShift(Claim):
    id = "ics"
    task = ProbedConfig.task
    statement = (
        "BatchNorm does not work by reducing internal covariate shift: noisy "
        "BatchNorm, which shifts every layer's input distribution at every step, "
        "trains about as well as BatchNorm."
    )
    hypothesis = (
        "An MLP with noise (per-channel scale and shift redrawn every step) after each "
        "BatchNorm reaches a final validation accuracy at most 2 points below plain "
        "BatchNorm."
    )
    metric = (
        "Per seed, d = final val acc(BatchNorm) - final val acc(noisy BatchNorm), "
        "in accuracy; diverged runs count as chance. ICS l2 = ||G - G'|| and "
        "cos(G, G') per layer (Santurkar et al. 2018) are reported beside it."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval of d across seeds ends at or below "
        f"{MARGIN}; NOT SUPPORTED if it starts above {MARGIN}; otherwise "
        "INCONCLUSIVE (also when a seed lacks a run)."
    )

    def configs(self, ctx: StudyContext):
        return [
            self._config(ctx, condition, seed)
            for condition in CONDITIONS
            for seed in ctx.seed_list
        ]

    def _config(self, ctx: StudyContext, condition: str, seed: int) -> ProbedConfig:
        noise = {}
        if condition == NOISY_BN:
            noise = {"noise_shift": NOISE_SHIFT, "noise_scale": NOISE_SCALE}
        norm = NO_NORM if condition == NO_NORM else BN
        return probed_config(ctx, ["ics"], seed, norm=norm, lr=LR, **noise)

    def grid(self, ctx: StudyContext) -> str:
        probe_every = self._config(ctx, BN, 0).probe_every
        return (
            f"{{none, BatchNorm, noisy BatchNorm (s ~ U({1 - NOISE_SCALE:g}, "
            f"{1 + NOISE_SCALE:g}), m ~ U(-{NOISE_SHIFT:g}, {NOISE_SHIFT:g}) per "
            f"channel and step)}} x {ctx.seeds} seeds, MLP 100-100 ReLU, SGD momentum "
            f"0.9, lr {LR:g}; ICS measured every {probe_every} steps."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        runs = {(condition_of(r.config), r.config.seed): r for r in records.values()}
        num_classes = ctx.data.num_classes
        accuracy = {
            condition: {
                seed: final_accuracy(runs[(condition, seed)], 1.0 / num_classes)
                for seed in ctx.seed_list
                if (condition, seed) in runs
            }
            for condition in CONDITIONS
        }
        layers = ics_layers(records.values())
        details = {
            "final_val_acc": {
                c: {str(s): a for s, a in by_seed.items()}
                for c, by_seed in accuracy.items()
            },
            "noise": {"shift_half_width": NOISE_SHIFT, "scale_half_width": NOISE_SCALE},
            "ics": ics_summary(runs, layers),
        }
        label = "val acc(BatchNorm) - val acc(noisy BatchNorm), accuracy"

        missing = [
            LABELS[c] for c in (BN, NOISY_BN) if len(accuracy[c]) < len(ctx.seed_list)
        ]
        if missing:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"Some seeds have no run of {', '.join(missing)}, so the "
                "paired difference is unknown.",
            )

        gaps = [accuracy[BN][s] - accuracy[NOISY_BN][s] for s in ctx.seed_list]
        mean, low, high = t_interval(gaps)
        verdict = equivalence_verdict(low, high)
        details["per_seed_gap"] = gaps
        summary = (
            f"Final val acc: BatchNorm {_mean(accuracy[BN]):.3f}, noisy BatchNorm "
            f"{_mean(accuracy[NOISY_BN]):.3f}, none {_mean(accuracy[NO_NORM]):.3f}; "
            f"BN - noisy BN = {mean:+.3f} (95% CI {low:+.3f} to {high:+.3f})."
        )

        # the accuracy gain of BatchNorm over no normalization, beside the verdict
        if len(accuracy[NO_NORM]) == len(ctx.seed_list):
            gain = [accuracy[BN][s] - accuracy[NO_NORM][s] for s in ctx.seed_list]
            g_mean, g_low, g_high = t_interval(gain)
            details["bn_minus_none_val_acc"] = {
                "mean": g_mean, "interval": [g_low, g_high], "per_seed": gain
            }
            summary += (
                f" BN - none = {g_mean:+.3f} (95% CI {g_low:+.3f} to {g_high:+.3f})."
            )
        summary += " " + _ics_sentence(details["ics"])
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        layers = ics_layers(records.values())
        panels = []
        for layer in layers:
            text = f"ICS ||G - G'||, layer {layer}"
            panels.append((f"ics_l2_layer{layer}", text, True))
        for layer in layers:
            text = f"ICS cos(G, G'), layer {layer}"
            panels.append((f"ics_cos_layer{layer}", text, False))
        panels.append(("val_acc", "validation accuracy", False))
        groups = []
        for condition in CONDITIONS:
            runs = [r for r in records.values() if condition_of(r.config) == condition]
            groups.append((LABELS[condition], COLORS[condition], runs))
        path = plots.metric_bands(
            panels,
            groups,
            title=f"ics on {ctx.dataset}: ICS and accuracy against step "
            "(mean, band = min to max over seeds)",
            path=out_dir / "ics_curves.png",
        )
        return [path]


def equivalence_verdict(low: float, high: float) -> str:
    """Apply the rule to the interval of acc(BN) - acc(noisy BN)."""
    if high <= MARGIN:
        return SUPPORTED
    if low > MARGIN:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def ics_summary(runs: dict, layers: list[int]) -> dict:
    """Return, per condition, the mean ICS l2 and cosine over layers, probes and seeds.

    Each run first averages its probes per layer, then its layers; the result is the
    mean of those run values over seeds. Per-layer means are kept under ``by_layer``.
    """
    summary = {}
    for condition in CONDITIONS:
        chosen = [r for (c, _), r in runs.items() if c == condition]
        if not chosen or not layers:
            continue
        entry = {"by_layer": {}}
        for measure in ("l2", "cos"):
            per_layer = {
                layer: [run_mean(r, f"ics_{measure}_layer{layer}") for r in chosen]
                for layer in layers
            }
            per_run = [
                _nan_mean([per_layer[layer][index] for layer in layers])
                for index in range(len(chosen))
            ]
            entry[measure] = _nan_mean(per_run)
            for layer, values in per_layer.items():
                by_layer = entry["by_layer"].setdefault(str(layer), {})
                by_layer[measure] = _nan_mean(values)
        summary[condition] = entry
    return summary


def _ics_sentence(ics: dict) -> str:
    parts = [
        f"{LABELS[c]} l2 {ics[c]['l2']:.3g}, cos {ics[c]['cos']:.3f}"
        for c in CONDITIONS
        if c in ics
    ]
    if not parts:
        return "No ICS probe values were stored."
    sentence = "Mean ICS over layers and steps: " + "; ".join(parts) + "."
    if BN in ics and NO_NORM in ics:
        lower = ics[BN]["l2"] < ics[NO_NORM]["l2"]
        sentence += (
            f" BatchNorm's ICS l2 is {'lower' if lower else 'not lower'} than without "
            "normalization."
        )
    return sentence


def _nan_mean(values) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _mean(values: dict) -> float:
    return float(np.mean(list(values.values())))
