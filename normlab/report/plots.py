"""Figures of the claims, written as PNG files with matplotlib's Agg backend."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
DPI = 110


def lr_sweep(table: dict, conditions, threshold: float, title: str, path: Path) -> Path:
    """Plot final validation accuracy against learning rate, one line per condition.

    ``table`` maps ``(condition, lr, seed)`` to the final accuracy (NaN when diverged). The
    line is the mean over seeds that did not diverge; dots are single seeds and crosses
    mark diverged runs at the bottom of the axis.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, (color, (name, label)) in enumerate(zip(COLORS, conditions)):
        lrs = sorted({lr for (n, lr, _) in table if n == name})
        means = []
        for lr in lrs:
            accs = [a for (n, l, _), a in table.items() if n == name and l == lr]
            finite = [a for a in accs if math.isfinite(a)]
            means.append(np.mean(finite) if finite else np.nan)
            ax.scatter([lr] * len(finite), finite, color=color, s=10, alpha=0.5)
            diverged = len(accs) - len(finite)
            if diverged:
                # one row of crosses per condition, so they do not hide each other
                ax.scatter([lr], [-0.03 * index], marker="x", color=color, s=40)
        ax.plot(lrs, means, "-o", color=color, label=label, markersize=4)
    ax.axhline(threshold, color="gray", linestyle="--", linewidth=1, label="trains threshold")
    ax.set_xscale("log")
    ax.set_ylim(-0.03 * len(conditions) - 0.02, 1.02)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("final validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="x = diverged", title_fontsize=8)
    return _save(fig, path)


def curves_by_lr(records, conditions, title: str, path: Path) -> Path:
    """Plot validation accuracy against step, one panel per condition, one line per lr."""
    fig, axes = plt.subplots(1, len(conditions), figsize=(5.2 * len(conditions), 3.8),
                             sharey=True, squeeze=False)
    records = list(records)
    lrs = sorted({r.config.lr for r in records})
    cmap = plt.get_cmap("viridis")
    for ax, (name, label) in zip(axes[0], conditions):
        for i, lr in enumerate(lrs):
            color = cmap(i / max(1, len(lrs) - 1))
            runs = [r for r in records if r.config.norm == name and r.config.lr == lr]
            steps, mean = _mean_curve(runs)
            if steps is not None:
                ax.plot(steps, mean, color=color, linewidth=1.2)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy (mean over seeds)")
    handles = [
        plt.Line2D([], [], color=cmap(i / max(1, len(lrs) - 1)), label=f"lr {lr:.3g}")
        for i, lr in enumerate(lrs)
    ]
    fig.legend(handles=handles, fontsize=7, loc="center right",
               title="diverged runs\nhave no line", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, rect=(0, 0, 0.87, 1))


def accuracy_curves(selected, target: float, title: str, path: Path) -> Path:
    """Plot validation accuracy against step for labelled groups of runs.

    ``selected`` is a list of ``(label, runs)``; each run is a thin line and the mean over
    runs a thick one.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, (label, runs) in zip(COLORS, selected):
        for run in runs:
            if run.history:
                steps = [row["step"] for row in run.history]
                ax.plot(steps, [row["val_acc"] for row in run.history],
                        color=color, alpha=0.3, linewidth=0.8)
        steps, mean = _mean_curve(runs)
        if steps is not None:
            ax.plot(steps, mean, color=color, linewidth=2, label=label)
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _mean_curve(runs):
    """Return ``(steps, mean accuracy)`` over the steps that every run evaluated."""
    histories = [r.history for r in runs if r.history and r.status == "finished"]
    if not histories:
        return None, None
    length = min(len(h) for h in histories)
    steps = [row["step"] for row in histories[0][:length]]
    values = np.array([[row["val_acc"] for row in h[:length]] for h in histories])
    return steps, values.mean(axis=0)


def _save(fig, path: Path, rect=None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
