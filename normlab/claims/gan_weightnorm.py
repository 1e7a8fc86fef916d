"""Weight normalization makes DCGAN reconstruct held-out images better than BN.

Source: Xiang and Li, "On the Effects of Batch and Weight Normalization in Generative
Adversarial Networks", 2017, https://arxiv.org/abs/1704.03971. They measure a
generator by how well it reconstructs held-out real images when ``z`` is optimized
with the generator frozen. They report a reconstruction error about 10% lower with
weight normalization (WN) than with BatchNorm (BN), and more stable training with WN.

Hypothesis: a DCGAN with WN reaches a lower reconstruction MSE on held-out images than
the same DCGAN with BN, at the same steps, by at least 5% of the BN error.

Grid: norm in {batchnorm, weightnorm, none} in both networks x seeds, placed as Xiang
and Li do (every layer but the last of each network, not the first discriminator
layer); WN layers get the data-dependent initialization. Adam at lr 2e-4, betas
(0.5, 0.999), batches of 64. Quick on digits: 8x8 images upsampled to 16x16
(bilinear), latent 32, 16 features, 300 steps, at most 3 seeds. Full on digits: 32
features, latent 64, 3000 steps. With ``--dataset cifar10``: 32x32 RGB, latent 100,
32 (quick, 300 steps) or 64 (full, 20,000 steps) features. MNIST is upsampled to
32x32. See ``BUDGETS``.

NOTE: Xiang and Li also weight-normalize the last layer of each network and use
translated ReLUs, which ``normlab.models.dcgan`` does not reproduce, so the WN networks
here are closer to the BN ones than theirs. The quick budget of 300 steps is far
shorter than their training, so its verdict describes early training.

Metric: per run, the mean over the first ``recon_images`` test images of each
image's lowest MSE (per pixel, images on [-1, 1]) over ``recon_restarts`` restarts of
``recon_steps`` Adam steps at lr 0.05 on ``z``. Each restart starts from N(0, I) drawn
with a fixed seed, and the generator runs in eval mode (quick: 64 images, 3 restarts,
100 steps). The effect is the relative reduction (MSE(BN) - MSE(WN)) / MSE(BN), paired
by seed. A collapsed run enters with its measured MSE. A diverged run has no generator
to score, so it enters with the MSE of the mean training image, the score of a
generator that learned only the mean.

Collapse, counted per condition and reported without entering the verdict: the
samples' mean pairwise distance is below 0.2 of the real images', or the last
window's discriminator loss is below 0.05 while the generator loss is above 5 (see
``normlab.train.gan.collapse_reason``).

Decision rule: SUPPORTED when the 95% t-interval of the effect across seeds lies above
0 and the mean effect is at least 0.05. NOT SUPPORTED when the upper end of the
interval is below 0.05. INCONCLUSIVE otherwise, or with fewer than 2 seed pairs.

Also reported, without a verdict: the BN sampling pitfall. In train mode a BN
generator normalizes with the batch's statistics, so the same ``z`` with other batch
companions gives another image. In eval mode it does not. The max absolute difference
(pixel scale [-1, 1]) in both modes is in the details and in a figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..report import plots
from ..train.gan import (
    SAMPLE_SEED,
    GANConfig,
    batch_dependence,
    collapse_reason,
    fixed_latents,
    image_grid,
    to_gan_images,
    trained_generator,
)
from .base import Claim, StudyContext, Verdict
from .stats import decide_effects

MARGIN = 0.05
CLAIMED_REDUCTION = 0.10

_DIGITS_QUICK = dict(
    image_size=16, latent_dim=32, features=16, batch_size=64, steps=300,
    eval_every=25, recon_images=64, recon_steps=100, recon_restarts=3,
)
_CIFAR_QUICK = dict(_DIGITS_QUICK, image_size=32, latent_dim=100, features=32)
# GANConfig settings per (dataset, scale); lr, betas and recon_lr keep their defaults.
BUDGETS = {
    ("digits", "quick"): _DIGITS_QUICK,
    ("digits", "full"): dict(
        image_size=16, latent_dim=64, features=32, batch_size=64, steps=3000,
        eval_every=100, recon_images=256, recon_steps=300, recon_restarts=5,
    ),
    ("mnist", "quick"): dict(_DIGITS_QUICK, image_size=32),
    ("mnist", "full"): dict(
        image_size=32, latent_dim=100, features=32, batch_size=64, steps=5000,
        eval_every=250, recon_images=256, recon_steps=300, recon_restarts=5,
    ),
    ("cifar10", "quick"): _CIFAR_QUICK,
    ("cifar10", "full"): dict(
        image_size=32, latent_dim=100, features=64, batch_size=64, steps=20_000,
        eval_every=500, recon_images=256, recon_steps=500, recon_restarts=5,
    ),
}
MAX_SEEDS = {"quick": 3, "full": None}

BN, WN, NO_NORM = "batchnorm", "weightnorm", "none"
CONDITIONS = (BN, WN, NO_NORM)
LABELS = {BN: "BatchNorm", WN: "weight norm", NO_NORM: "no normalization"}
COLORS = {BN: "tab:blue", WN: "tab:green", NO_NORM: "tab:orange"}
# samples in each condition's grid figure
GRID_SAMPLES = 64
# difference drawn white in the pitfall figure, on the [-1, 1] pixel scale
DIFF_WHITE = 0.2


def seed_list(ctx: StudyContext) -> list[int]:
    """Return the seeds of ``ctx``, capped by the scale's ``MAX_SEEDS``."""
    cap = MAX_SEEDS[ctx.scale]
    return list(range(ctx.seeds if cap is None else min(ctx.seeds, cap)))


