"""Removing BN from its residual blocks improves EDSR and saves memory (Lim et al.).

Lim, Son, Kim, Nah and Lee, "Enhanced Deep Residual Networks for Single Image
Super-Resolution", CVPR Workshops 2017. The paper drops the BatchNorm layers of
SRResNet's residual blocks, reports better PSNR, and states that its baseline without
BN saves about 40% of the memory used during training compared with SRResNet. That
figure is GPU memory of the authors' implementation, and SRResNet differs from the
EDSR baseline in more than its BN layers.

Hypothesis: at scale 2 and the same budget, the EDSR baseline (no normalization)
reaches a higher final test PSNR than the same network with BatchNorm after each
convolution of its residual blocks.

Grid: {no normalization, BatchNorm} x seeds, L1 loss, Adam at lr 1e-4, the same steps
and patches for both. Quick: EDSR with 4 blocks of 32 features, LR patches of 24x24,
on the scikit-image photographs (or the data folder's sets), at most 3 seeds,
evaluated on 96x96 central crops of the HR images. Full: EDSR baseline (16 blocks, 64
features, batches of 16 48x48 LR patches), DIV2K or T91 -> Set5 and Set14 on whole
images, 300,000 steps with the learning rate halved after 200,000.

Metric: per seed, final PSNR without BN minus final PSNR with BN, in dB, on the Y
channel with ``scale`` border pixels removed, on the first test set (Set5 in full
mode). A diverged run scores the PSNR of bicubic upscaling.

Decision rule: SUPPORTED when the 95% t-interval of the effect lies above 0 and the
mean effect is at least 0.05 dB. NOT SUPPORTED when the upper end of the interval is
below 0.05 dB. INCONCLUSIVE otherwise, or with fewer than 2 seeds.

Memory, reported without a verdict: ``saved_tensor_bytes`` measures the bytes that
autograd saves for backward in one training step (forward and L1 loss) of each
network at the training batch and patch size. The saving is 1 - bytes(no BN) /
bytes(BN), over the activations (the saved weights excluded). It is measured on the
CPU, counts only tensors saved for backward, and compares the same network with and
without BN, so it is not the paper's GPU measurement.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..report import plots
from ..train.restoration import (
    SRConfig,
    center_crop,
    load_claim_data,
    measure_saved_memory,
    restore,
    score,
    sr_pairs,
    trained_model,
)
from .base import Claim, StudyContext, Verdict
from .dncnn_bn import final_psnr_by_seed, paired_gap, string_keys
from .stats import decide, t_interval

SCALE = 2
MARGIN_DB = 0.05
CLAIMED_MEMORY_SAVING = 0.40

# SRConfig settings per scale, and the most seeds each scale trains.
BUDGETS = {
    "quick": dict(
        blocks=4,
        features=32,
        batch_size=8,
        lr_patch=24,
        steps=150,
        patches_per_epoch=1200,
        eval_every=25,
        lr_milestones=(),
        val_crop=96,
        test_crop=96,
    ),
    "full": dict(
        blocks=16,
        features=64,
        batch_size=16,
        lr_patch=48,
        steps=300_000,
        patches_per_epoch=16_000,
        eval_every=1000,
        lr_milestones=(200_000,),
        val_crop=None,
        test_crop=None,
    ),
}
MAX_SEEDS = {"quick": 3, "full": None}

NO_BN, BN = "none", "batchnorm"
LABELS = {NO_BN: "EDSR (no BN)", BN: "EDSR + BN"}
COLORS = {NO_BN: "tab:orange", BN: "tab:blue"}
# side of the HR region shown in the example figure
EXAMPLE_SIZE = 96


def seed_list(ctx: StudyContext) -> list[int]:
    """Return the seeds of ``ctx``, capped by the scale's ``MAX_SEEDS``."""
    return ctx.seeds_up_to(MAX_SEEDS[ctx.scale])


