"""The one plotting style of every figure, and shared plot helpers, saved as PNG.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
state, no display needed) and written atomically (temporary file, then rename), like every other
workdir file. `figure(...)` makes a figure in the house style (`STYLE`: readable font sizes, light
grid, no top/right spines); `integer_ticks`, `reference_line`, `legend` and `save` cover the
details a publication figure needs (integer ticks on integer axes, reference values drawn as lines
rather than data series, legends that cover no data). A label keeps the same colour and marker in
every panel of a `save_panel_grid` figure.

    fig, ax = figure()
    ax.plot(ks, recall, marker="o", label="afjl")
    reference_line(ax, y=0.9, label="target")
    integer_ticks(ax, "x"); legend(ax)
    save(fig, "recall.png")

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

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))

STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9.5,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "lines.linewidth": 1.8, "lines.markersize": 5,
    "legend.frameon": False, "figure.dpi": 130, "savefig.dpi": 130,
}


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] | None = None, **subplot_kw):
    """(Figure, axes) in the house style; axes is one Axes for 1×1, else a 2-D array (squeeze=False)."""
    width, height = size or (6.4 * ncols, 4.0 * nrows)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, (axes[0][0] if nrows == ncols == 1 else axes)


def integer_ticks(ax, which: str = "x") -> None:
    """Only integer tick labels on an axis that counts things (k, rank, step, class count)."""
    for name in which:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def log_scale(ax, which: str = "x", *, base: int = 10, ticks: Sequence[float] | None = None) -> None:
    """A log axis without crowded minor-tick labels; `ticks` puts plain labels at those values (e.g. the
    N of a sweep) instead of powers of the base."""
    axis = getattr(ax, f"{which}axis")
    getattr(ax, f"set_{which}scale")("log", base=base)
    axis.set_minor_formatter(NullFormatter())
    if ticks is not None:
        getattr(ax, f"set_{which}ticks")(list(ticks), [f"{t:g}" for t in ticks])


def reference_line(ax, *, y: float | None = None, x: float | None = None, label: str | None = None,
                   color: str = "0.35") -> None:
    """A reference value (a target, a paper's number, chance level) as a thin dashed line, not a data series."""
    if (y is None) == (x is None):
        raise ValueError("reference_line takes exactly one of y= or x=")
    draw = ax.axhline if y is not None else ax.axvline
    draw(y if y is not None else x, color=color, linestyle=(0, (4, 3)), linewidth=1.0, label=label, zorder=1)


# Label positions around a point, in points: (dx, dy); dx < 0 right-aligns the text at the point's left.
_LABEL_OFFSETS = ((4, 3), (4, -12), (-4, 3), (-4, -12), (4, 13), (4, -22), (-4, 13), (-4, -22))


def label_points(ax, names: Sequence[str], xs: Sequence[float], ys: Sequence[float], *, fontsize: float = 9) -> None:
    """Each name beside its scatter point (data units), at the first of eight positions around the point
    whose text box overlaps neither a label placed before it nor another point (the first position when
    every one collides). Labels are placed from the highest point down. Call it after the axis scales
    and limits are set: the boxes are measured on the rendered axes."""
    if not len(names) == len(xs) == len(ys):
        raise ValueError(f"label_points: {len(names)} names, {len(xs)} x values, {len(ys)} y values")
    renderer = ax.figure.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    radius = 4.0 * ax.figure.dpi / 72.0  # a marker's half-width in pixels
    placed = []
    for i in np.argsort(-np.asarray(ys, float), kind="stable"):
        others = np.delete(points, i, axis=0)
        for attempt, (dx, dy) in enumerate(_LABEL_OFFSETS + (_LABEL_OFFSETS[0],)):
            text = ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=(dx, dy),
                               fontsize=fontsize, ha="left" if dx > 0 else "right")
            box = text.get_window_extent(renderer)
            hits_point = bool(np.any((others[:, 0] > box.x0 - radius) & (others[:, 0] < box.x1 + radius)
                                     & (others[:, 1] > box.y0 - radius) & (others[:, 1] < box.y1 + radius)))
            if attempt == len(_LABEL_OFFSETS) or not (hits_point or any(box.overlaps(b) for b in placed)):
                placed.append(box)
                break
            text.remove()


def legend(ax, *, outside: bool = False, **kwargs):
    """A legend that covers no data: matplotlib's best free spot, or to the right of the axes."""
    with matplotlib.rc_context(STYLE):
        if outside:
            return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)
        return ax.legend(loc="best", **kwargs)


def save(fig: Figure, path: str) -> str:
    """Lays the figure out and writes it atomically; returns `path`."""
    with matplotlib.rc_context(STYLE):
        fig.tight_layout()
        _atomic_savefig(fig, path)
    return path


def save_to(fig: Figure, stream, *, format: str) -> None:
    """Lays the figure out and writes it to an open stream (e.g. an SVG inlined into an HTML page)."""
    with matplotlib.rc_context(STYLE):
        fig.tight_layout()
        fig.savefig(stream, format=format)