def budget(ctx: StudyContext) -> dict:
    try:
        return BUDGETS[(ctx.dataset, ctx.scale)]
    except KeyError:
        raise ValueError(
            f"no GAN budget for dataset {ctx.dataset!r} at scale {ctx.scale!r}; "
            f"known: {sorted(BUDGETS)}"
        ) from None


class GANWeightNorm(Claim):
    id = "gan-weightnorm"
    task = "gan"
    statement = (
        "In DCGAN, weight normalization reconstructs held-out images about 10% better "
        "than BatchNorm and trains more stably."
    )
    hypothesis = (
        "A DCGAN with weight normalization reaches a lower reconstruction MSE on "
        "held-out images (z optimized, generator frozen) than with BatchNorm, by at "
        "least 5% of the BatchNorm error."
    )
    metric = (
        "(MSE(BN) - MSE(WN)) / MSE(BN), paired by seed. MSE is each held-out image's "
        "lowest per-pixel error over restarts of Adam on z, averaged over the images; "
        "the generator is in eval mode. A collapsed run enters with its MSE, and a "
        "diverged run with the MSE of the mean training image."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 and the mean is "
        f"at least {MARGIN}; NOT SUPPORTED if the interval's upper end is below "
        f"{MARGIN}; otherwise INCONCLUSIVE (also with fewer than 2 seed pairs)."
    )

    def config(self, ctx: StudyContext, norm: str, seed: int) -> GANConfig:
        return GANConfig(
            dataset=ctx.dataset, norm=norm, seed=seed, device=ctx.device, **budget(ctx)
        )

    def configs(self, ctx: StudyContext):
        return [
            self.config(ctx, norm, seed)
            for norm in CONDITIONS
            for seed in seed_list(ctx)
        ]

    def grid(self, ctx: StudyContext) -> str:
        settings = budget(ctx)
        size = settings["image_size"]
        return (
            f"{{BatchNorm, weight norm, none}} x {len(seed_list(ctx))} seeds; DCGAN "
            f"{size}x{size}, latent {settings['latent_dim']}, {settings['features']} "
            f"features, Adam lr 2e-4 betas (0.5, 0.999), {settings['steps']} steps of "
            f"{settings['batch_size']}; reconstruction of {settings['recon_images']} "
            f"test images, best of {settings['recon_restarts']} restarts of "
            f"{settings['recon_steps']} Adam steps on z at lr 0.05."
        )

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        runs = list(records.values())
        seeds = seed_list(ctx)
        scores = {c: recon_scores(runs, seeds, c) for c in CONDITIONS}
        outcomes = {c: run_outcomes(runs, seeds, c) for c in CONDITIONS}
        means = {
            c: float(np.mean(list(row.values()))) if row else math.nan
            for c, row in scores.items()
        }
        label = "(recon MSE(BN) - recon MSE(WN)) / recon MSE(BN)"

        details = {
            "recon_mse": {c: _string_keys(row) for c, row in scores.items()},
            "mean_recon_mse": means,
            "outcomes": {c: _string_keys(row) for c, row in outcomes.items()},
            "collapsed": {c: _count(row, "collapsed") for c, row in outcomes.items()},
            "diverged": {c: _count(row, "diverged") for c, row in outcomes.items()},
            "batch_dependence": batch_dependence_table(runs),
            "collapse_rule": (
                "diversity ratio < 0.2, or last-window D loss < 0.05 with G loss > 5"
            ),
        }

        # the effect, paired by seed
        paired = sorted(set(scores[BN]) & set(scores[WN]))
        effects = [relative_reduction(scores[BN][s], scores[WN][s]) for s in paired]
        details["per_seed_effect"] = dict(zip(map(str, paired), effects))
        if len(effects) < 2:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"Only {len(effects)} seed pairs of BatchNorm and weight norm "
                "runs; at least 2 are needed.",
            )

        verdict, mean, low, high = decide_effects(effects, margin=MARGIN)
        summary = _summary(means, (mean, low, high), details, len(seeds))
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        runs = list(records.values())
        seeds = seed_list(ctx)
        scores = {c: recon_scores(runs, seeds, c) for c in CONDITIONS}
        diversity = {
            c: [r.final.get("diversity", math.nan) for r in _runs_of(runs, c)
                if r.status == "finished"]
            for c in CONDITIONS
        }
        paths = [
            plots.point_panels(
                [
                    ("reconstruction MSE (lower is better)",
                     [(LABELS[c], list(scores[c].values())) for c in CONDITIONS]),
                    ("diversity ratio (collapse below 0.2)",
                     [(LABELS[c], diversity[c]) for c in CONDITIONS]),
                ],
                title=f"gan-weightnorm on {ctx.dataset}: one dot per seed",
                path=out_dir / "gan-weightnorm_recon.png",
            ),
            plots.history_curves(
                [(LABELS[c], COLORS[c], _runs_of(runs, c)) for c in CONDITIONS],
                [("d_loss", "discriminator loss"), ("g_loss", "generator loss"),
                 ("diversity", "diversity ratio")],
                title=f"gan-weightnorm on {ctx.dataset}: training curves",
                path=out_dir / "gan-weightnorm_curves.png",
            ),
        ]
        checkpoints = out_dir / "checkpoints"
        generators = {
            c: trained_generator(self.config(ctx, c, seeds[0]), ctx.data, checkpoints)
            for c in CONDITIONS
        }
        for condition in CONDITIONS:
            paths.append(self._samples(ctx, condition, generators[condition], out_dir))
        paths.append(self._pitfall(ctx, generators[BN], out_dir))
        return paths

    def _samples(self, ctx: StudyContext, condition: str, generator, out_dir: Path):
        """Draw held-out real images beside the first seed's samples (eval mode)."""
        config = self.config(ctx, condition, seed_list(ctx)[0])
        held_out = ctx.data.test.x[:GRID_SAMPLES]
        real = to_gan_images(held_out, ctx.data, config.image_size)
        panels = [("held-out real images", image_grid(real))]
        if generator is None:
            panels.append((f"{LABELS[condition]} samples", None))
        else:
            z = fixed_latents(GRID_SAMPLES, config.latent_dim, SAMPLE_SEED)
            with torch.no_grad():
                samples = generator(z)
            panels.append((f"{LABELS[condition]} samples", image_grid(samples)))
        return plots.image_panels(
            panels,
            title=f"gan-weightnorm: {LABELS[condition]}, seed {config.seed}, "
            f"{config.steps} steps",
            path=out_dir / f"gan-weightnorm_samples_{condition}.png",
        )

    def _pitfall(self, ctx: StudyContext, generator, out_dir: Path) -> Path:
        """Draw the same latent codes with two sets of batch companions, per mode."""
        config = self.config(ctx, BN, seed_list(ctx)[0])
        path = out_dir / "gan-weightnorm_bn_pitfall.png"
        if generator is None:
            return plots.image_panels(
                [("BatchNorm generator", None)],
                title="gan-weightnorm: BatchNorm sampling pitfall", path=path,
            )
        result = batch_dependence(generator, config.latent_dim, config.batch_size)
        panels = []
        for mode, diff in (("train", result.train_diff), ("eval", result.eval_diff)):
            for companions in ("A", "B"):
                caption = f"{mode} mode, companions {companions}"
                if companions == "B":
                    caption += f"\nmax |A - B| = {diff:.3g}"
                images = result.images[(mode, companions)]
                panels.append((caption, image_grid(images, columns=4)))
        # |A - B| of train mode, on a scale where white is a difference of 0.2
        change = (result.images[("train", "A")] - result.images[("train", "B")]).abs()
        amplified = (change / DIFF_WHITE).clamp(0, 1) * 2 - 1
        panels.insert(2, (f"train mode |A - B|\n(white = {DIFF_WHITE})",
                          image_grid(amplified, columns=4)))
        return plots.image_panels(
            panels,
            title=f"gan-weightnorm: the same {len(images)} z in batches of "
            f"{config.batch_size} with other companions (BatchNorm, seed "
            f"{config.seed})",
            path=path,
        )


