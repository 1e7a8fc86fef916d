"""BN makes training converge faster (Ioffe & Szegedy, 2015, figure 1 and section 4.2).

Hypothesis: at its own best learning rate, an MLP with BatchNorm reaches a target
validation accuracy in fewer steps than the same MLP without normalization.

Grid: five learning rates 0.01 to 1 (half-decade steps) for BatchNorm and for no
normalization, each over the seeds, with the budget of the data set. These configs are a
subset of the ``higher-lr`` grid, so the two claims share their runs.

Metric: steps until the validation accuracy first reaches the data set's target (fixed in
``TARGETS``). Each condition uses the learning rate with the lowest median steps across
seeds (ties go to the higher mean final accuracy). The effect is the speedup
steps(none) / steps(BN), a geometric mean over seeds paired by seed. A run that never
reaches the target counts as taking the whole budget, which understates its slowness.

Decision rule: SUPPORTED when the 95% interval of the speedup lies above 1 and the speedup
is at least 1.25x. NOT SUPPORTED when the upper end of the interval is below 1.25x.
INCONCLUSIVE otherwise, or when neither condition reaches the target.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..report import plots
from .base import Claim, StudyContext, Verdict
from .budget import BN, CONDITION_LABELS, NO_NORM, base_config
from .stats import INCONCLUSIVE, decide, t_interval

# Target validation accuracy per data set, fixed before any run of this claim. Each is an
# estimate of a level that the tutorial MLP passes within the quick budget, with or without BN.
TARGETS = {"digits": 0.90, "mnist": 0.97, "cifar10": 0.35}
LRS = [0.01, 0.031623, 0.1, 0.316228, 1.0]
MIN_SPEEDUP = 1.25


class FasterConvergence(Claim):
    id = "faster-convergence"
    statement = "BatchNorm makes training converge faster."
    hypothesis = (
        "At its own best learning rate, the MLP with BatchNorm reaches the target validation "
        "accuracy in fewer steps than without normalization."
    )
    metric = (
        "Speedup = steps to target without BN / steps to target with BN, each at the lr "
        "that reaches the target fastest (median over seeds); geometric mean over seeds."
    )
    decision_rule = (
        f"SUPPORTED if the 95% interval of the speedup lies above 1x and the speedup is at "
        f"least {MIN_SPEEDUP}x; NOT SUPPORTED if the interval's upper end is below "
        f"{MIN_SPEEDUP}x; otherwise INCONCLUSIVE (also when neither reaches the target)."
    )

    def target(self, ctx: StudyContext) -> float:
        return TARGETS[ctx.dataset]

    def configs(self, ctx: StudyContext):
        return [
            base_config(ctx.dataset, ctx.scale, ctx.device, norm=norm, lr=lr, seed=seed)
            for norm in (BN, NO_NORM)
            for lr in LRS
            for seed in ctx.seed_list
        ]

    def grid(self, ctx: StudyContext) -> str:
        return (
            f"learning rates {', '.join(f'{lr:.3g}' for lr in LRS)} x {{BatchNorm, none}} x "
            f"{ctx.seeds} seeds, MLP 100-100, SGD momentum 0.9; target validation accuracy "
            f"{self.target(ctx):.2f}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        target = self.target(ctx)
        runs = list(records.values())
        budget = max((r.steps or 0 for r in runs), default=0)
        best = {norm: best_lr(runs, norm, target) for norm in (BN, NO_NORM)}
        steps = {
            norm: {s: steps_to_target(_find(runs, norm, best[norm], s), target)
                   for s in ctx.seed_list}
            for norm in (BN, NO_NORM)
        }
        details = {
            "target_val_acc": target,
            "best_lr": best,
            "steps_to_target": {n: {str(s): v for s, v in m.items()} for n, m in steps.items()},
            "budget_steps": budget,
        }
        label = "speedup, steps(none) / steps(BN), x"
        reached = {n: [v for v in m.values() if v is not None] for n, m in steps.items()}
        if not reached[BN] and not reached[NO_NORM]:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"Neither condition reached {target:.2f} validation accuracy within "
                f"{budget} steps; raise the budget (--full) to test this claim.",
            )
        logs = []
        for s in ctx.seed_list:
            bn = steps[BN][s] if steps[BN][s] is not None else budget
            none = steps[NO_NORM][s] if steps[NO_NORM][s] is not None else budget
            logs.append(math.log2(none / bn))
        mean, low, high = t_interval(logs)
        effect, interval = 2**mean, (2**low, 2**high)
        verdict = decide(low, high, mean, margin=math.log2(MIN_SPEEDUP))
        first_eval = min(
            (r.history[0]["step"] for r in runs if r.history), default=0
        )
        at_first = [n for n, m in steps.items() if all(v == first_eval for v in m.values())]
        details["per_seed_speedup"] = [2**v for v in logs]
        summary = (
            f"Steps to {target:.2f} validation accuracy: BatchNorm "
            f"{_steps_list(steps[BN])} at lr {best[BN]:.3g}, none "
            f"{_steps_list(steps[NO_NORM])} at lr {best[NO_NORM]:.3g}; speedup {effect:.2f}x "
            f"(95% CI {interval[0]:.2f}x to {interval[1]:.2f}x)."
        )
        if len(reached[NO_NORM]) < ctx.seeds or len(reached[BN]) < ctx.seeds:
            summary += f" Runs that never reached the target count as {budget} steps."
        if at_first:
            verdict = INCONCLUSIVE
            summary += (
                f" {', '.join(CONDITION_LABELS[n] for n in at_first)} reached the target at"
                f" the first evaluation (step {first_eval}) in every seed, so its speed is"
                " not resolved; evaluate more often or raise the target."
            )
        return self.verdict(
            ctx, records, verdict=verdict, effect=effect, interval=interval,
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        target = self.target(ctx)
        runs = list(records.values())
        selected = []
        for norm in (BN, NO_NORM):
            lr = best_lr(runs, norm, target)
            label = f"{CONDITION_LABELS[norm]} (lr {lr:.3g})"
            selected.append((label, [r for r in runs if r.config.norm == norm and r.config.lr == lr]))
        path = plots.accuracy_curves(
            selected,
            target=target,
            title=f"faster-convergence on {ctx.dataset}: each at its best learning rate",
            path=out_dir / "faster-convergence_curves.png",
        )
        return [path]


def steps_to_target(record, target: float):
    """Return the first evaluated step with validation accuracy >= ``target``, or None.

    A run that diverged later counts as never reaching the target.
    """
    if record is None or record.status != "finished":
        return None
    for row in record.history:
        if row["val_acc"] >= target:
            return row["step"]
    return None


def best_lr(runs, norm: str, target: float) -> float:
    """Return the lr at which ``norm`` reaches ``target`` fastest (median over seeds)."""
    by_lr: dict[float, list] = {}
    for record in runs:
        if record.config.norm == norm:
            by_lr.setdefault(record.config.lr, []).append(record)

    def score(lr):
        # diverged runs count as never reaching the target
        steps = [steps_to_target(r, target) for r in by_lr[lr]]
        median = statistics.median(math.inf if s is None else s for s in steps)
        accs = [r.final.get("val_acc", math.nan) for r in by_lr[lr]]
        mean_acc = sum(a if math.isfinite(a) else 0.0 for a in accs) / len(accs)
        return (median, -mean_acc)

    return min(by_lr, key=score)


def _find(runs, norm, lr, seed):
    for record in runs:
        c = record.config
        if c.norm == norm and c.lr == lr and c.seed == seed:
            return record
    return None


def _steps_list(values: dict) -> str:
    return "[" + ", ".join("never" if v is None else str(v) for _, v in sorted(values.items())) + "]"
