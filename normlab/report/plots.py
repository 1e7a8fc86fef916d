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


def psnr_curves(groups, title: str, path: Path, target: float | None = None) -> Path:
    """Plot validation PSNR against step, the mean over seeds with a min-max band.

    ``groups`` is a list of ``(label, color, runs)``. Only finished runs count, over
    the steps that all of them evaluated. ``target`` draws a dashed horizontal line.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, color, runs in groups:
        histories = [r.history for r in runs if r.history and r.status == "finished"]
        if not histories:
            continue
        length = min(len(h) for h in histories)
        steps = [row["step"] for row in histories[0][:length]]
        values = np.array([[row["val_psnr"] for row in h[:length]] for h in histories])
        ax.plot(steps, values.mean(axis=0), color=color, linewidth=2,
                label=f"{label} ({len(histories)} seeds)")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color,
                        alpha=0.2, linewidth=0)
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1,
                   label=f"target {target:.2f} dB")
    ax.set_xlabel("step")
    ax.set_ylabel("validation PSNR (dB), mean and min-max over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def image_panels(panels, title: str, path: Path) -> Path:
    """Show images side by side, each with its caption.

    ``panels`` is a list of ``(caption, image)`` with uint8 images, (H, W) for gray or
    (H, W, 3) for RGB, or None for a panel that has no image (drawn empty).
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6),
                             squeeze=False)
    for ax, (caption, image) in zip(axes[0], panels):
        if image is None:
            ax.text(0.5, 0.5, "no output\n(run diverged)", ha="center", va="center")
        elif image.ndim == 2:
            ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(caption, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def memory_by_layer(reports: dict, title: str, path: Path) -> Path:
    """Draw stacked bars of saved-for-backward MiB per layer type, one bar per model.

    ``reports`` maps a label to a ``{layer type: bytes}`` dict, such as
    ``SavedTensorReport.by_layer_type``, which includes the saved weights.
    """
    labels = list(reports)
    layer_types = sorted({name for counts in reports.values() for name in counts})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bottoms = np.zeros(len(labels))
    for index, layer_type in enumerate(layer_types):
        counts = [reports[label].get(layer_type, 0) for label in labels]
        values = np.array(counts) / 2**20
        ax.bar(labels, values, bottom=bottoms, label=layer_type,
               color=COLORS[index % len(COLORS)])
        bottoms += values
    for position, total in enumerate(bottoms):
        ax.text(position, total, f"{total:.1f} MiB", ha="center", va="bottom",
                fontsize=8)
    ax.set_ylabel("MiB saved for backward, weights included")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="layer type", title_fontsize=8)
    return _save(fig, path)