def relative_reduction(bn: float, wn: float) -> float:
    """Return (bn - wn) / bn, the fraction of the BN error that WN removes."""
    return (bn - wn) / bn


def run_score(record) -> float:
    """Return a run's reconstruction MSE, or the mean image's MSE when it diverged."""
    value = record.final.get("recon_mse", math.nan)
    if record.status == "finished" and math.isfinite(value):
        return value
    return record.final.get("recon_mse_mean_image", math.nan)


def run_outcome(record) -> str:
    """Return ``"diverged"``, ``"collapsed"`` or ``"trained"``."""
    if record.status != "finished":
        return "diverged"
    return "collapsed" if collapse_reason(record.final) else "trained"


def recon_scores(runs, seeds, condition) -> dict:
    """Return ``{seed: run_score}`` of one condition, leaving out missing scores."""
    values = {}
    for seed in seeds:
        record = _find(runs, condition, seed)
        if record is not None and math.isfinite(run_score(record)):
            values[seed] = run_score(record)
    return values


def run_outcomes(runs, seeds, condition) -> dict:
    """Return ``{seed: run_outcome}`` of one condition's stored runs."""
    found = {seed: _find(runs, condition, seed) for seed in seeds}
    return {seed: run_outcome(r) for seed, r in found.items() if r is not None}


