"""The repository's module import graph: the rule of docs/architecture.md, checked and drawn.

    python -m tools.import_graph            # writes docs/architecture.png

Layers, each importing only from layers to its left (never upward, never sideways between experiments):

    artifacts → sketching → landscape → attribution → experiments.common → experiments.tasks → experiments.<kind>

`configs/` may import experiments.common/tasks constants and other configs; an experiment module may
import config modules (plain data: its own, or another's `get_config` to build a task the same way),
never another experiment module. `tests/` may import anything.
"""
from __future__ import annotations

import ast
import os
from typing import Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer order: a module may import modules of its own layer or of a layer with a smaller index.
LAYERS = ("artifacts", "sketching", "landscape", "attribution", "experiments.common", "experiments.tasks",
          "experiments")
PACKAGES = ("artifacts", "sketching", "landscape", "attribution", "experiments", "configs")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def python_modules(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """{dotted module name: file path} for every .py file of the given top-level packages."""
    out = {}
    for package in packages:
        folder = os.path.join(ROOT, package)
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for filename in sorted(filenames):
                if filename.endswith(".py"):
                    path = os.path.join(dirpath, filename)
                    out[_module_name(path)] = path
    return out


def imports_of(path: str, known: Iterable[str]) -> set[str]:
    """The repository modules imported by the file (absolute imports, incl. ones inside functions),
    resolved to the longest known module name (`from experiments.common import data` → experiments.common.data)."""
    known = set(known)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    found: set[str] = set()

    def resolve(name: str) -> None:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            candidate = ".".join(parts[:cut])
            if candidate in known:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                resolve(f"{node.module}.{alias.name}")
    return found


def layer_of(module: str) -> str | None:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def import_graph() -> dict[str, set[str]]:
    modules = python_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def violations(graph: dict[str, set[str]] | None = None) -> list[str]:
    """Every import that breaks the layering rule, as readable lines (empty when the rule holds)."""
    graph = import_graph() if graph is None else graph
    problems = []
    for module, targets in sorted(graph.items()):
        source_layer = layer_of(module)
        if source_layer is None:  # configs: may import configs and experiments.common / tasks constants
            for target in sorted(targets):
                if layer_of(target) == "experiments" and target != "experiments":
                    problems.append(f"{module} imports the experiment {target}")
            continue
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer is None:  # a config module: data, importable by experiment modules only
                if source_layer != "experiments":
                    problems.append(f"{module} ({source_layer}) imports the config {target}: the library never "
                                    "reads configs")
                continue
            if LAYERS.index(target_layer) > LAYERS.index(source_layer):
                problems.append(f"{module} ({source_layer}) imports {target} ({target_layer}): an upward import")
            if source_layer == "experiments" and target_layer == "experiments" and target not in (
                    "experiments", "experiments.run") and module != "experiments.run":
                problems.append(f"{module} imports the experiment {target}: experiments never import each other")
            if module != "experiments.run" and target == "experiments.run" and source_layer != "experiments":
                problems.append(f"{module} imports the runner")
    return problems


def package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], int]:
    """Import counts between layers (plus 'configs'), for the figure."""
    counts: dict[tuple[str, str], int] = {}
    for module, targets in graph.items():
        source = layer_of(module) or "configs"
        for target in targets:
            destination = layer_of(target) or "configs"
            if destination != source:
                counts[(source, destination)] = counts.get((source, destination), 0) + 1
    return counts


# Long edges from the experiment modules to the library run as buses around the other boxes:
# (leave the experiment box at its bottom/top, run along y = bus, enter the target from below/above).
BUSES = {("experiments", "sketching"): -0.3, ("experiments", "attribution"): -0.3,
         ("experiments", "landscape"): 4.25, ("experiments", "artifacts"): 4.25,
         ("experiments.common", "artifacts"): 3.75, ("experiments.tasks", "artifacts"): 3.75}


