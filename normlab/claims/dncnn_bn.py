"""Residual learning with BN gives DnCNN its best denoising (Zhang et al., 2017).

Zhang, Zuo, Chen, Meng and Zhang, "Beyond a Gaussian Denoiser: Residual Learning of
Deep CNN for Image Denoising", IEEE TIP 26(7), 2017. Its abstract states that
"residual learning and batch normalization are utilized to speed up the training
process as well as boost the denoising performance".

Hypothesis: at noise level 25 and the same number of steps, DnCNN with residual
learning and BatchNorm (RL+BN) reaches a higher final test PSNR than each of the three
other combinations. These are residual learning without BN, BN without residual
learning, and neither.

Grid: {residual learning on, off} x {BatchNorm, none} x seeds, Adam at lr 1e-3, MSE
loss, the same steps and patches for all four. Quick: DnCNN of depth 8 with 24
features, 120 steps of 8 32x32 patches, on the scikit-image photographs (or the data
folder's sets), at most 3 seeds, evaluated on 96x96 central crops. Full: DnCNN-S
(depth 17, 64 features, batches of 128 40x40 patches), BSD400 -> BSD68 and Set12 on
whole images, 50 epochs of 1600 steps with the learning rate cut to 1e-4 after epoch
30.

Metric: per seed, the final test PSNR of RL+BN minus that of the best other
combination, the one with the highest mean final PSNR over seeds; in dB, on the first
test set. A diverged run scores the PSNR of its noisy input (no denoising).

Decision rule: SUPPORTED when the 95% t-interval of the effect lies above 0 and the
mean effect is at least 0.05 dB. NOT SUPPORTED when the upper end of the interval is
below 0.05 dB. INCONCLUSIVE otherwise, or with fewer than 2 seeds.

NOTE: in the quick budget's 120 steps the BN networks are still recovering from
their large initial output, so the quick verdict says little about the full-scale
claim. Only the full budget trains long enough to test it.

Secondary figures, reported without a verdict:

- "BN makes DnCNN converge about 1.5x faster": with residual learning, the steps that
  BN and no BN need to reach a target validation PSNR. The target is fixed by this
  rule before any run: the lower of the two conditions' mean final validation PSNR,
  minus 0.1 dB. The ratio steps(no BN) / steps(BN) is a geometric mean over seeds
  with a t-interval on log2. Steps are counted at evaluations, so their resolution is
  ``eval_every``, and a run that never reaches the target counts as the whole budget.
- "up to +1 dB": the gap of RL+BN over each other combination, with its interval.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..report import plots
from ..train.restoration import (
    DenoiseConfig,
    center_crop,
    denoise_pairs,
    load_claim_data,
    restore,
    score,
    trained_model,
)
from .base import Claim, StudyContext, Verdict
from .stats import decide_effects, t_interval

SIGMA = 25.0
MARGIN_DB = 0.05
TARGET_OFFSET_DB = 0.1
CLAIMED_SPEEDUP = 1.5
CLAIMED_GAIN_DB = 1.0

# DenoiseConfig settings per scale, and the most seeds each scale trains.
BUDGETS = {
    "quick": dict(
        depth=8,
        features=24,
        batch_size=8,
        patch_size=32,
        steps=120,
        patches_per_epoch=960,
        eval_every=20,
        val_crop=96,
        test_crop=96,
    ),
    "full": dict(
        depth=17,
        features=64,
        batch_size=128,
        steps=50 * 1600,
        patches_per_epoch=128 * 1600,
        eval_every=1600,
        lr_milestones=(30 * 1600,),
        lr_gamma=0.1,
        val_crop=None,
        test_crop=None,
    ),
}
MAX_SEEDS = {"quick": 3, "full": None}

# residual learning and norm of each condition; the hypothesis favours the first
RL_BN, RL, BN, PLAIN = "rl+bn", "rl", "bn", "plain"
CONDITIONS = {
    RL_BN: (True, "batchnorm"),
    RL: (True, "none"),
    BN: (False, "batchnorm"),
    PLAIN: (False, "none"),
}
LABELS = {
    RL_BN: "residual + BN",
    RL: "residual, no BN",
    BN: "BN, no residual",
    PLAIN: "neither",
}
COLORS = {RL_BN: "tab:blue", RL: "tab:orange", BN: "tab:green", PLAIN: "tab:red"}
# side of the central region shown in the example figure
EXAMPLE_SIZE = 160


def seed_list(ctx: StudyContext) -> list[int]:
    """Return the seeds of ``ctx``, capped by the scale's ``MAX_SEEDS``."""
    return ctx.seeds_up_to(MAX_SEEDS[ctx.scale])