def accuracy_sweep(table: dict, conditions, xlabel: str, reference, title: str,
                   path: Path) -> Path:
    """Plot final accuracy against a numeric setting on a log axis, one line per condition.

    ``table`` maps ``(condition, setting, seed)`` to an accuracy. The line is the mean
    over seeds and the dots are single seeds. ``reference`` is ``(value, label)`` for a
    dashed horizontal line, or None.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for color, (name, label) in zip(COLORS, conditions):
        settings = sorted({x for (n, x, _) in table if n == name})
        means = []
        for x in settings:
            accs = [a for (n, s, _), a in table.items() if n == name and s == x]
            means.append(np.mean(accs))
            ax.scatter([x] * len(accs), accs, color=color, s=10, alpha=0.5)
        ax.plot(settings, means, "-o", color=color, label=label, markersize=4)
    if reference is not None:
        value, label = reference
        ax.axhline(value, color="gray", linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def point_panels(panels, title: str, path: Path, ylabel: str | None = None,
                 sharey: bool = False) -> Path:
    """Plot values of categorical settings side by side, one panel per group.

    ``panels`` is a list of ``(panel title, points)``, where ``points`` is a list of
    ``(tick label, values over seeds)``. Each tick shows its values as dots and their
    mean as a short black line with the mean printed beside it. A tick with no values is
    empty. ``sharey`` gives all panels one y axis, for values of the same metric.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.0),
                             squeeze=False, sharey=sharey)
    for ax, (panel_title, points) in zip(axes[0], panels):
        for position, (_, values) in enumerate(points):
            if not values:
                continue
            ax.scatter([position] * len(values), values, color="tab:blue", s=14,
                       alpha=0.5)
            mean = float(np.mean(values))
            ax.plot([position - 0.25, position + 0.25], [mean, mean], color="black",
                    linewidth=2)
            ax.annotate(f"{mean:.3f}", (position + 0.28, mean), fontsize=7,
                        va="center")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels([tick for tick, _ in points], fontsize=8)
        ax.set_xlim(-0.5, len(points) - 0.2)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    if ylabel is not None:
        axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def history_curves(groups, metrics, title: str, path: Path) -> Path:
    """Plot history metrics against step, one panel per metric, one line per run.

    ``groups`` is a list of ``(label, color, runs)`` and ``metrics`` a list of
    ``(history key, axis label)``. Each finished run is a thin line, and diverged
    runs are left out.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8),
                             squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], metrics):
        for label, color, runs in groups:
            finished = [r for r in runs if r.status == "finished" and r.history]
            for index, run in enumerate(finished):
                steps = [row["step"] for row in run.history]
                values = [row.get(metric, math.nan) for row in run.history]
                ax.plot(steps, values, color=color, linewidth=1.2, alpha=0.8,
                        label=f"{label} ({len(finished)} runs)" if index == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def metric_bands(panels, groups, title: str, path: Path) -> Path:
    """Plot history metrics against step, one panel per metric, one color per group.

    ``panels`` is a list of ``(metric name, y label, log scale)`` and ``groups`` a list
    of ``(label, color, runs)``. At every step where some runs of a group have a finite
    value, the line is the mean over those runs and the band spans their min to max. So
    a run that diverged early stops counting after its last value.
    """
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.4 * rows),
                             squeeze=False)
    for ax, (name, ylabel, log_scale) in zip(axes.flat, panels):
        for label, color, runs in groups:
            steps, values = _values_by_step(runs, name, positive=log_scale)
            if not steps:
                continue
            ax.plot(steps, [np.mean(v) for v in values], color=color, linewidth=1.5,
                    label=f"{label} ({len(runs)} runs)")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                            color=color, alpha=0.2, linewidth=0)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _values_by_step(runs, name: str, positive: bool):
    """Return the sorted steps and, per step, the finite values of ``name`` over runs.

    ``positive`` drops values <= 0, which a log axis cannot show.
    """
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run.history:
            value = row.get(name)
            if value is None or not math.isfinite(value) or (positive and value <= 0):
                continue
            by_step.setdefault(row["step"], []).append(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def depth_lines(panels, ylabel: str, title: str, path: Path) -> Path:
    """Plot a positive quantity against network depth on log axes, one panel per group.

    ``panels`` is a list of ``(panel title, lines)``, where ``lines`` is a list of
    ``(label, color, line style, {depth: [value per seed]})``. The line joins the
    geometric means over seeds and the dots are single seeds; values <= 0 or not finite
    are left out. A dotted line marks 1.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0),
                             squeeze=False, sharey=True)
    for ax, (panel_title, lines) in zip(axes[0], panels):
        for label, color, style, by_depth in lines:
            depths, means = [], []
            for depth in sorted(by_depth):
                values = [v for v in by_depth[depth] if math.isfinite(v) and v > 0]
                if not values:
                    continue
                ax.scatter([depth] * len(values), values, color=color, s=10, alpha=0.4)
                depths.append(depth)
                means.append(10 ** np.mean(np.log10(values)))
            if depths:
                ax.plot(depths, means, style, color=color, marker="o", markersize=4,
                        label=label)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("hidden layers (log scale)")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def setting_lines(panels, xlabel: str, title: str, path: Path) -> Path:
    """Plot values against a numeric setting on a linear axis, one panel per metric.

    ``panels`` is a list of ``(panel title, y label, lines, reference)``. ``lines`` is
    a list of ``(label, color, {setting: [value per seed]})``. Each line joins the
    means over seeds, the dots are single seeds, and a setting without values is
    skipped. ``reference`` is ``(value, label)`` for a dashed horizontal line, or None.
    Each panel scales its own y axis.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9),
                             squeeze=False)
    for ax, (panel_title, ylabel, lines, reference) in zip(axes[0], panels):
        for label, color, by_setting in lines:
            settings, means = [], []
            for setting in sorted(by_setting):
                values = [v for v in by_setting[setting] if math.isfinite(v)]
                if not values:
                    continue
                ax.scatter([setting] * len(values), values, color=color, s=12,
                           alpha=0.5)
                settings.append(setting)
                means.append(float(np.mean(values)))
            if settings:
                ax.plot(settings, means, "-o", color=color, markersize=4, label=label)
        if reference is not None:
            value, reference_label = reference
            ax.axhline(value, color="gray", linestyle="--", linewidth=1,
                       label=reference_label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
