"""Train DnCNN-S and the EDSR baseline once each on the standard data, on a CPU budget.

The two runs check that the restoration trainers reach sensible PSNRs on the papers'
data, and record how far a short CPU budget gets compared with the published numbers:

- ``dncnn``: DnCNN-S (17 layers, 64 features, BN, residual learning) at sigma 25,
  trained on BSD400 and tested on whole BSD68 and Set12 images. Zhang et al. (2017)
  report 29.23 dB on BSD68.
- ``edsr``: EDSR baseline (16 blocks, 64 features, no BN) at x2, trained on DIV2K when
  present, else T91, and tested on whole Set5 and Set14 images (Y channel, border 2).
  Lim et al. (2017) report 37.99 dB on Set5 after training on DIV2K.

The budgets in ``RUNS`` take about 10 to 15 minutes per run on 2 idle CPU cores. When
other processes share the cores, use one thread: two OpenMP threads then slowed an
EDSR step from 0.8 s to 6.5 s on the 2-core machine of ``benchmarks/REFERENCE.md``,
which records the results. Usage::

    OMP_NUM_THREADS=2 python benchmarks/reference_runs.py dncnn \\
        --data-dir DATA --out reference-dncnn.json
    OMP_NUM_THREADS=2 python benchmarks/reference_runs.py edsr \\
        --data-dir DATA --out reference-edsr.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time

import torch

from normlab.train.restoration import (
    DenoiseConfig,
    SRConfig,
    load_restoration_data,
    train_denoiser,
    train_sr,
)

logger = logging.getLogger("reference_runs")

# The papers' settings, except batch size, patch size and steps, which are cut to fit
# the CPU budget. Validation during training uses 96x96 central crops to save time;
# the final test uses whole images.
RUNS = {
    "dncnn": dict(
        task="denoise",
        config=dict(
            depth=17,
            features=64,
            norm="batchnorm",
            residual=True,
            sigma=25.0,
            patch_size=40,
            batch_size=16,
            steps=1000,
            patches_per_epoch=16 * 1000,
            lr=1e-3,
            lr_milestones=(800,),
            lr_gamma=0.1,
            eval_every=250,
            val_crop=96,
            test_crop=None,
            seed=0,
        ),
    ),
    "edsr": dict(
        task="sr",
        config=dict(
            scale=2,
            blocks=16,
            features=64,
            norm="none",
            lr_patch=24,
            batch_size=16,
            steps=1000,
            patches_per_epoch=16 * 1000,
            lr=1e-4,
            lr_milestones=(),
            eval_every=250,
            val_crop=None,
            test_crop=None,
            seed=0,
        ),
    ),
}


def run(name: str, data_dir: str) -> dict:
    """Train reference run ``name`` and return its config, metrics and timing."""
    spec = RUNS[name]
    data = load_restoration_data(spec["task"], data_dir)
    if spec["task"] == "denoise":
        config_type, trainer = DenoiseConfig, train_denoiser
    else:
        config_type, trainer = SRConfig, train_sr
    config = config_type(dataset=data.name, **spec["config"])
    tests = ", ".join(data.tests)
    logger.info("%s: training on %s, testing on %s", name, data.name, tests)
    started = time.perf_counter()

    def progress(step: int, total: int) -> None:
        if step % 50 == 0:
            elapsed = time.perf_counter() - started
            logger.info("%s: step %d of %d, %.0f s", name, step, total, elapsed)

    result = trainer(config, data, on_step=progress)
    logger.info("%s: %s after %d steps, %.0f s", name, result.status, result.steps,
                result.wall_time)
    for key, value in result.final.items():
        logger.info("%s: %s = %.4f", name, key, value)
    return {
        "run": name,
        "config": config.to_dict(),
        "task": config.task,
        "status": result.status,
        "steps": result.steps,
        "final": {
            key: (value if math.isfinite(value) else None)
            for key, value in result.final.items()
        },
        "history": result.history,
        "wall_time_s": result.wall_time,
        "data_source": data.source,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", choices=sorted(RUNS),
                        help="which reference run to train")
    parser.add_argument("--data-dir", required=True,
                        help="folder with denoise/ (train400, bsd68, set12) and sr/ "
                        "(t91 or DIV2K_train_HR, set5, set14)")
    parser.add_argument("--out", default=None,
                        help="JSON file for the results (default: reference-RUN.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    result = run(args.run, args.data_dir)
    out = args.out or f"reference-{args.run}.json"
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