class EDSRWithoutBatchNorm(Claim):
    id = "edsr-no-bn"
    task = "sr"
    statement = (
        "Removing BatchNorm from EDSR's residual blocks gives better PSNR and saves "
        "about 40% of training memory."
    )
    hypothesis = (
        "At scale 2 and the same budget, EDSR without normalization reaches a higher "
        "final test PSNR (Y channel) than the same network with BatchNorm."
    )
    metric = (
        "PSNR(no BN) - PSNR(BN) in dB on Y with a border of the scale, on the first "
        "test set, paired by seed. A diverged run scores the PSNR of bicubic "
        "upscaling."
    )
    decision_rule = (
        f"SUPPORTED if the 95% t-interval across seeds lies above 0 dB and the mean is "
        f"at least {MARGIN_DB} dB; NOT SUPPORTED if the interval's upper end is below "
        f"{MARGIN_DB} dB; otherwise INCONCLUSIVE (also with fewer than 2 seeds)."
    )

    def load_data(self, dataset: str, data_dir, download: bool):
        """Load DIV2K or T91 with Set5 and Set14, or the scikit-image photographs.

        ``dataset`` names a classification set and is not used. A ``data_dir`` without
        the SR sets falls back to the photographs with a warning.
        """
        data = load_claim_data("sr", data_dir, download)
        return data.name, data

    def config(self, ctx: StudyContext, norm: str, seed: int) -> SRConfig:
        return SRConfig(
            dataset=ctx.dataset,
            norm=norm,
            scale=SCALE,
            lr=1e-4,
            seed=seed,
            device=ctx.device,
            **BUDGETS[ctx.scale],
        )

    def configs(self, ctx: StudyContext):
        return [
            self.config(ctx, norm, seed)
            for norm in (NO_BN, BN)
            for seed in seed_list(ctx)
        ]

    def grid(self, ctx: StudyContext) -> str:
        budget = BUDGETS[ctx.scale]
        crop = budget["test_crop"]
        where = "whole images" if crop is None else f"{crop}x{crop} central HR crops"
        return (
            f"{{no normalization, BatchNorm}} x {len(seed_list(ctx))} seeds; EDSR "
            f"x{SCALE}, {budget['blocks']} blocks of {budget['features']} features, "
            f"Adam lr 1e-4, L1 loss, {budget['steps']} steps of {budget['batch_size']} "
            f"{budget['lr_patch']}x{budget['lr_patch']} LR patches; tested on {where}."
        )

    def memory(self, ctx: StudyContext) -> dict:
        """Measure the bytes saved for backward per training step, with and without BN.

        Both networks are built at the training batch and patch size of ``ctx.scale``.
        """
        channels = getattr(ctx.data, "channels", 3)
        reports = {
            norm: measure_saved_memory(self.config(ctx, norm, 0), channels)
            for norm in (NO_BN, BN)
        }
        activation = {norm: report.activation_bytes for norm, report in reports.items()}
        total = {norm: report.total_bytes for norm, report in reports.items()}
        budget = BUDGETS[ctx.scale]
        return {
            "activation_bytes": activation,
            "total_bytes": total,
            "by_layer_type": {n: dict(r.by_layer_type) for n, r in reports.items()},
            "saving": 1.0 - activation[NO_BN] / activation[BN],
            "saving_total": 1.0 - total[NO_BN] / total[BN],
            "setting": (
                f"batch {budget['batch_size']}, LR patch {budget['lr_patch']}x"
                f"{budget['lr_patch']}, {budget['blocks']} blocks of "
                f"{budget['features']} features, x{SCALE}, float32"
            ),
            "method": "saved_tensor_bytes of one train-mode forward and L1 loss, CPU",
        }

    def decide(self, ctx: StudyContext, records: dict) -> Verdict:
        runs = list(records.values())
        seeds = seed_list(ctx)
        table = {n: final_psnr_by_seed(runs, seeds, n, _find) for n in (NO_BN, BN)}
        memory = self.memory(ctx)
        details = {
            "scale": SCALE,
            "test_set": getattr(ctx.data, "primary_test", ctx.dataset),
            "final_psnr": {n: string_keys(row) for n, row in table.items()},
            "per_test_set": per_test_set(runs),
            "bicubic_psnr": _mean_final(runs, "bicubic_psnr"),
            "memory": memory,
            "diverged_runs": sorted(r.key for r in runs if r.status != "finished"),
        }
        label = "PSNR(no BN) - PSNR(BN), dB (Y)"
        gap = paired_gap(table[NO_BN], table[BN])
        details["per_seed_effect"] = gap["per_seed"]
        memory_text = self._memory_summary(memory)
        if len(gap["per_seed"]) < 2:
            return self.inconclusive(
                ctx, records, effect_label=label, details=details,
                summary=f"Only {len(gap['per_seed'])} seed pairs ended; at least 2 are "
                f"needed. {memory_text}",
            )
        mean, low, high = t_interval(gap["per_seed"])
        verdict = decide(low, high, mean, margin=MARGIN_DB)
        means = {n: float(np.mean(list(row.values()))) for n, row in table.items()}
        summary = (
            f"Final PSNR (Y) on {details['test_set']} at x{SCALE} (mean over seeds): "
            f"no BN {means[NO_BN]:.2f} dB, BN {means[BN]:.2f} dB, bicubic "
            f"{details['bicubic_psnr']:.2f} dB; no BN minus BN {mean:+.2f} dB (95% CI "
            f"{low:+.2f} to {high:+.2f}).{_other_sets(details)} {memory_text}"
        )
        return self.verdict(
            ctx, records, verdict=verdict, effect=mean, interval=(low, high),
            effect_label=label, details=details, summary=summary,
        )

    @staticmethod
    def _memory_summary(memory: dict) -> str:
        activation = memory["activation_bytes"]
        return (
            f"Activations saved for backward per step ({memory['setting']}): no BN "
            f"{activation[NO_BN] / 2**20:.1f} MiB, BN "
            f"{activation[BN] / 2**20:.1f} MiB, {100 * memory['saving']:.0f}% less "
            "without BN (measured on the CPU with saved_tensor_bytes). The paper's "
            f"'about {100 * CLAIMED_MEMORY_SAVING:.0f}%' is GPU memory of its own "
            "implementation, against SRResNet."
        )

    def plot(self, ctx: StudyContext, records: dict, out_dir: Path) -> list[Path]:
        runs = list(records.values())
        groups = [
            (LABELS[n], COLORS[n], [r for r in runs if r.config.norm == n])
            for n in (NO_BN, BN)
        ]
        curves = plots.psnr_curves(
            groups,
            title=f"edsr-no-bn on {ctx.dataset}: validation PSNR (Y) at x{SCALE}",
            path=out_dir / "edsr-no-bn_curves.png",
        )
        memory = self.memory(ctx)
        bars = plots.memory_by_layer(
            {LABELS[n]: memory["by_layer_type"][n] for n in (NO_BN, BN)},
            title=f"edsr-no-bn: bytes saved for backward per training step\n"
            f"{memory['setting']}",
            path=out_dir / "edsr-no-bn_memory.png",
        )
        return [curves, bars, self._example(ctx, out_dir)]

    def _example(self, ctx: StudyContext, out_dir: Path) -> Path:
        """Draw bicubic, EDSR and EDSR + BN outputs beside the HR image."""
        seed = seed_list(ctx)[0]
        configs = {n: self.config(ctx, n, seed) for n in (NO_BN, BN)}
        test_crop = configs[NO_BN].test_crop
        pair = sr_pairs(ctx.data, ctx.data.primary_test, SCALE, test_crop)[0]

        def caption(name, image):
            value, _ = score(configs[NO_BN], image, pair.reference, with_ssim=False)
            return f"{name}, {value:.2f} dB"

        bicubic = center_crop(pair.baseline, EXAMPLE_SIZE)
        panels = [(caption("bicubic", pair.baseline), bicubic)]
        for norm in (NO_BN, BN):
            model = trained_model(configs[norm], ctx.data, out_dir / "checkpoints")
            output = None if model is None else restore(model, pair, "cpu")
            if output is None:
                panels.append((LABELS[norm], None))
            else:
                shown = center_crop(output, EXAMPLE_SIZE)
                panels.append((caption(LABELS[norm], output), shown))
        panels.append(("HR", center_crop(pair.reference, EXAMPLE_SIZE)))
        return plots.image_panels(
            panels,
            title=f"edsr-no-bn: {pair.name} x{SCALE}, seed {seed} (PSNR on Y of the "
            "whole test crop)",
            path=out_dir / "edsr-no-bn_example.png",
        )


