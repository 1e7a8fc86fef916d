"""Effect sizes with intervals across seeds, and the three-way verdict."""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats

SUPPORTED = "SUPPORTED"
NOT_SUPPORTED = "NOT SUPPORTED"
INCONCLUSIVE = "INCONCLUSIVE"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Return ``(mean, low, high)``: the mean and its Student-t confidence interval.

    One value gives the interval (-inf, inf), because a single seed gives no estimate of the
    spread, so :func:`decide` returns INCONCLUSIVE. Equal values give a zero-width
    interval: the seeds agree, and the resolution of the grid that the claims state is the
    only uncertainty left.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, -math.inf, math.inf
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def decide(low: float, high: float, effect: float, margin: float) -> str:
    """Apply the shared decision rule to an effect where larger values favour the claim.

    SUPPORTED when the interval excludes zero and the effect reaches ``margin``; NOT
    SUPPORTED when even the upper end of the interval stays below ``margin``; INCONCLUSIVE
    otherwise.
    """
    if low > 0 and effect >= margin:
        return SUPPORTED
    if high < margin:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def decide_effects(effects: Sequence[float], margin: float) -> tuple[str, float, float, float]:
    """Return ``(verdict, mean, low, high)`` for per-seed ``effects``: their mean, its
    t-interval (:func:`t_interval`) and :func:`decide`'s verdict at ``margin``."""
    mean, low, high = t_interval(effects)
    return decide(low, high, mean, margin), mean, low, high


def final_accuracy(record, chance: float, metric: str = "val_acc") -> float:
    """Return the run's final ``metric``, or ``chance`` when the run diverged or the value
    is not finite: a run that did not train counts as guessing."""
    value = record.final.get(metric, math.nan)
    if record.status != "finished" or not math.isfinite(value):
        return chance
    return value


def accuracy_table(records, chance: float, fields: Sequence[str]) -> dict:
    """Return ``{(config field values..., seed): final val acc}`` over ``records``, with
    :func:`final_accuracy`'s chance for diverged runs. ``fields`` names the
    :class:`~normlab.train.config.TrainConfig` fields that tell the grid's cells apart."""
    return {
        tuple(getattr(r.config, name) for name in fields) + (r.config.seed,):
            final_accuracy(r, chance)
        for r in records
    }