def draw(path: str) -> None:
    """A layered picture of the package import graph: boxes per layer (with their modules), arrows
    from importer to imported, width ∝ number of module imports."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path as MplPath

    graph = import_graph()
    modules = sorted(graph)
    nodes = list(LAYERS) + ["configs"]
    members = {node: [m for m in modules if (layer_of(m) or "configs") == node] for node in nodes}
    positions = {"artifacts": (0.0, 3.0), "sketching": (0.0, 0.9), "landscape": (2.5, 3.0),
                 "attribution": (2.5, 0.9), "experiments.common": (5.0, 3.0), "experiments.tasks": (5.0, 0.9),
                 "experiments": (7.8, 1.95), "configs": (8.4, 3.95)}
    titles = {"experiments": "experiments/<kind>.py, run.py", "experiments.common": "experiments/common",
              "experiments.tasks": "experiments/tasks"}
    fig = Figure(figsize=(13.5, 7))
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(-1.2, 9.6)
    ax.set_ylim(-1.35, 4.85)
    ax.axis("off")
    width, height = 2.0, 1.0
    sizes = {"experiments": (2.4, 1.45), "configs": (2.2, 1.3)}
    for node in nodes:
        x, y = positions[node]
        w, h = sizes.get(node, (width, height))
        shown = [m.split(".")[-1] for m in members[node] if m != node and not m.endswith("__init__")]
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
                                    facecolor="#eef3fb" if node.startswith("experiments") or node == "configs"
                                    else "#f1f7ea", edgecolor="#333333", linewidth=1.2, zorder=2))
        ax.text(x, y + h / 2 - 0.17, titles.get(node, node), ha="center", va="center", fontsize=12, fontweight="bold",
                zorder=3)
        lines, line = [], ""
        for name in shown:
            if line and len(line) + len(name) > 34:
                lines.append(line)
                line = ""
            line += (", " if line else "") + name
        lines.append(line)
        ax.text(x, y - 0.12 if h > 1.2 else y - 0.1, "\n".join(lines), ha="center", va="center", fontsize=8, color="#333333", zorder=3)
    def border(center, toward, pad):
        """The point where the segment center→toward leaves the (padded) box around center."""
        (x, y), (tx, ty) = center, toward
        dx, dy = tx - x, ty - y
        t = min((width / 2 + pad) / abs(dx) if dx else float("inf"), (height / 2 + pad) / abs(dy) if dy else float("inf"))
        return x + t * dx, y + t * dy

    for (source, target), count in sorted(package_edges(graph).items()):
        start = border(positions[source], positions[target], 0.06)
        end = border(positions[target], positions[source], 0.08)
        style = dict(arrowstyle="-|>", mutation_scale=18, linewidth=0.8 + 0.2 * min(count, 15), color="#4a6fa5",
                     alpha=0.85, shrinkA=0, shrinkB=0, zorder=1)
        if (source, target) in BUSES:
            x0, y0 = positions[source]
            x1, y1 = positions[target]
            bus = BUSES[(source, target)]
            below = bus < y0
            lane = 0.12 * sorted(t for _, t in BUSES).index(target) if source == "experiments" else 0.0
            w0, h0 = sizes.get(source, (width, height))
            xs = x0 - w0 / 2 + 0.15 + lane
            ys = y0 - h0 / 2 if below else y0 + h0 / 2
            yt = y1 - height / 2 - 0.05 if below else y1 + height / 2 + 0.05
            bus_y = bus - lane if below else bus + lane
            route = MplPath([(xs, ys), (xs, bus_y), (x1 + lane, bus_y), (x1 + lane, yt)],
                           [MplPath.MOVETO, MplPath.LINETO, MplPath.LINETO, MplPath.LINETO])
            ax.add_patch(FancyArrowPatch(path=route, **style))
            continue
        ax.add_patch(FancyArrowPatch(start, end, **style))
    ax.text(-1.1, -1.3, "arrow: importer → imported (width grows with the number of module imports). Layers, lowest "
            "first: artifacts, sketching, landscape, attribution,\nexperiments/common, experiments/tasks, "
            "experiments/<kind>.py; every arrow points to a lower layer, and no experiment module imports another.",
            fontsize=10, color="#222222", va="bottom")
    fig.savefig(path, dpi=130)


def main() -> None:
    problems = violations()
    if problems:
        raise SystemExit("import rule broken:\n  " + "\n  ".join(problems))
    path = os.path.join(ROOT, "docs", "architecture.png")
    draw(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
