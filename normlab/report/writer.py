"""The verdict table, ``verdicts.json``, ``report.md`` and a self-contained ``report.html``."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__

VERDICT_COLORS = {"SUPPORTED": "#1a7f37", "NOT SUPPORTED": "#cf222e", "INCONCLUSIVE": "#9a6700"}


def format_effect(verdict) -> str:
    if verdict.effect is None:
        return "n/a"
    text = f"{verdict.effect:.3g}"
    if verdict.interval is not None:
        low, high = verdict.interval
        text += f" [{low:.3g}, {high:.3g}]"
    return text


def verdict_table(verdicts: Sequence) -> str:
    """Return the verdicts as a plain-text table for the terminal."""
    rows = [("claim", "verdict", "effect [95% CI]", "unit", "dataset", "runs", "train s")]
    for v in verdicts:
        rows.append((v.claim, v.verdict, format_effect(v), v.effect_label, v.dataset,
                     str(v.runs), f"{v.wall_time:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(verdicts: Sequence, path: Path) -> Path:
    data = [_finite(v.to_json()) for v in verdicts]
    for entry in data:
        # file names: the plots lie next to verdicts.json, wherever the folder moves
        entry["plots"] = [Path(plot).name for plot in entry.get("plots", [])]
    return _atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_markdown(verdicts: Sequence, out_dir: Path, meta: dict) -> Path:
    lines = [
        "# normlab report",
        "",
        _meta_line(meta),
        "",
        "| claim | verdict | effect [95% CI] | unit | dataset | runs |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        lines.append(
            f"| `{v.claim}` | **{v.verdict}** | {format_effect(v)} | {v.effect_label} | "
            f"{v.dataset} | {v.runs} |"
        )
    for v in verdicts:
        lines += [
            "",
            f"## `{v.claim}`: {v.statement}",
            "",
            f"**Verdict: {v.verdict}.** {v.summary}",
            "",
            f"- Hypothesis: {v.hypothesis}",
            f"- Grid: {v.grid}",
            f"- Metric: {v.metric}",
            f"- Decision rule: {v.decision_rule}",
            f"- Data: {v.dataset} ({v.data_source}), scale {v.scale}, {v.runs} runs, "
            f"{v.wall_time:.0f} s of training",
            "",
        ]
        for plot in v.plots:
            lines.append(f"![{Path(plot).stem}]({Path(plot).name})")
            lines.append("")
    return _atomic_write(out_dir / "report.md", "\n".join(lines))


def write_html(verdicts: Sequence, out_dir: Path, meta: dict) -> Path:
    """Write ``report.html`` with every plot embedded, so the file is self-contained."""
    rows = "".join(
        f"<tr><td><code>{_e(v.claim)}</code></td>"
        f"<td style='color:{VERDICT_COLORS.get(v.verdict, '#000')}'><b>{_e(v.verdict)}</b></td>"
        f"<td>{_e(format_effect(v))}</td><td>{_e(v.effect_label)}</td>"
        f"<td>{_e(v.dataset)}</td><td>{v.runs}</td></tr>"
        for v in verdicts
    )
    sections = []
    for v in verdicts:
        images = "".join(
            f"<img alt='{_e(Path(p).stem)}' src='data:image/png;base64,{_b64(p)}'>"
            for p in v.plots
            if Path(p).exists()
        )
        sections.append(
            f"<h2><code>{_e(v.claim)}</code>: {_e(v.statement)}</h2>"
            f"<p><b style='color:{VERDICT_COLORS.get(v.verdict, '#000')}'>"
            f"{_e(v.verdict)}.</b> {_e(v.summary)}</p><ul>"
            f"<li><b>Hypothesis:</b> {_e(v.hypothesis)}</li>"
            f"<li><b>Grid:</b> {_e(v.grid)}</li>"
            f"<li><b>Metric:</b> {_e(v.metric)}</li>"
            f"<li><b>Decision rule:</b> {_e(v.decision_rule)}</li>"
            f"<li><b>Data:</b> {_e(v.dataset)} ({_e(v.data_source)}), scale {_e(v.scale)}, "
            f"{v.runs} runs, {v.wall_time:.0f} s of training</li></ul>{images}"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>normlab report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; line-height: 1.45; color: #1f2328; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; text-align: left; }}
img {{ max-width: 100%; display: block; margin: 0.8rem 0; }}
</style></head><body>
<h1>normlab report</h1><p>{_e(_meta_line(meta))}</p>
<table><tr><th>claim</th><th>verdict</th><th>effect [95% CI]</th><th>unit</th>
<th>dataset</th><th>runs</th></tr>{rows}</table>
{''.join(sections)}
</body></html>
"""
    return _atomic_write(out_dir / "report.html", page)


def write_report(verdicts: Sequence, out_dir: Path, meta: dict) -> list[Path]:
    """Write ``verdicts.json``, ``report.md`` and ``report.html`` into ``out_dir``."""
    out_dir = Path(out_dir)
    meta = {**environment(), **meta}
    return [
        write_json(verdicts, out_dir / "verdicts.json"),
        write_markdown(verdicts, out_dir, meta),
        write_html(verdicts, out_dir, meta),
    ]


def environment() -> dict:
    return {
        "normlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }


def _meta_line(meta: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in meta.items())


def _e(text) -> str:
    return html.escape(str(text))


def _b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _finite(value):
    """Replace NaN and Inf, which JSON cannot hold, with None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _atomic_write(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