class DnCNNBatchNorm(Claim):
    id = "dncnn-bn"
    task = "denoise"
    statement = (
        "Residual learning with BatchNorm gives DnCNN its best denoising, converging "
        "about 1.5x faster and gaining up to 1 dB."
    )
    hypothesis = (
        "At noise level 25 and the same number of steps, DnCNN with residual learning "
        "and BatchNorm reaches a higher final test PSNR than each of the three other "
        "combinations of residual learning and BatchNorm."
    )
    metric = (
        "PSNR(residual + BN) - PSNR(best other combination) in dB, on the first test "
        "set, paired by seed; the best other has the highest mean final PSNR. A "
        "diverged run scores the PSNR of its noisy input."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 dB and the mean is "
        f"at least {MARGIN_DB} dB; NOT SUPPORTED if the interval's upper end is below "
        f"{MARGIN_DB} dB; otherwise INCONCLUSIVE (also with fewer than 2 seeds)."
    )

    def load_data(self, dataset: str, data_dir, download: bool):
        """Load BSD400/BSD68/Set12 from ``data_dir``, or the scikit-image photographs.

        ``dataset`` names a classification set and is not used. A ``data_dir`` without
        the denoising sets falls back to the photographs with a warning, so that one
        ``--data-dir`` can serve claims of several tasks.
        """
        data = load_claim_data("denoise", data_dir, download)
        return data.name, data

    def config(self, ctx: StudyContext, condition: str, seed: int) -> DenoiseConfig:
        residual, norm = CONDITIONS[condition]
        return DenoiseConfig(
            dataset=ctx.dataset,
            norm=norm,
            residual=residual,
            sigma=SIGMA,
            lr=1e-3,
            seed=seed,
            device=ctx.device,
            **BUDGETS[ctx.scale],
        )

    def configs(self, ctx: StudyContext):
        return [
            self.config(ctx, condition, seed)
            for condition in CONDITIONS
            for seed in seed_list(ctx)
        ]

    def grid(self, ctx: StudyContext) -> str:
        budget = BUDGETS[ctx.scale]
        crop = budget["test_crop"]
        where = "whole images" if crop is None else f"{crop}x{crop} central crops"
        return (
            f"{{residual, plain}} x {{BatchNorm, none}} x {len(seed_list(ctx))} seeds; "
            f"DnCNN depth {budget['depth']}, {budget['features']} features, sigma "
            f"{SIGMA:g}, Adam lr 1e-3, {budget['steps']} steps of "
            f"{budget['batch_size']} patches; tested on {where}."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        runs = list(records.values())
        seeds = seed_list(ctx)
        table = {c: final_psnr_by_seed(runs, seeds, c) for c in CONDITIONS}
        means = {c: float(np.mean(list(row.values()))) if row else math.nan
                 for c, row in table.items()}
        others = [c for c in CONDITIONS if c != RL_BN and math.isfinite(means[c])]
        label = "PSNR(residual + BN) - PSNR(best other), dB"
        details = {
            "sigma": SIGMA,
            "test_set": _test_set(ctx),
            "final_psnr": {c: string_keys(row) for c, row in table.items()},
            "mean_final_psnr": means,
            "diverged_runs": sorted(r.key for r in runs if r.status != "finished"),
        }
        if not others or not math.isfinite(means[RL_BN]):
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary="Too few runs ended to compare residual + BN with the others.",
            )
        competitor = max(others, key=lambda c: means[c])
        details["best_other"] = competitor
        gaps = {c: paired_gap(table[RL_BN], table[c]) for c in others}
        details["gap_over"] = gaps
        details["convergence"] = convergence(runs, seeds)

        diffs = gaps[competitor]["per_seed"]
        if len(diffs) < 2:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"Only {len(diffs)} seed pairs; at least 2 are needed.",
            )
        verdict, mean, low, high = decide_effects(diffs, margin=MARGIN_DB)
        summary = self._summary(ctx, means, competitor, (mean, low, high), gaps,
                                details["convergence"])
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def _summary(self, ctx, means, competitor, effect, gaps, speed) -> str:
        mean, low, high = effect
        finals = ", ".join(f"{LABELS[c]} {means[c]:.2f}" for c in CONDITIONS)
        text = (
            f"Final PSNR on {_test_set(ctx)} at sigma {SIGMA:g} (mean over seeds): "
            f"{finals} dB. Residual + BN minus the best other ({LABELS[competitor]}): "
            f"{mean:+.2f} dB (95% CI {low:+.2f} to {high:+.2f})."
        )
        if speed.get("speedup") is not None:
            low_s, high_s = speed["interval"]
            text += (
                f" Convergence with residual learning: steps to "
                f"{speed['target']:.2f} dB without BN / with BN = "
                f"{speed['speedup']:.2f}x (95% CI {low_s:.2f}x "
                f"to {high_s:.2f}x); the claim says about {CLAIMED_SPEEDUP}x."
            )
            if speed["censored"]:
                text += " Runs that never reached the target count as the whole budget."
        differences = ", ".join(
            f"{LABELS[c]} {gap['mean']:+.2f}" for c, gap in gaps.items()
        )
        text += (
            f" Residual + BN minus each other combination: {differences} dB (intervals "
            f"in the details); the claim says gains of up to {CLAIMED_GAIN_DB:g} dB."
        )
        return text

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        runs = list(records.values())
        speed = convergence(runs, seed_list(ctx))
        groups = [
            (LABELS[c], COLORS[c], [r for r in runs if _condition(r.config) == c])
            for c in CONDITIONS
        ]
        curves = plots.psnr_curves(
            groups,
            title=f"dncnn-bn on {ctx.dataset}: validation PSNR at sigma {SIGMA:g}",
            path=out_dir / "dncnn-bn_curves.png",
            target=speed.get("target"),
        )
        return [curves, self._example(ctx, out_dir)]

    def _example(self, ctx: StudyContext, out_dir: Path) -> Path:
        """Draw the noisy input, the residual + BN output and the clean image."""
        config = self.config(ctx, RL_BN, seed_list(ctx)[0])
        pairs = denoise_pairs(ctx.data, ctx.data.primary_test, SIGMA, config.test_crop)
        pair = pairs[0]
        model = trained_model(config, ctx.data, out_dir / "checkpoints")
        output = None if model is None else restore(model, pair, "cpu")
        noisy_psnr, _ = score(config, pair.baseline, pair.reference, with_ssim=False)
        noisy = center_crop(pair.baseline, EXAMPLE_SIZE)
        panels = [(f"noisy, {noisy_psnr:.2f} dB", noisy)]
        if output is None:
            panels.append(("residual + BN", None))
        else:
            out_psnr, _ = score(config, output, pair.reference, with_ssim=False)
            panels.append(
                (f"residual + BN, {out_psnr:.2f} dB", center_crop(output, EXAMPLE_SIZE))
            )
        panels.append(("clean", center_crop(pair.reference, EXAMPLE_SIZE)))
        return plots.image_panels(
            panels,
            title=f"dncnn-bn: {pair.name}, sigma {SIGMA:g}, seed {config.seed} "
            "(PSNR of the whole test crop)",
            path=out_dir / "dncnn-bn_example.png",
        )


