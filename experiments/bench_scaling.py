"""Scaling benchmark: examples/s of sharded per-example sketched gradients vs device count.

For each n in `config.device_counts`, a fresh subprocess (the device count is fixed when JAX starts)
runs `python -m experiments.bench_scaling --worker SPEC`:

* platform "cpu": with XLA_FLAGS=--xla_force_host_platform_device_count=n, JAX_PLATFORMS=cpu;
  platform "devices": the first n devices of the default backend (skipped when fewer exist).
* The model is a tanh MLP (d_in -> width^depth -> classes, cross-entropy) with parameters replicated
  on a 1-D mesh ("data",) of n devices; a global batch of `batch_size` examples is split over the
  mesh (`sketching.sharded.shard_batch`); the timed function is the jitted
  `sharded_sketch_per_example_gradients` program (`sketching.sharded.compiled_sharded_fn`): per-example
  gradients and their sketches Φ g_i (the `config.sketch`, m = `config.m`), each device on its slice.
* Time: `experiments.common.timing.median_time` (warm-up calls incl. compilation, then up to `repeats` timed
  calls, each ended by `block_until_ready`, within `time_budget_s`); throughput = batch_size / median.
* Check: the sharded rows are compared with the single-device `sketch_per_example_gradients` of the
  same batch (max relative error, `err_vs_single_device`), and the output sharding is recorded.

Outputs: metrics.jsonl (one record per n), scaling.md (printed), scaling.png (throughput and speed-up
vs n), summary keys `examples_per_s/n=K`, `speedup/n=K` (throughput ratio to n = 1),
`efficiency/n=K` (speed-up / K), and the same from the fastest timed step (`examples_per_s_best`,
`speedup_best`: less sensitive to other jobs on a shared machine). On CPU the forced devices share this machine's cores: the ratio is
bounded by the number of physical cores (and XLA's CPU backend already uses several threads for
one device), so it measures sharding overhead and idle-core use rather than added hardware.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Mapping, Sequence

PLATFORMS = ("cpu", "devices")


# ---------------------------------------------------------------------------------------- config

def validate_config(config) -> None:
    import sketching

    if config.platform not in PLATFORMS:
        raise ValueError(f"config.platform={config.platform!r}; allowed values: {list(PLATFORMS)}")
    counts = config.device_counts
    if (not isinstance(counts, (list, tuple)) or not counts
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
            or len(set(counts)) != len(counts)):
        raise ValueError(f"config.device_counts={counts!r}; allowed values: distinct positive ints, e.g. (1, 2, 4, 8)")
    if 1 not in counts:
        raise ValueError(f"config.device_counts={counts!r} must include 1 (the baseline of the speed-up)")
    if config.sketch not in sketching.NAMES:
        raise ValueError(f"config.sketch={config.sketch!r}; allowed values: {list(sketching.NAMES)}")
    if config.mode not in sketching.MODES:
        raise ValueError(f"config.mode={config.mode!r}; allowed values: {list(sketching.MODES)}")
    for field in ("m", "d_in", "width", "depth", "classes", "batch_size", "warmup", "repeats"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field}={value!r}; allowed values: a positive int")
    if isinstance(config.chunk_size, bool) or not isinstance(config.chunk_size, int) or config.chunk_size < 0:
        raise ValueError(f"config.chunk_size={config.chunk_size!r}; allowed values: 0 (no chunking) or a positive int")
    bad = [c for c in counts if config.batch_size % c]
    if bad:
        raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of every device count; not of {bad}")
    if not config.time_budget_s > 0 or not config.timeout_s > 0:
        raise ValueError("config.time_budget_s and config.timeout_s must be > 0")
    try:
        sketching.get(config.sketch, config.m, **dict(config.sketch_options))
    except (TypeError, ValueError) as err:
        raise ValueError(f"config.sketch_options / config.m for sketch {config.sketch!r}: {err}") from None


# ---------------------------------------------------------------------------------------- worker

def init_mlp(key, d_in: int, width: int, depth: int, classes: int, dtype=None):
    """Parameters of the benchmark's MLP: {"layer_k": {"w", "b"}} with fan-in scaling."""
    import jax
    import jax.numpy as jnp

    sizes = [d_in] + [width] * depth + [classes]
    params = {}
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer_{k}"] = {"w": jax.random.normal(sub, (a, b)) / math.sqrt(a), "b": jnp.zeros((b,))}
    return params