def per_test_set(runs) -> dict:
    """Return the mean final PSNR and SSIM per test set and norm over finished runs."""
    prefix = "test_psnr_"
    names = sorted(
        {key[len(prefix):] for r in runs for key in r.final if key.startswith(prefix)}
    )
    result = {}
    for name in names:
        for norm in (NO_BN, BN):
            finished = [
                r for r in runs if r.config.norm == norm and r.status == "finished"
            ]
            for metric in ("psnr", "ssim"):
                key = f"test_{metric}_{name}"
                values = [r.final.get(key, math.nan) for r in finished]
                values = [v for v in values if math.isfinite(v)]
                mean = float(np.mean(values)) if values else math.nan
                result.setdefault(name, {}).setdefault(norm, {})[metric] = mean
    return result


def _other_sets(details: dict) -> str:
    """Return the mean PSNRs of the test sets after the first, as a sentence or ''."""
    text = ""
    for name, by_norm in details["per_test_set"].items():
        if name != details["test_set"]:
            text += (
                f" {name}: no BN {by_norm[NO_BN]['psnr']:.2f} dB, BN "
                f"{by_norm[BN]['psnr']:.2f} dB."
            )
    return text


def _mean_final(runs, name: str) -> float:
    values = [r.final.get(name, math.nan) for r in runs]
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _find(runs, norm: str, seed: int):
    for record in runs:
        if record.config.norm == norm and record.config.seed == seed:
            return record
    return None