@dataclasses.dataclass
class Panel:
    """One subplot: `series` maps a line label to (xs, ys). Non-positive or non-finite points are
    dropped on log axes (matplotlib would otherwise silently mask them), so pass only measured data.

    `xscale_base` is the log base of the x axis (2 suits sizes such as D or m), `logy` uses a base-10
    log y axis; with `logx=False` / `logy=False` the axis is linear. `step_axis=True` makes the x axis
    symmetric-log (linear below 1, log above), so training step 0 sits at 0 rather than being
    faked as step 1. `own_legend=True` gives the panel its own legend with sequential colours (for
    series such as one curve per checkpoint) instead of entries in the figure's shared legend.
    `references` are drawn as thin grey dashed lines without markers (a conjecture such as y = x, a
    paper's numbers), not as data series. `dodge` shifts each data series sideways by a small fraction
    of the x spacing (linear x axes only), so series that coincide at the same x stay visible.
    """

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
    logx: bool = True
    logy: bool = True
    xscale_base: int = 2
    step_axis: bool = False
    own_legend: bool = False
    integer_y: bool = False   # a count: integer tick labels only
    references: Mapping[str, tuple[Sequence[float], Sequence[float]]] = dataclasses.field(default_factory=dict)
    dodge: bool = False


def _points(panel: Panel, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(xs) != len(ys):
        raise ValueError(f"panel {panel.title!r}: {len(xs)} x values but {len(ys)} y values")
    kept = [
        (float(x), float(y)) for x, y in zip(xs, ys)
        if math.isfinite(float(x)) and math.isfinite(float(y))
        and (not panel.logx or panel.step_axis or float(x) > 0) and (not panel.logy or float(y) > 0)
        and (not panel.step_axis or float(x) >= 0)
    ]
    return [x for x, _ in kept], [y for _, y in kept]


def _all_integers(values) -> bool:
    values = [float(v) for v in values]
    return bool(values) and all(math.isfinite(v) and v == round(v) for v in values)


def _dodge_offsets(panel: Panel) -> dict[str, float]:
    """x offsets for `Panel.dodge`: series spread symmetrically over ±8% of the smallest x spacing."""
    if not panel.dodge or panel.logx or panel.step_axis or len(panel.series) < 2:
        return {}
    xs = sorted({float(x) for values, _ in panel.series.values() for x in values})
    spacing = min((b - a for a, b in zip(xs, xs[1:])), default=1.0)
    labels = list(panel.series)
    width = 0.16 * spacing
    return {label: width * (k / (len(labels) - 1) - 0.5) for k, label in enumerate(labels)}


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
            if not panel.own_legend:
                labels.extend(label for label in panel.series if label not in labels)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(labels)}
    # Coinciding series stay distinguishable: each label also gets its own dash pattern.
    styles = {label: LINESTYLES[i % len(LINESTYLES)] for i, label in enumerate(labels)}

    fig, axes = figure(num_rows, num_cols, size=(panel_size[0] * num_cols, panel_size[1] * num_rows + 0.6))
    if num_rows == num_cols == 1:  # figure() returns a bare Axes for a 1×1 grid
        axes = [[axes]]
    fig.set_dpi(dpi)
    handles = {}
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = axes[i][j]
            own = list(panel.series) if panel.own_legend else []
            cmap = matplotlib.colormaps["viridis"]
            offsets = _dodge_offsets(panel)
            for label, (xs, ys) in panel.series.items():
                px, py = _points(panel, xs, ys)
                if not px:
                    continue
                px = [x + offsets.get(label, 0.0) for x in px]
                if panel.own_legend:
                    k = own.index(label)
                    ax.plot(px, py, marker=MARKERS[k % len(MARKERS)], color=cmap(k / max(len(own) - 1, 1) * 0.9),
                            label=label, linewidth=1.5, markersize=4, alpha=0.9)
                else:
                    (line,) = ax.plot(px, py, marker=markers[label], color=colors[label], label=label,
                                      linestyle=styles[label], linewidth=1.5, markersize=5, alpha=0.85)
                    handles.setdefault(label, line)
            for k, (label, (xs, ys)) in enumerate(panel.references.items()):
                px, py = _points(panel, xs, ys)
                (line,) = ax.plot(px, py, color="0.35", linestyle=LINESTYLES[(k + 1) % len(LINESTYLES)],
                                  linewidth=1.0, label=label, zorder=1)
                handles.setdefault(label, line)
                if label not in labels:
                    labels.append(label)
            if panel.own_legend and own:
                ax.legend(fontsize=8, ncol=2 if len(own) > 5 else 1, loc="best")
            if panel.step_axis:
                ax.set_xscale("symlog", base=panel.xscale_base, linthresh=1, linscale=0.5)
                ax.set_xlim(left=-0.2)
            elif panel.logx:
                ax.set_xscale("log", base=panel.xscale_base)
            if panel.logy:
                ax.set_yscale("log")
            if panel.integer_y:
                integer_ticks(ax, "y")
            if not panel.logx and _all_integers(x for xs, _ in panel.series.values() for x in xs):
                integer_ticks(ax, "x")
            ax.set_title(panel.title)
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            ax.grid(True, which="major", alpha=0.3)
    if handles:
        ordered = [label for label in labels if label in handles]
        width = fig.get_size_inches()[0]
        longest = max(len(label) for label in ordered)
        ncol = max(1, min(len(ordered), int(width / (0.55 + 0.085 * longest))))  # the legend fits the figure width
        legend_rows = math.ceil(len(ordered) / ncol)
        fig.legend([handles[label] for label in ordered], ordered, loc="lower center", ncol=ncol, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    with matplotlib.rc_context(STYLE):
        height = fig.get_size_inches()[1]
        bottom = min(0.45, (0.12 + 0.26 * legend_rows) / height) if handles else 0
        fig.tight_layout(rect=(0, bottom, 1, 1))
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
