"""Shared plotting helpers for experiments: grids of line plots (log-log by default) saved as PNG.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
state, no display needed) and written atomically (temporary file, then rename), like every other
workdir file. A label keeps the same colour and marker in every panel of a figure.

    panel = Panel(title="m = 1024", xlabel="D", ylabel="time (ms)",
                  series={"afjl": ([2**16, 2**18], [1.2, 4.8]), "dense": ([2**16], [260.0])})
    save_panel_grid("time_vs_D.png", [[panel]], suptitle="apply() wall time")
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


@dataclasses.dataclass
class Panel:
    """One subplot: `series` maps a line label to (xs, ys). Non-positive or non-finite points are
    dropped on log axes (matplotlib would otherwise silently mask them), so pass only measured data.

    `xscale_base` is the log base of the x axis (2 suits sizes such as D or m), `logy` uses a base-10
    log y axis; with `logx=False` / `logy=False` the axis is linear.
    """

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
    logx: bool = True
    logy: bool = True
    xscale_base: int = 2


def _points(panel: Panel, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(xs) != len(ys):
        raise ValueError(f"panel {panel.title!r}: {len(xs)} x values but {len(ys)} y values")
    kept = [
        (float(x), float(y)) for x, y in zip(xs, ys)
        if math.isfinite(float(x)) and math.isfinite(float(y))
        and (not panel.logx or float(x) > 0) and (not panel.logy or float(y) > 0)
    ]
    return [x for x, _ in kept], [y for _, y in kept]


def save_panel_grid(
    path: str,
    rows: Sequence[Sequence[Panel]],
    *,
    suptitle: str | None = None,
    panel_size: tuple[float, float] = (4.2, 3.4),
    dpi: int = 120,
) -> str:
    """Draws a grid of panels (`rows[i][j]` is row i, column j) with one shared legend; returns `path`."""
    if not rows or not all(rows) or len({len(r) for r in rows}) != 1:
        raise ValueError("rows must be a non-empty rectangular grid of Panels")
    num_rows, num_cols = len(rows), len(rows[0])
    labels: list[str] = []
    for row in rows:
        for panel in row:
            labels.extend(label for label in panel.series if label not in labels)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    markers = {label: _MARKERS[i % len(_MARKERS)] for i, label in enumerate(labels)}

    fig = Figure(figsize=(panel_size[0] * num_cols, panel_size[1] * num_rows + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    handles = {}
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = axes[i][j]
            for label, (xs, ys) in panel.series.items():
                px, py = _points(panel, xs, ys)
                if px:
                    (line,) = ax.plot(px, py, marker=markers[label], color=colors[label], label=label, linewidth=1.5, markersize=4)
                    handles.setdefault(label, line)
            if panel.logx:
                ax.set_xscale("log", base=panel.xscale_base)
            if panel.logy:
                ax.set_yscale("log")
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            ax.grid(True, which="major", alpha=0.3)
    if handles:
        ordered = [label for label in labels if label in handles]
        fig.legend([handles[label] for label in ordered], ordered, loc="lower center",
                   ncol=min(len(ordered), 8), frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    _atomic_savefig(fig, path)
    return path


def _atomic_savefig(fig: Figure, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
