"""Sketch benchmark: wall time and memory of `sketch.apply` over D and m.

For each D = 2^k in `config.log2_D`, each sketch in `config.sketches` and each m in `config.m_values`:

* Template: a transformer-like parameter PyTree of `jax.ShapeDtypeStruct`s whose leaves sum to
  exactly D (an embedding of D/2 numbers, an attention kernel of D/4, an MLP kernel whose leading
  size is not a power of two, a bias and a norm scale), in `config.dtype`; the input is a Gaussian tree of
  that shape (one per D, shared by every sketch and m).
* `state = sketch.init(key, template)`, then `sketch.apply` is compiled ahead of time once
  (`jax.jit(apply).lower(state, x).compile()`, time recorded as `compile_s`).
* Wall time: `median_time` on the compiled executable: `warmup` untimed calls, then up to `repeats`
  timed calls, each ended by `jax.block_until_ready`, stopping early once the configuration has used
  `time_budget_s` (always >= 1 warm-up and 1 timed call). Reported: median and min (ms).
* Memory: XLA's memory analysis of the compiled executable (`temp_bytes`: scratch buffers, i.e. the
  working memory a sketch needs beyond its input, state and output; also as `temp_D_floats`, temp in
  units of D compute-dtype numbers: a D×m matrix would show as ≈ m), the sketch state's bytes, and
  the peak RSS rise of this process while the calls run (`rss_peak_mb`, sampled every millisecond;
  on accelerators it reflects host memory only, the device figure is `temp_bytes`).
* Skipping: before measuring, a single call's time is predicted from the same sketch's largest
  measured configuration (time ∝ D·m for dense, ∝ D·log2 D for the others); if the prediction
  exceeds `max_call_s` the configuration is skipped and recorded as skipped with the prediction
  (metrics.jsonl, table, summary), never silently; the goal's (D, m) is never skipped. An
  out-of-memory error is recorded likewise.

Outputs in the workdir: `metrics.jsonl` (one record per (sketch, D, m), measured or skipped),
`time_vs_D.png`, `memory_vs_D.png` (log-log, one line per sketch, one column per m, as the
paper's Figs. 3–4), `ratios.md` (also printed): time and memory per sketch, each sketch vs dense
(dense time / sketch time, dense temp / sketch temp), afjl vs fjl and affd vs ffd (the look-up
removal ratios: fjl / afjl and ffd / affd, > 1 means the paper's sketch wins). The summary holds
flat keys such as `time_ms/afjl/D=2^20/m=1024`, `speedup_vs_dense/afjl/D=2^20/m=1024`,
`speedup/afjl_vs_fjl/D=2^20/m=1024`, `temp_mb/...`, the best speed-up vs dense at the largest D
measured with m = `goal_m`, and whether the goal (>= `goal_speedup`x at D = 2^goal_log2_D,
m = goal_m) was met.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import sketching
from experiments.common import plots
from experiments.common.timing import PeakRSS, aot_compile, median_time, memory_of
from experiments.common.workdir import atomic_write_text

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}
MIN_LOG2_D, MAX_LOG2_D = 8, 30
PAIRS = (("afjl", "fjl"), ("affd", "ffd"))  # (paper's sketch, the baseline with a look-up)
MB = 1 << 20


# ---------------------------------------------------------------------------------------- config

RSS_RESOLUTION_MB = 0.1  # below this the sampled peak-RSS rise is allocator / page granularity


def goal_cell(config) -> tuple[int, int]:
    """(log2 D, m) of the headline goal: the configured values, or derived from the grid when None
    (D = 2^22 if measured, else the largest D; m = 1024 if measured, else the largest m <= 1024, else
    the smallest m), so every grid has a goal cell that is measured."""
    log2_ds, m_values = sorted(config.log2_D), sorted(config.m_values)
    log2_d = config.goal_log2_D
    if log2_d is None:
        log2_d = 22 if 22 in log2_ds else log2_ds[-1]
    m = config.goal_m
    if m is None:
        below = [v for v in m_values if v <= 1024]
        m = below[-1] if below else m_values[0]
    return log2_d, m


def validate_config(config) -> None:
    """Checks every field at the boundary; raises ValueError naming the field and allowed values."""
    for field in ("sketches", "log2_D", "m_values"):
        if not isinstance(config[field], (list, tuple)):
            raise ValueError(f"config.{field}={config[field]!r}; allowed values: a list or tuple")
    sketches = tuple(config.sketches)
    if not sketches:
        raise ValueError(f"config.sketches is empty; allowed values: {list(sketching.NAMES)}")
    for name in sketches:
        if name not in sketching.NAMES:
            raise ValueError(f"config.sketches contains unknown sketch {name!r}; allowed values: {list(sketching.NAMES)}")
    if len(set(sketches)) != len(sketches):
        raise ValueError(f"config.sketches has duplicates: {list(sketches)}")
    for name in config.sketch_options:
        if name not in sketching.NAMES:
            raise ValueError(
                f"config.sketch_options has an entry for unknown sketch {name!r}; allowed keys: {list(sketching.NAMES)}"
            )
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r}; allowed values: {list(DTYPES)}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("config.dtype='float64' needs 64-bit jax: set JAX_ENABLE_X64=1 (or use float32)")
    log2_d = tuple(config.log2_D)
    if not log2_d or any(not _is_int(k) or not MIN_LOG2_D <= k <= MAX_LOG2_D for k in log2_d):
        raise ValueError(
            f"config.log2_D={list(log2_d)}; allowed values: a non-empty list of ints in [{MIN_LOG2_D}, {MAX_LOG2_D}]"
        )
    m_values = tuple(config.m_values)
    if not m_values or any(not _is_int(m) or m < 1 for m in m_values):
        raise ValueError(f"config.m_values={list(m_values)}; allowed values: a non-empty list of positive ints")
    if len(set(log2_d)) != len(log2_d) or len(set(m_values)) != len(m_values):
        raise ValueError(f"config.log2_D={list(log2_d)} and config.m_values={list(m_values)} must not repeat values")
    for field in ("warmup", "repeats"):
        if not _is_int(config[field]) or config[field] < 1:
            raise ValueError(f"config.{field}={config[field]!r}; allowed values: ints >= 1")
    if not isinstance(config.time_budget_s, (int, float)) or not config.time_budget_s > 0:
        raise ValueError(f"config.time_budget_s={config.time_budget_s!r}; allowed values: seconds > 0")
    if not isinstance(config.max_call_s, (int, float)):
        raise ValueError(f"config.max_call_s={config.max_call_s!r}; allowed values: seconds (<= 0 disables skipping)")
    if not _is_int(config.seed):
        raise ValueError(f"config.seed={config.seed!r}; allowed values: ints")
    if config.goal_m is not None and config.goal_m not in m_values:
        raise ValueError(f"config.goal_m={config.goal_m!r}; allowed values: one of config.m_values={list(m_values)} "
                         "or None (derived from the grid)")
    if config.goal_log2_D is not None and (not _is_int(config.goal_log2_D)
                                           or not MIN_LOG2_D <= config.goal_log2_D <= MAX_LOG2_D):
        raise ValueError(f"config.goal_log2_D={config.goal_log2_D!r}; allowed values: ints in [{MIN_LOG2_D}, "
                         f"{MAX_LOG2_D}] or None (derived from the grid)")
    if not isinstance(config.goal_speedup, (int, float)) or not config.goal_speedup > 0:
        raise ValueError(f"config.goal_speedup={config.goal_speedup!r}; allowed values: a number > 0")
    # Every (sketch, m, D) must be buildable with its options: plans are checked by tracing `init`
    # abstractly (no tables are computed), so errors surface now and not an hour into the grid.
    key = jax.random.key(0)
    for name in sketches:
        options = _options(config, name)
        for m in m_values:
            try:
                sketch = sketching.get(name, m, **options)
                for k in log2_d:
                    template = make_template(k, DTYPES[config.dtype])
                    jax.eval_shape(sketch.init, key, template)
            except ValueError as err:
                raise ValueError(
                    f"config.sketches/config.m_values/config.log2_D/config.sketch_options.{name}: "
                    f"sketch {name!r} with m={m}, options={options} cannot run on this grid: {err}"
                ) from err


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _options(config, name: str) -> dict:
    """The sketch's options as a plain dict (ConfigDict entries converted)."""
    if name not in config.sketch_options:
        return {}
    entry = config.sketch_options[name]
    return dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)