def mlp_loss(params, batch):
    """Mean softmax cross-entropy of the tanh MLP."""
    import jax
    import jax.numpy as jnp

    h = batch["x"]
    layers = [params[f"layer_{k}"] for k in range(len(params))]
    for layer in layers[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    z = h @ layers[-1]["w"] + layers[-1]["b"]
    return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, batch["y"][:, None], -1)[:, 0])


def worker(spec: Mapping[str, Any]) -> dict:
    """Measures one device count (runs in the subprocess); returns the record."""
    import jax
    import numpy as np

    import sketching
    from experiments.common.timing import median_time
    from sketching import sharded

    n = int(spec["num_devices"])
    available = jax.device_count()
    record: dict[str, Any] = {"num_devices": n, "platform": jax.devices()[0].platform,
                              "device_kind": jax.devices()[0].device_kind, "devices_available": available}
    if n > available:
        return {**record, "status": "skipped", "reason": f"{n} devices requested, {available} available"}
    params = init_mlp(jax.random.key(spec["seed"]), spec["d_in"], spec["width"], spec["depth"], spec["classes"])
    rng = np.random.default_rng(spec["seed"])
    batch = {"x": rng.normal(size=(spec["batch_size"], spec["d_in"])).astype(np.float32),
             "y": rng.integers(0, spec["classes"], spec["batch_size"]).astype(np.int32)}
    sketch = sketching.get(spec["sketch"], spec["m"], **spec["sketch_options"])
    state = sketch.init(jax.random.key(spec["seed"] + 1), params)
    chunk = spec["chunk_size"] or None
    mesh = sharded.make_mesh(n)
    st, p, b = sharded._on_mesh(state, mesh), sharded.replicate(params, mesh), sharded.shard_batch(batch, mesh)
    fn = sharded.compiled_sharded_fn(sketch, mlp_loss, mesh, st, p, b, mode=spec["mode"], chunk_size=chunk)
    timing = median_time(fn, st, p, b, warmup=spec["warmup"], repeats=spec["repeats"], budget_s=spec["time_budget_s"])
    rows = fn(st, p, b)
    reference = jax.jit(lambda s, q, x: sketching.sketch_per_example_gradients(
        sketch, s, mlp_loss, q, x, mode=spec["mode"], chunk_size=chunk))(state, params, batch)
    ref = np.asarray(reference, np.float64)
    err = float(np.max(np.abs(np.asarray(rows, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    return {**record, "status": "ok", "num_params": num_params, "batch_size": spec["batch_size"],
            "median_s": timing["median_s"], "min_s": timing["min_s"], "repeats": timing["repeats"],
            "first_call_s": timing["first_call_s"], "examples_per_s": spec["batch_size"] / timing["median_s"],
            "examples_per_s_best": spec["batch_size"] / timing["min_s"],
            "err_vs_single_device": err, "output_spec": str(rows.sharding.spec),
            "output_devices": len(rows.sharding.device_set)}


def _spec(config, n: int) -> dict:
    fields = ("seed", "sketch", "m", "mode", "chunk_size", "d_in", "width", "depth", "classes", "batch_size",
              "warmup", "repeats", "time_budget_s")
    return {"num_devices": n, "sketch_options": dict(config.sketch_options), **{f: config[f] for f in fields}}


def measure(config, n: int) -> dict:
    """Runs the worker for n devices in a subprocess (environment per `config.platform`)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if config.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    result = subprocess.run([sys.executable, "-m", "experiments.bench_scaling", "--worker", json.dumps(_spec(config, n))],
                            env=env, cwd=root, capture_output=True, text=True, timeout=config.timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"bench_scaling worker for {n} devices failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- report

def summarize(records: Sequence[Mapping]) -> dict:
    ok = {r["num_devices"]: r for r in records if r["status"] == "ok"}
    summary: dict[str, Any] = {}
    base = ok.get(1)
    for n, r in sorted(ok.items()):
        summary[f"examples_per_s/n={n}"] = r["examples_per_s"]
        summary[f"err_vs_single_device/n={n}"] = r["err_vs_single_device"]
        summary[f"examples_per_s_best/n={n}"] = r["examples_per_s_best"]
        if base is not None:
            summary[f"speedup/n={n}"] = r["examples_per_s"] / base["examples_per_s"]
            summary[f"efficiency/n={n}"] = summary[f"speedup/n={n}"] / n
            summary[f"speedup_best/n={n}"] = r["examples_per_s_best"] / base["examples_per_s_best"]
    for r in records:
        if r["status"] != "ok":
            summary[f"skipped/n={r['num_devices']}"] = r.get("reason", r["status"])
    if ok:
        best = max(ok, key=lambda n: ok[n]["examples_per_s"])
        summary["best/num_devices"] = best
        summary["best/speedup"] = summary.get(f"speedup/n={best}", float("nan"))
        first = next(iter(ok.values()))
        summary.update({"platform": first["platform"], "device_kind": first["device_kind"],
                        "num_params": first["num_params"], "batch_size": first["batch_size"],
                        "cpu_count": os.cpu_count()})
        summary["max_err_vs_single_device"] = max(r["err_vs_single_device"] for r in ok.values())
    return summary


def format_table(records: Sequence[Mapping], config) -> str:
    lines = [f"## Scaling of sharded per-example sketched gradients ({config.sketch}, m={config.m}, "
             f"{config.mode}; platform={config.platform}, {os.cpu_count()} CPU cores)", "",
             "| devices | examples/s (median step) | speed-up vs 1 | efficiency | examples/s (fastest step) | "
             "speed-up vs 1 (fastest) | median step (ms) | max rel. err vs 1 device |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ok = [r for r in records if r["status"] == "ok" and r["num_devices"] == 1]
    base = ok[0]["examples_per_s"] if ok else None
    base_best = ok[0].get("examples_per_s_best") if ok else None
    for r in sorted(records, key=lambda r: r["num_devices"]):
        if r["status"] != "ok":
            lines.append(f"| {r['num_devices']} | skipped: {r.get('reason', '')} | | | | | | |")
            continue
        speedup = r["examples_per_s"] / base if base else float("nan")
        best = r.get("examples_per_s_best", float("nan"))
        speedup_best = best / base_best if base_best else float("nan")
        lines.append(f"| {r['num_devices']} | {r['examples_per_s']:,.0f} | {speedup:.2f}x | "
                     f"{speedup / r['num_devices']:.0%} | {best:,.0f} | {speedup_best:.2f}x | "
                     f"{1e3 * r['median_s']:.1f} | {r['err_vs_single_device']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(records: Sequence[Mapping], workdir) -> str:
    from experiments.common import plots

    ok = sorted((r for r in records if r["status"] == "ok"), key=lambda r: r["num_devices"])
    xs = [r["num_devices"] for r in ok]
    base = next((r["examples_per_s"] for r in ok if r["num_devices"] == 1), None)
    row = [plots.Panel("Throughput", "devices", "examples / s", {"measured": (xs, [r["examples_per_s"] for r in ok])}),
           plots.Panel("Speed-up vs 1 device", "devices", "speed-up",
                       {"measured": (xs, [r["examples_per_s"] / base for r in ok] if base else [math.nan] * len(xs)),
                        "ideal": (xs, [float(x) for x in xs])})]
    return plots.save_panel_grid(workdir.file("scaling.png"), [row], suptitle="Sharded per-example sketched gradients")


def run(config, workdir) -> dict:
    from tqdm.auto import tqdm

    from experiments.common.workdir import atomic_write_text

    validate_config(config)
    metrics_path = workdir.file("metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    records = []
    counts = sorted(config.device_counts)
    for step, n in enumerate(tqdm(counts, desc="bench_scaling", disable=bool(config.get("quiet", False)))):
        record = measure(config, n)
        records.append(record)
        workdir.log(step, **record)
    summary = summarize(records)
    table = format_table(records, config)
    atomic_write_text(workdir.file("scaling.md"), table)
    print(table)
    if any(r["status"] == "ok" for r in records):
        print(f"Plot: {plot(records, workdir)}")
    return summary


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit("usage: python -m experiments.bench_scaling --worker SPEC_JSON "
                 "(use `python -m experiments.run --config configs/bench_scaling.py` to run the benchmark)")