def final_psnr(record):
    """Return the final test PSNR of a run, or its input's PSNR when it diverged.

    The input is the noisy image for denoising and the bicubic upscaling for SR.
    Returns None for a missing run or one without these metrics.
    """
    if record is None:
        return None
    value = record.final.get("test_psnr", math.nan)
    if record.status == "finished" and math.isfinite(value):
        return value
    floor = record.final.get("input_psnr", record.final.get("bicubic_psnr", math.nan))
    return floor if math.isfinite(floor) else None


def final_psnr_by_seed(runs, seeds, condition, find=None) -> dict:
    """Return ``{seed: final_psnr}`` of one condition, leaving out missing runs."""
    find = find or _find
    values = {seed: final_psnr(find(runs, condition, seed)) for seed in seeds}
    return {seed: value for seed, value in values.items() if value is not None}


def string_keys(values: dict) -> dict:
    """Return ``values`` with string keys, as JSON stores them."""
    return {str(key): value for key, value in values.items()}


def paired_gap(first: dict, second: dict) -> dict:
    """Return the mean, 95% t-interval and per-seed values of first - second."""
    seeds = sorted(set(first) & set(second))
    diffs = [first[s] - second[s] for s in seeds]
    if not diffs:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "per_seed": []}
    mean, low, high = t_interval(diffs)
    return {"mean": mean, "low": low, "high": high, "per_seed": diffs}


