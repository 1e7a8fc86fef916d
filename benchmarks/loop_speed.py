"""Time normlab's training loop against a bare PyTorch loop on the same model and data.

Both loops train the MLP of the classification claims (two hidden layers of 100 units with
normlab's BatchNorm, SGD with momentum 0.9, batch size 64) on one data set for the same
number of epochs, drawing the same batches. The bare loop does what any training script
does: shuffle once per epoch, forward, cross-entropy, backward, step, and one validation
pass per epoch. normlab's loop does the same work and adds what the lab needs: the loss of
every step read back for the divergence check, the history rows and the final train, val
and test metrics. ``eval_every`` is set to one epoch so both evaluate equally often.

The two loops alternate, so a load that comes and goes hits both alike. The script prints
the median time of each and the ratio bare / normlab: 1.0 means no overhead, and the
target is at least 0.95. Usage::

    OMP_NUM_THREADS=1 python benchmarks/loop_speed.py                 # digits
    OMP_NUM_THREADS=1 python benchmarks/loop_speed.py --dataset mnist --data-dir DIR
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from normlab.claims.budget import base_config
from normlab.data import load_classification
from normlab.train.loop import build_model, build_optimizer, evaluate, train_classifier


def bare_loop(config, data) -> float:
    """Train ``config`` with a plain PyTorch loop; return the final validation accuracy."""
    torch.manual_seed(config.seed)
    model = build_model(config, data)
    optimizer = build_optimizer(config, model)
    generator = torch.Generator().manual_seed(config.seed)
    x, y = data.train.x, data.train.y
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        epoch_x, epoch_y = x[order], y[order]
        for start in range(0, len(x), config.batch_size):
            batch_x = epoch_x[start : start + config.batch_size]
            if len(batch_x) < 2:
                continue
            loss = F.cross_entropy(model(batch_x), epoch_y[start : start + config.batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        evaluate(model, data.val.x, data.val.y)
    return evaluate(model, data.val.x, data.val.y)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--norm", default="batchnorm")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_classification(args.dataset, args.data_dir)
    steps_per_epoch = len(data.train.x) // 64 + (len(data.train.x) % 64 > 1)
    config = base_config(
        args.dataset, "quick", norm=args.norm, lr=0.1, seed=0,
        epochs=args.epochs, eval_every=steps_per_epoch,
    )
    times = {"bare": [], "normlab": []}
    runs = {"bare": lambda: bare_loop(config, data),
            "normlab": lambda: train_classifier(config, data)}
    for name, run in runs.items():  # warm-up: allocator, lazy initialisation
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)

    bare, normlab = (statistics.median(times[n]) for n in ("bare", "normlab"))
    steps = steps_per_epoch * args.epochs
    print(f"{args.dataset}: {len(data.train.x)} training samples, {steps} steps, norm "
          f"{args.norm}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"bare PyTorch loop  {bare * 1e3:9.1f} ms  ({bare / steps * 1e3:.3f} ms/step)")
    print(f"normlab loop       {normlab * 1e3:9.1f} ms  ({normlab / steps * 1e3:.3f} ms/step)")
    print(f"ratio bare / normlab: {bare / normlab:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