# ------------------------------------------------------------------------------------- measuring

def make_template(log2_d: int, dtype: Any) -> dict:
    """A transformer-like parameter tree of ShapeDtypeStructs with exactly D = 2^log2_d numbers.

    With width w = 2^⌊log2_d / 2⌋ and r = D / w rows: embedding (r/2, w) = D/2, attention kernel
    (w, r/4) = D/4, MLP kernel (r/4 − 2, w) (not a power of two, as in real layers), bias (w,)
    and norm scale (w,): D/2 + D/4 + D/4 − 2w + w + w = D.
    """
    if not MIN_LOG2_D <= log2_d <= MAX_LOG2_D:
        raise ValueError(f"log2_D={log2_d}; allowed values: ints in [{MIN_LOG2_D}, {MAX_LOG2_D}]")
    d = 1 << log2_d
    w = 1 << (log2_d // 2)
    r = d // w

    def leaf(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    template = {
        "embed": {"embedding": leaf(r // 2, w)},
        "block": {
            "attention": {"kernel": leaf(w, r // 4)},
            "mlp": {"kernel": leaf(r // 4 - 2, w), "bias": leaf(w)},
            "norm": {"scale": leaf(w)},
        },
    }
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(template)) == d
    return template


def random_tree(key: jax.Array, template: Any) -> Any:
    """Standard normal arrays with the template's shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(key, len(leaves))
    arrays = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.block_until_ready(jax.tree.unflatten(treedef, arrays))


def work(name: str, d: int, m: int) -> float:
    """The cost model used to predict a call's time: D·m for dense, D·log2 D for the others."""
    return float(d) * m if name == "dense" else float(d) * math.log2(d)


def predict_call_s(name: str, d: int, m: int, measured: Sequence[Mapping]) -> tuple[float, Mapping] | None:
    """Predicted seconds of one call from the same sketch's largest measured configuration, and that
    reference record; None when nothing of this sketch has been measured yet."""
    refs = [r for r in measured if r["sketch"] == name and r["status"] == "ok"]
    if not refs:
        return None
    ref = max(refs, key=lambda r: work(name, r["D"], r["m"]))
    return ref["median_ms"] / 1e3 * work(name, d, m) / work(name, ref["D"], ref["m"]), ref


def _tree_bytes(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += int(leaf.size) * leaf.dtype.itemsize
    return total


def measure(sketch: sketching.Sketch, key: jax.Array, template: Any, x: Any, config) -> dict:
    """Compiles `sketch.apply` once and measures it on `x` (see the module docstring)."""
    state = sketch.init(key, template)
    t0 = time.perf_counter()
    compiled = aot_compile(sketch.apply, state, x)
    compile_s = time.perf_counter() - t0
    memory = memory_of(compiled)
    with PeakRSS() as rss:
        timing = median_time(
            compiled, state, x, warmup=config.warmup, repeats=config.repeats, budget_s=config.time_budget_s
        )
    d = state.layout.size
    itemsize = np.dtype(state.layout.compute_dtype).itemsize
    record = {
        "median_ms": timing["median_s"] * 1e3,
        "min_ms": timing["min_s"] * 1e3,
        "first_call_ms": timing["first_call_s"] * 1e3,
        "repeats": timing["repeats"],
        "warmup": timing["warmup"],
        "compile_s": compile_s,
        "state_bytes": _tree_bytes(state),
        "rss_peak_mb": rss.peak_delta_bytes / MB,
    }
    if memory:
        record.update(memory)
        record["temp_mb"] = memory["temp_bytes"] / MB
        record["temp_D_floats"] = memory["temp_bytes"] / (d * itemsize)
    return record


def _is_out_of_memory(err: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "Out of memory" in str(err)


def _label(log2_d: int, m: int) -> str:
    return f"D=2^{log2_d}/m={m}"


# ----------------------------------------------------------------------------------- the tables

def ratio_rows(records: Iterable[Mapping]) -> list[dict]:
    """Per (log2_D, m) measured: each sketch vs dense and the look-up pairs, from metrics records.

    Returns rows sorted by (log2_D, m) with keys "log2_D", "m" and, where both sides were measured:
    "speedup_vs_dense/<s>" = dense time / s time, "memory_ratio_vs_dense/<s>" = dense temp / s temp,
    "speedup/<a>_vs_<b>" = b time / a time and "memory_ratio/<a>_vs_<b>" = b temp / a temp for
    (a, b) in PAIRS (> 1: the paper's sketch a is faster / smaller). A ratio with a zero denominator
    is left out.
    """
    cells: dict[tuple[int, int], dict[str, Mapping]] = {}
    for r in records:
        if r["status"] == "ok":
            cells.setdefault((r["log2_D"], r["m"]), {})[r["sketch"]] = r

    def ratio(num: Mapping, den: Mapping, field: str) -> float | None:
        if field not in num or field not in den or not den[field]:
            return None
        return num[field] / den[field]

    rows = []
    for (log2_d, m), by_name in sorted(cells.items()):
        row: dict[str, Any] = {"log2_D": log2_d, "m": m}
        entries = []
        if "dense" in by_name:
            for name, r in sorted(by_name.items()):
                if name != "dense":
                    entries.append((f"speedup_vs_dense/{name}", ratio(by_name["dense"], r, "median_ms")))
                    entries.append((f"memory_ratio_vs_dense/{name}", ratio(by_name["dense"], r, "temp_bytes")))
        for a, b in PAIRS:
            if a in by_name and b in by_name:
                entries.append((f"speedup/{a}_vs_{b}", ratio(by_name[b], by_name[a], "median_ms")))
                entries.append((f"memory_ratio/{a}_vs_{b}", ratio(by_name[b], by_name[a], "temp_bytes")))
        row.update((k, v) for k, v in entries if v is not None)
        rows.append(row)
    return rows


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if value >= 100:
        text = f"{value:.0f}"
    elif value >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return text + unit


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_tables(records: Sequence[Mapping], title: str = "Sketch benchmark") -> str:
    """The markdown report (ratios.md, also printed): measured values, ratios and skipped configs."""
    records = list(records)
    names = sorted({r["sketch"] for r in records})
    grid = sorted({(r["log2_D"], r["m"]) for r in records})
    by_key = {(r["log2_D"], r["m"], r["sketch"]): r for r in records}
    rows = {(row["log2_D"], row["m"]): row for row in ratio_rows(records)}
    skipped = [r for r in records if r["status"] != "ok"]
    notes = {id(r): i + 1 for i, r in enumerate(skipped)}

    def cell(log2_d, m, name, field, unit=""):
        r = by_key.get((log2_d, m, name))
        if r is None:
            return "—"
        if r["status"] != "ok":
            return f"{r['status']} [{notes[id(r)]}]"
        return _fmt(r.get(field), unit)

    def value_table(field, unit=""):
        body = [[f"2^{k}", str(m)] + [cell(k, m, n, field, unit) for n in names] for k, m in grid]
        return _markdown(["D", "m"] + names, body)

    others = [n for n in names if n != "dense"]

    def dense_ratio_section(prefix, heading):
        """One row per (D, m) of `rows[(D, m)][prefix/<sketch>]`; empty unless dense and another sketch ran."""
        if "dense" not in names or not others:
            return []
        body = [
            [f"2^{k}", str(m)] + [_fmt(rows.get((k, m), {}).get(f"{prefix}/{n}"), "x") for n in others]
            for k, m in grid
        ]
        return [heading, _markdown(["D", "m"] + others, body)]

    sections = [f"## {title}"]
    sections += ["### Wall time of the jitted apply (median, ms)", value_table("median_ms")]
    sections += dense_ratio_section(
        "speedup_vs_dense", "### Speed-up vs dense (dense time / sketch time; > 1: the sketch is faster)")
    sections += ["### Compiled temporary memory (XLA memory analysis, MB)", value_table("temp_mb")]
    sections += ["### Temporary memory in units of D floats (a D×m matrix would be ≈ m)", value_table("temp_D_floats")]
    sections += dense_ratio_section(
        "memory_ratio_vs_dense", "### Memory ratio vs dense (dense temp / sketch temp; > 1: the sketch needs less)")
    sections += ["### Peak RSS rise during the calls (MB)", value_table("rss_peak_mb")]
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    if pairs:
        header = ["D", "m"]
        for a, b in pairs:
            header += [f"time {b}/{a}", f"temp {b}/{a}"]
        body = []
        for k, m in grid:
            row = rows.get((k, m), {})
            line = [f"2^{k}", str(m)]
            for a, b in pairs:
                line += [_fmt(row.get(f"speedup/{a}_vs_{b}"), "x"), _fmt(row.get(f"memory_ratio/{a}_vs_{b}"), "x")]
            body.append(line)
        sections += ["### Removing the look-up: afjl vs fjl, affd vs ffd (> 1: the paper's sketch wins)",
                     _markdown(header, body)]
    if skipped:
        sections += ["### Not measured"] + [
            f"[{notes[id(r)]}] {r['sketch']} D=2^{r['log2_D']} m={r['m']}: {r['status']}: {r['reason']}" for r in skipped
        ]
    return "\n\n".join(sections) + "\n"


# -------------------------------------------------------------------------------- summary, plots

def summarize(records: Sequence[Mapping], config) -> dict:
    """The flat summary: per-config numbers and ratios, the best speed-up and the goal's status."""
    summary: dict[str, Any] = {
        "num_configs": len(records),
        "num_measured": sum(r["status"] == "ok" for r in records),
        "num_not_measured": sum(r["status"] != "ok" for r in records),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(),
    }
    for r in records:
        label = f"{r['sketch']}/{_label(r['log2_D'], r['m'])}"
        if r["status"] == "ok":
            summary[f"time_ms/{label}"] = r["median_ms"]
            summary[f"rss_peak_mb/{label}"] = r["rss_peak_mb"]
            if "temp_mb" in r:
                summary[f"temp_mb/{label}"] = r["temp_mb"]
                summary[f"temp_D_floats/{label}"] = r["temp_D_floats"]
        else:
            summary[f"{r['status']}/{label}"] = r["reason"]
    rows = ratio_rows(records)
    for row in rows:
        for key, value in row.items():
            if key not in ("log2_D", "m"):
                summary[f"{key}/{_label(row['log2_D'], row['m'])}"] = value
    for name in sorted({r["sketch"] for r in records}):
        temps = [r["temp_D_floats"] for r in records if r["sketch"] == name and "temp_D_floats" in r]
        if temps:
            summary[f"max_temp_D_floats/{name}"] = max(temps)

    def best_at(log2_d: int, m: int) -> tuple[str, float] | None:
        row = next((r for r in rows if r["log2_D"] == log2_d and r["m"] == m), {})
        found = [(k.split("/", 1)[1], v) for k, v in row.items() if str(k).startswith("speedup_vs_dense/")]
        return max(found, key=lambda kv: kv[1]) if found else None

    goal_log2_d, m = goal_cell(config)
    measured_d = sorted({row["log2_D"] for row in rows if row["m"] == m and best_at(row["log2_D"], m)})
    if measured_d:
        name, value = best_at(measured_d[-1], m)
        summary.update({
            "best_speedup_vs_dense": value,
            "best_speedup_vs_dense/sketch": name,
            "best_speedup_vs_dense/log2_D": measured_d[-1],
            "best_speedup_vs_dense/m": m,
        })
    goal_label = _label(goal_log2_d, m)
    best = best_at(goal_log2_d, m)
    if best is None:
        summary["goal/met"] = None
        summary["goal/status"] = (
            f"not measured: dense and another sketch were not both measured at {goal_label} in this grid"
        )
    else:
        name, value = best
        met = value >= config.goal_speedup
        temp = next((r.get("temp_D_floats") for r in records if r["status"] == "ok" and r["sketch"] == name
                     and r["log2_D"] == goal_log2_d and r["m"] == m), None)
        summary.update({"goal/met": met, "goal/speedup_vs_dense": value, "goal/sketch": name})
        summary["goal/status"] = (
            f"{'met' if met else 'NOT met'}: best sketch {name} is {value:.0f}x faster than dense at {goal_label} "
            f"(goal >= {config.goal_speedup:g}x), temp memory {_fmt(temp)} D floats (a D×m matrix: {m})"
        )
    return summary


def plot(records: Sequence[Mapping], workdir) -> tuple[str, str]:
    """time_vs_D.png and memory_vs_D.png: log-log, one line per sketch, one column per m."""
    ok = [r for r in records if r["status"] == "ok"]
    names = sorted({r["sketch"] for r in records})
    m_values = sorted({r["m"] for r in records})

    def series(m, field, floor=0.0):
        out = {}
        for name in names:
            points = sorted((r["D"], r[field]) for r in ok
                            if r["sketch"] == name and r["m"] == m and field in r and r[field] > floor)
            out[name] = ([p[0] for p in points], [p[1] for p in points])
        return out

    time_row = [plots.Panel(f"m = {m}", "D (parameters)", "median time of apply (ms)", series(m, "median_ms"))
                for m in m_values]
    time_path = plots.save_panel_grid(workdir.file("time_vs_D.png"), [time_row],
                                      suptitle="Wall time of apply vs D")
    temp_row = [plots.Panel(f"m = {m}", "D (parameters)", "compiled temp memory (MB)", series(m, "temp_mb"))
                for m in m_values]
    # The RSS sampler sees whole pages and allocator chunks: rises below RSS_RESOLUTION_MB are noise,
    # not drawn (they would form an artificial floor on the log axis); ratios.md lists every value.
    rss_row = [plots.Panel(f"m = {m} (rises < {RSS_RESOLUTION_MB:g} MB not drawn)", "D (parameters)",
                           "peak RSS rise (MB)", series(m, "rss_peak_mb", floor=RSS_RESOLUTION_MB))
               for m in m_values]
    memory_path = plots.save_panel_grid(workdir.file("memory_vs_D.png"), [temp_row, rss_row],
                                        suptitle="Memory of apply vs D")
    return time_path, memory_path


# --------------------------------------------------------------------------------------- the run

def run(config, workdir) -> dict:
    """Measures the grid, writes metrics.jsonl, the plots and ratios.md, prints the tables."""
    validate_config(config)
    metrics_path = workdir.file("metrics.jsonl")
    if os.path.exists(metrics_path):  # records of an earlier run in this folder must not mix in
        os.remove(metrics_path)
    dtype = DTYPES[config.dtype]
    grid = [(k, name, m) for k in config.log2_D for name in config.sketches for m in config.m_values]
    key = jax.random.key(config.seed)
    sketch_key, input_key = jax.random.split(key)
    records: list[dict] = []
    bar = tqdm(total=len(grid), desc="bench_sketch", disable=bool(config.get("quiet", False)), dynamic_ncols=True)
    x, x_log2_d = None, None
    for step, (log2_d, name, m) in enumerate(grid):
        bar.set_postfix_str(f"{name} D=2^{log2_d} m={m}")
        template = make_template(log2_d, dtype)
        if x_log2_d != log2_d:
            x = None  # free the previous D's input before allocating this one
            x = random_tree(jax.random.fold_in(input_key, log2_d), template)
            x_log2_d = log2_d
        d = 1 << log2_d
        options = _options(config, name)
        record: dict[str, Any] = {"sketch": name, "log2_D": log2_d, "D": d, "m": m, "options": options}
        prediction = predict_call_s(name, d, m, records)
        is_goal = (log2_d, m) == goal_cell(config)  # the headline: always measured
        if config.max_call_s > 0 and not is_goal and prediction is not None and prediction[0] > config.max_call_s:
            seconds, ref = prediction
            record.update(status="skipped", predicted_call_s=seconds, reason=(
                f"one call predicted to take {seconds:.3g} s > max_call_s={config.max_call_s:g} "
                f"(extrapolated from D=2^{ref['log2_D']}, m={ref['m']}: {ref['median_ms'] / 1e3:.3g} s)"))
        else:
            try:
                record.update(measure(sketching.get(name, m, **options), sketch_key, template, x, config))
                record["status"] = "ok"
            except jax.errors.JaxRuntimeError as err:
                if not _is_out_of_memory(err):
                    raise
                record.update(status="oom", reason=f"out of memory: {str(err).splitlines()[0][:300]}")
        records.append(record)
        workdir.log(step, **record)
        bar.update(1)
    bar.close()

    time_path, memory_path = plot(records, workdir)
    title = f"Sketch benchmark ({config.dtype}, {jax.devices()[0].platform}, {os.cpu_count()} CPU cores)"
    report = format_tables(records, title)
    summary = summarize(records, config)
    report += f"\n**Goal**: {summary['goal/status']}\n"
    if "best_speedup_vs_dense" in summary:
        report += (
            f"\n**Best speed-up vs dense** at the largest D measured with m={goal_cell(config)[1]} "
            f"(D=2^{summary['best_speedup_vs_dense/log2_D']}): {summary['best_speedup_vs_dense/sketch']} "
            f"{summary['best_speedup_vs_dense']:.0f}x\n"
        )
    ratios_path = workdir.file("ratios.md")
    atomic_write_text(ratios_path, report)
    print(report)
    print(f"Plots: {time_path}\n       {memory_path}\nTables: {ratios_path}")
    return summary
