"""BN's momentum and eps matter, and a momentum in another framework's convention hurts.

PyTorch updates the running statistics as ``running = (1 - momentum) * running +
momentum * batch`` with a default momentum of 0.1. Keras and TensorFlow weight the
history instead (``moving = momentum * moving + (1 - momentum) * batch``, default 0.99
in ``tf.keras.layers.BatchNormalization``).
A Keras momentum of 0.1, or a Keras-style 0.9 copied into PyTorch, gives PyTorch's 0.9:
running statistics that are mostly the last training batch, which eval mode then uses.

Hypothesis: with BatchNorm evaluated in eval mode (running statistics), momentum 0.9 in
PyTorch's convention gives a lower held-out accuracy than PyTorch's default 0.1.

Grid: normlab's BatchNorm, SGD momentum 0.9 at lr 0.1, the budget of the data set, and
each (BN momentum, eps) pair over the seeds. Quick: BN momentum 0.01, 0.1, 0.9 and None
(a cumulative average) at eps 1e-5, plus eps 1e-3 and 1e-1 at BN momentum 0.1 (6 pairs,
the full grid's two axes through the default). Full: every pair of the four momenta and
the three eps values (12 pairs).

Metric: final validation accuracy in eval mode. The effect is acc(momentum 0.1) -
acc(momentum 0.9), both at eps 1e-5, in accuracy (1.0 = 100 points), paired by seed. A
diverged run counts as chance accuracy. The details hold the mean accuracy of every
pair, which shows the eps sweep.

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above 0
and the mean effect is at least 0.01 (1 accuracy point). NOT SUPPORTED when the upper
end of the interval is below 0.01. INCONCLUSIVE otherwise, or when no seed has both
runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, base_config
from .stats import accuracy_table, decide_effects

# the config fields that tell this grid's cells apart, for accuracy_table
TABLE_FIELDS = ("norm_momentum", "norm_eps")

MOMENTA: list[Optional[float]] = [0.01, 0.1, 0.9, None]
EPSILONS = [1e-5, 1e-3, 1e-1]
DEFAULT_MOMENTUM, FOREIGN_MOMENTUM, DEFAULT_EPS = 0.1, 0.9, 1e-5
LR = 0.1
MIN_EFFECT = 0.01  # accuracy, 1 point


def setting_grid(scale: str) -> list[tuple[Optional[float], float]]:
    """Return the ``(BN momentum, eps)`` pairs of ``scale``."""
    if scale == "full":
        return [(m, e) for m in MOMENTA for e in EPSILONS]
    return [(m, DEFAULT_EPS) for m in MOMENTA] + [
        (DEFAULT_MOMENTUM, e) for e in EPSILONS if e != DEFAULT_EPS
    ]


def momentum_label(momentum: Optional[float]) -> str:
    return "None (cumulative)" if momentum is None else f"{momentum:g}"


class MomentumEps(Claim):
    id = "momentum-eps"
    statement = (
        "BatchNorm's momentum and eps matter: a momentum in another framework's "
        "convention (0.9 in PyTorch's, which is Keras's 0.1) hurts eval accuracy."
    )
    hypothesis = (
        "In eval mode, BatchNorm with momentum 0.9 (PyTorch convention) gives a lower "
        "validation accuracy than with PyTorch's default momentum 0.1."
    )
    metric = (
        "Final validation accuracy in eval mode (running statistics); effect = "
        "acc(momentum 0.1) - acc(momentum 0.9) at eps 1e-5, paired by seed; diverged "
        "runs count as chance."
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
                norm=BN, lr=LR, norm_momentum=momentum, norm_eps=eps, seed=seed,
            )
            for momentum, eps in setting_grid(ctx.scale)
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        pairs = ", ".join(
            f"({momentum_label(m)}, {e:g})" for m, e in setting_grid(ctx.scale)
        )
        return (
            f"(BN momentum, eps) pairs {pairs} x {ctx.seeds} seeds, MLP 100-100 with "
            f"BatchNorm, SGD momentum 0.9 at lr {LR}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        chance = 1.0 / ctx.data.num_classes
        table = accuracy_table(records.values(), chance, TABLE_FIELDS)
        pairs = setting_grid(ctx.scale)
        details = {
            "lr": LR,
            "mean_val_acc": {
                f"momentum {momentum_label(m)}, eps {e:g}": _mean(table, m, e)
                for m, e in pairs
            },
        }
        label = "eval-mode val acc, momentum 0.1 - momentum 0.9 (PyTorch convention)"

        default, foreign = {}, {}
        for s in ctx.seed_list:
            default[s] = table.get((DEFAULT_MOMENTUM, DEFAULT_EPS, s))
            foreign[s] = table.get((FOREIGN_MOMENTUM, DEFAULT_EPS, s))
        seeds = [
            s for s in ctx.seed_list
            if default[s] is not None and foreign[s] is not None
        ]
        if not seeds:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="No seed has a finished or diverged run at both BN momentum "
                "0.1 and 0.9; rerun normlab verify.",
            )
        effects = [default[s] - foreign[s] for s in seeds]
        verdict, mean, low, high = decide_effects(effects, margin=MIN_EFFECT)
        details["per_seed_effect"] = effects

        by_momentum = ", ".join(
            f"{momentum_label(m)} {_fmt(_mean(table, m, DEFAULT_EPS))}" for m in MOMENTA
        )
        by_eps = ", ".join(
            f"{e:g} {_fmt(_mean(table, DEFAULT_MOMENTUM, e))}" for e in EPSILONS
        )
        summary = (
            f"Eval-mode validation accuracy by BN momentum at eps {DEFAULT_EPS:g}: "
            f"{by_momentum}. Momentum 0.1 beats 0.9 by {mean:+.3f} (95% CI "
            f"{low:+.3f} to {high:+.3f}). By eps at momentum 0.1: {by_eps}."
        )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        chance = 1.0 / ctx.data.num_classes
        table = accuracy_table(records.values(), chance, TABLE_FIELDS)
        by_momentum = [
            (momentum_label(m), _seed_values(table, m, DEFAULT_EPS)) for m in MOMENTA
        ]
        by_eps = [
            (f"{e:g}", _seed_values(table, DEFAULT_MOMENTUM, e)) for e in EPSILONS
        ]
        panels = [
            (f"BN momentum (PyTorch convention), eps {DEFAULT_EPS:g}", by_momentum),
            (f"BN eps, momentum {DEFAULT_MOMENTUM:g}", by_eps),
        ]
        path = plots.point_panels(
            panels,
            title=f"momentum-eps on {ctx.dataset}: final validation accuracy in eval "
            "mode, mean and seeds",
            path=out_dir / "momentum-eps_sweep.png",
            ylabel="final validation accuracy (eval mode)",
            sharey=True,
        )
        return [path]


def _seed_values(table: dict, momentum, eps: float) -> list[float]:
    return [a for (m, e, _), a in table.items() if m == momentum and e == eps]


def _mean(table: dict, momentum, eps: float):
    values = _seed_values(table, momentum, eps)
    return sum(values) / len(values) if values else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
