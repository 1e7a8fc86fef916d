"""Time the quick claim grids trained one run at a time against batched groups of runs.

For each claim grid (by default the quick ``higher-lr`` and ``init-insensitivity`` grids
on the bundled digits, 5 seeds) the script trains every config twice: alone with
``normlab.train.train_classifier`` and in groups with
``normlab.train.batched.train_classifiers``. The configs are grouped by ``group_key`` in
grid order and cut into groups of at most ``--group-size`` runs, as a sweep does. Each
group is timed both ways back to back, and the order of the two alternates from group to
group and repeat to repeat, so a load that comes and goes hits both alike. The script
prints per grid the total time of each way and the ratio one-by-one / batched (the
median over ``--repeats``), and how far the batched results are from the one-by-one
results: status mismatches, and the largest absolute difference of the final validation
accuracy and of the last step loss. These are zero when normlab's BatchNorm runs its
pure-PyTorch path (``NORMLAB_BN_BACKEND=reference``). Its C++ kernels round otherwise
than the batched BatchNorm, so runs at the edge of stability can end differently.

``--group-sizes`` times the first grid batched with each of the given group sizes, to
choose ``MAX_GROUP``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/sweep_speed.py
    OMP_NUM_THREADS=1 python benchmarks/sweep_speed.py --claims init-insensitivity --repeats 3
    OMP_NUM_THREADS=1 python benchmarks/sweep_speed.py --group-sizes 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from normlab.claims import get_claim
from normlab.claims.base import StudyContext
from normlab.data import load_classification
from normlab.nn import batchnorm
from normlab.sweep import unique
from normlab.train import train_classifier
from normlab.train.batched import MAX_GROUP, group_key, train_classifiers

DEFAULT_CLAIMS = ["higher-lr", "init-insensitivity"]


def grid_configs(claim_id: str, data, seeds: int) -> list:
    context = StudyContext(dataset="digits", data=data, scale="quick", seeds=seeds)
    return unique(get_claim(claim_id).configs(context))


def make_groups(configs: list, group_size: int) -> list[list]:
    """Group configs by group_key in first order, in chunks of at most group_size."""
    by_key: dict = {}
    for config in configs:
        key = group_key(config)
        by_key.setdefault(("alone", config.key()) if key is None else key, []).append(
            config
        )
    groups = []
    for members in by_key.values():
        for start in range(0, len(members), group_size):
            groups.append(members[start : start + group_size])
    return groups


def train_batched(group: list, data) -> list:
    if group_key(group[0]) is None:
        return [train_classifier(config, data) for config in group]
    return train_classifiers(group, data)


def time_grid(
    groups: list, data, batched_first: bool
) -> tuple[float, float, list, list]:
    """Train every group both ways and return (sequential s, batched s, results, results)."""
    sequential_time = batched_time = 0.0
    sequential, batched = [], []
    for index, group in enumerate(groups):
        ways = ["batched", "sequential"]
        if (index % 2 == 0) != batched_first:
            ways.reverse()
        for way in ways:
            started = time.perf_counter()
            if way == "batched":
                batched.extend(train_batched(group, data))
                batched_time += time.perf_counter() - started
            else:
                sequential.extend(train_classifier(config, data) for config in group)
                sequential_time += time.perf_counter() - started
    return sequential_time, batched_time, sequential, batched


def differences(sequential: list, batched: list) -> tuple[int, float, float]:
    """Return (status mismatches, max |final val acc diff|, max |last step loss diff|).

    The differences cover the runs whose status and step count agree.
    """
    mismatches = 0
    acc_diff = loss_diff = 0.0
    for single, grouped in zip(sequential, batched):
        if single.status != grouped.status or single.steps != grouped.steps:
            mismatches += 1
            continue
        acc = _abs_diff(single.final["val_acc"], grouped.final["val_acc"])
        loss = _abs_diff(single.step_loss[-1], grouped.step_loss[-1])
        acc_diff = max(acc_diff, acc)
        loss_diff = max(loss_diff, loss)
    return mismatches, acc_diff, loss_diff


def _abs_diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b)


def compare_grids(args, data) -> None:
    print(f"group size {args.group_size}, {args.repeats} repeat(s), seeds {args.seeds}")
    for claim_id in args.claims:
        configs = grid_configs(claim_id, data, args.seeds)
        groups = make_groups(configs, args.group_size)
        ratios, sequential_times, batched_times = [], [], []
        for repeat in range(args.repeats):
            sequential_time, batched_time, sequential, batched = time_grid(
                groups, data, batched_first=repeat % 2 == 0
            )
            ratios.append(sequential_time / batched_time)
            sequential_times.append(sequential_time)
            batched_times.append(batched_time)
        mismatches, acc_diff, loss_diff = differences(sequential, batched)
        print(
            f"{claim_id}: {len(configs)} runs in {len(groups)} groups; one by one "
            f"{statistics.median(sequential_times):.1f} s, batched "
            f"{statistics.median(batched_times):.1f} s, ratio "
            f"{statistics.median(ratios):.2f} (per repeat: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})"
        )
        print(
            f"  batched vs one by one: {mismatches} runs differ in status or steps; "
            f"max |final val_acc diff| {acc_diff:.3g}, max |last step loss diff| "
            f"{loss_diff:.3g}"
        )


def compare_group_sizes(args, data) -> None:
    claim_id = args.claims[0]
    configs = grid_configs(claim_id, data, args.seeds)
    times: dict[int, list[float]] = {size: [] for size in args.group_sizes}
    sequential_times = []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        for config in configs:
            train_classifier(config, data)
        sequential_times.append(time.perf_counter() - started)
        sizes = args.group_sizes if repeat % 2 == 0 else args.group_sizes[::-1]
        for size in sizes:
            started = time.perf_counter()
            for group in make_groups(configs, size):
                train_batched(group, data)
            times[size].append(time.perf_counter() - started)
    sequential = statistics.median(sequential_times)
    print(f"{claim_id}: {len(configs)} runs, one by one {sequential:.1f} s")
    for size in args.group_sizes:
        median = statistics.median(times[size])
        print(
            f"  group size {size:3d}: {median:.1f} s, ratio {sequential / median:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--claims",
        nargs="+",
        default=DEFAULT_CLAIMS,
        help=f"claim ids whose quick grids to time (default: {' '.join(DEFAULT_CLAIMS)})",
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds per grid (default: 5)"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=MAX_GROUP,
        help=f"maximum runs per batched group (default: MAX_GROUP, {MAX_GROUP})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timings per grid; the median is printed (default: 1)",
    )
    parser.add_argument(
        "--group-sizes",
        type=int,
        nargs="+",
        help="time the first grid batched with each of these group sizes instead",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default: 1, as verify)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    backend = getattr(batchnorm, "get_batch_norm_backend", lambda: "reference")()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), BatchNorm backend {backend}"
    )
    data = load_classification("digits")
    if args.group_sizes:
        compare_group_sizes(args, data)
    else:
        compare_grids(args, data)


if __name__ == "__main__":
    main()