def steps_to_psnr(record, target: float):
    """Return the first evaluated step with validation PSNR >= ``target``, or None."""
    for row in record.history:
        if math.isfinite(row["val_psnr"]) and row["val_psnr"] >= target:
            return row["step"]
    return None


def convergence(runs, seeds) -> dict:
    """Compare the steps that residual learning with and without BN need to a target.

    The target is the lower of the two conditions' mean final validation PSNR minus
    ``TARGET_OFFSET_DB``. Returns the target, the steps per seed, and the speedup
    steps(no BN) / steps(BN) as a geometric mean with a 95% interval (None when the
    target or fewer than 2 seed pairs exist).
    """
    finals = {}
    for condition in (RL_BN, RL):
        values = [
            r.history[-1]["val_psnr"]
            for r in runs
            if _condition(r.config) == condition
            and r.status == "finished"
            and r.history
        ]
        finals[condition] = float(np.mean(values)) if values else math.nan
    result = {"target": None, "speedup": None, "interval": None, "censored": False,
              "steps": {}}
    if not all(math.isfinite(v) for v in finals.values()):
        return result
    target = min(finals.values()) - TARGET_OFFSET_DB
    result["target"] = target
    steps = {RL_BN: {}, RL: {}}
    for condition in steps:
        for seed in seeds:
            record = _find(runs, condition, seed)
            if record is None:
                continue
            reached = steps_to_psnr(record, target)
            if reached is None:
                result["censored"] = True
                reached = record.config.steps
            steps[condition][seed] = reached
    result["steps"] = {c: string_keys(row) for c, row in steps.items()}
    paired = sorted(set(steps[RL_BN]) & set(steps[RL]))
    if len(paired) < 2:
        return result
    logs = [math.log2(steps[RL][s] / steps[RL_BN][s]) for s in paired]
    mean, low, high = t_interval(logs)
    result["speedup"] = 2**mean
    result["interval"] = (2**low, 2**high)
    return result


def _condition(config) -> str:
    for name, (residual, norm) in CONDITIONS.items():
        if config.residual == residual and config.norm == norm:
            return name
    return ""


def _find(runs, condition: str, seed: int):
    for record in runs:
        if record.config.seed == seed and _condition(record.config) == condition:
            return record
    return None


def _test_set(ctx: StudyContext) -> str:
    return getattr(ctx.data, "primary_test", ctx.dataset)