def batch_dependence_table(runs) -> dict:
    """Return the largest train- and eval-mode batch dependence per condition."""
    table = {}
    for condition in CONDITIONS:
        finished = [r for r in _runs_of(runs, condition) if r.status == "finished"]
        table[condition] = {
            mode: max(
                (r.final.get(f"batch_dependence_{mode}", math.nan) for r in finished),
                default=math.nan,
            )
            for mode in ("train", "eval")
        }
    return table


def _summary(means, effect, details, seeds: int) -> str:
    mean, low, high = effect
    finals = ", ".join(f"{LABELS[c]} {means[c]:.4f}" for c in CONDITIONS)
    stability = ", ".join(
        f"{LABELS[c]} {details['collapsed'][c]} collapsed and "
        f"{details['diverged'][c]} diverged"
        for c in CONDITIONS
    )
    pitfall = details["batch_dependence"][BN]
    return (
        f"Reconstruction MSE of held-out images (mean over seeds): {finals}. Weight "
        f"norm reduces the BatchNorm error by {mean:+.1%} (95% CI {low:+.1%} to "
        f"{high:+.1%}); the claim says about {CLAIMED_REDUCTION:.0%}. Of {seeds} "
        f"seeds: {stability}. BatchNorm sampling pitfall: the same z with other "
        f"batch companions changes by up to {pitfall['train']:.3g} in train mode and "
        f"{pitfall['eval']:.3g} in eval mode (pixels in [-1, 1])."
    )


def _runs_of(runs, condition: str) -> list:
    return [r for r in runs if r.config.norm == condition]


def _find(runs, condition: str, seed: int):
    for record in runs:
        if record.config.norm == condition and record.config.seed == seed:
            return record
    return None


def _count(outcomes: dict, outcome: str) -> int:
    return sum(1 for value in outcomes.values() if value == outcome)


def _string_keys(values: dict) -> dict:
    return {str(key): value for key, value in values.items()}
