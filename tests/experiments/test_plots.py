"""experiments/common/plots.py: the one figure style, and what its panel grid promises."""
import pathlib
import re

import matplotlib.image
import pytest

from experiments.common import plots
from experiments.common.plots import Panel, save_panel_grid

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_experiment_draws_through_the_style_module():
    """No experiment sets up its own pyplot figures: every figure gets the house style and atomic saves."""
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "experiments").rglob("*.py"))
                 if path.name != "plots.py" and re.search(r"matplotlib\.pyplot|\bplt\.", path.read_text())]
    assert not offenders, f"use experiments.common.plots instead of pyplot in {offenders}"


def _draw(tmp_path, monkeypatch, panel: Panel):
    """Draws one panel and returns its Axes (captured from plots.figure as the grid makes it)."""
    captured = {}
    original = plots.figure

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        captured["ax"] = axes
        return fig, axes

    monkeypatch.setattr(plots, "figure", spy)
    path = save_panel_grid(str(tmp_path / "panel.png"), [[panel]])
    assert matplotlib.image.imread(path).shape[0] > 100
    return captured["ax"]


def test_references_are_unmarked_grey_lines_in_the_legend(tmp_path, monkeypatch):
    counts = [2, 4, 6, 10]
    ax = _draw(tmp_path, monkeypatch, Panel("outliers", "classes C", "outliers", {"measured": (counts, [2, 4, 5, 9])},
                               logx=False, logy=False, references={"outliers = C": (counts, counts)}))
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["measured"].get_marker() not in (None, "None", "")
    reference = lines["outliers = C"]
    assert reference.get_marker() in (None, "None", "") and reference.get_color() == "0.35"
    assert list(reference.get_xdata()) == counts and list(reference.get_ydata()) == counts
    legend_texts = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert legend_texts == ["measured", "outliers = C"]


def test_dodge_separates_coinciding_series_symmetrically_and_slightly(tmp_path, monkeypatch):
    xs, ys = [2, 4, 6], [1, 2, 3]
    ax = _draw(tmp_path, monkeypatch, Panel("t", "C", "n", {"a": (xs, ys), "b": (xs, ys), "c": (xs, ys)},
                               logx=False, logy=False, dodge=True))
    shift = {line.get_label(): [x - x0 for x, x0 in zip(line.get_xdata(), xs)] for line in ax.get_lines()}
    assert shift["a"] == pytest.approx([-0.16] * 3) and shift["b"] == pytest.approx([0.0] * 3)
    assert shift["c"] == pytest.approx([0.16] * 3)  # ±8% of the x spacing (2)
    assert all(tick == round(tick) for tick in ax.get_xticks())  # integer x values: integer ticks


def test_log_axes_drop_non_positive_points_and_keep_the_rest(tmp_path, monkeypatch):
    ax = _draw(tmp_path, monkeypatch, Panel("t", "D", "ms", {"a": ([1, 2, 4, 8], [0.0, 1.0, float("nan"), 3.0])}))
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [2, 8] and list(line.get_ydata()) == [1.0, 3.0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_reference_line_takes_exactly_one_coordinate():
    fig, ax = plots.figure()
    with pytest.raises(ValueError, match="exactly one of y= or x="):
        plots.reference_line(ax, y=1.0, x=2.0)


def test_log_scale_labels_the_given_ticks_plainly_and_hides_minor_labels():
    fig, ax = plots.figure()
    ax.plot([2, 5, 10, 20], [0.1, 0.2, 0.3, 0.4])
    plots.log_scale(ax, "x", ticks=[2, 5, 10, 20])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "5", "10", "20"]
    assert type(ax.xaxis.get_minor_formatter()).__name__ == "NullFormatter"


def test_label_points_places_labels_without_overlap():
    """A tight cluster (the case of methods with near-equal scores and costs): every label is drawn,
    no two label boxes overlap and no label covers another point."""
    import numpy as np

    fig, ax = plots.figure(1, 1, size=(6.0, 4.0))
    xs = [1.0, 1.02, 0.98, 1.01, 0.5, 0.0]
    ys = [1.0, 0.99, 0.995, 0.985, 0.5, 0.0]
    names = ["gnh_if", "exact_if", "lissa", "ekfac", "tracin", "grad_dot"]
    ax.scatter(xs, ys)
    ax.set_xlim(-0.1, 1.3)
    ax.set_ylim(-0.1, 1.1)
    plots.label_points(ax, names, xs, ys)
    renderer = fig.canvas.get_renderer()
    texts = [t for t in ax.texts]
    assert sorted(t.get_text() for t in texts) == sorted(names)
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    points = ax.transData.transform(np.column_stack([xs, ys]))
    for text, box in zip(texts, boxes):
        own = names.index(text.get_text())
        for k, (px, py) in enumerate(points):
            if k != own:
                assert not (box.x0 <= px <= box.x1 and box.y0 <= py <= box.y1), (text.get_text(), names[k])
    with pytest.raises(ValueError, match="2 names, 3 x values"):
        plots.label_points(ax, ["a", "b"], [1, 2, 3], [1, 2, 3])
