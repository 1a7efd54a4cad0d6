"""Krylov benchmark: `landscape` (compiled Lanczos, SLQ, Hutchinson) vs matfree on the same HVP.

Problem: a one-hidden-layer tanh MLP 64 → h → 10 on the first `num_examples` scikit-learn digits,
float64 parameters (x64 on), cross-entropy loss; h is chosen per target D so that D = 75h + 10
(D ≈ 10^3 … 10^6). The operator is the exact Hessian of the mean loss over that fixed batch
(forward-over-reverse HVP, `sketching.gradients.hvp`), the same function for both libraries:
ours through `landscape.hvp_fn` (a `LinearOperator`, parameters passed into the compiled loop),
matfree through `matvec(v_flat, params)` with the parameters as its `*params`.

Methods (both libraries: float64 recurrences, full re-orthogonalisation by two classical
Gram–Schmidt passes, the same start vector / probes):
  lanczos     `num_iters` steps → tridiagonal T → eigh (ours: landscape.lanczos, Ritz values and
              residual certificates; matfree: decomp.tridiag_sym(num_iters, reortho="full") under
              one jax.jit, eigvalsh of T on the host);
  slq         `slq_probes` × `slq_iters` (ours: landscape.slq, probes vmapped in groups; matfree:
              jax.vmap of tridiag_sym over the same Rademacher probes, under jax.jit);
  hutchinson  `hutchinson_probes` (ours: landscape.hutchinson; matfree:
              stochtrace.estimator_monte_carlo(monte_carlo_trace(), sampler_signs), under jax.jit).
Timing (a loaded shared machine: compare within a run): `first_call_s` is the first call (tracing +
compilation + one run), then `warmup − 1` untimed calls, and `median_s` the median of the timed calls
after them: at least `repeats`, and more until they add up to `min_timed_s` (a 15 ms call gets ≈ 30
samples: two samples of it moved the ratio by ±25 %), each ended by block_until_ready. For ours also `new_point_s`: a call on a new `hvp_fn` at other
parameters (same loss and shapes: must not recompile) and `new_iters_s`: a call with num_iters − 3
(same 16-row bucket: must not recompile).
Accuracy: max |θ_ours − θ_matfree| / |θ_max| over the top-10 and bottom-2 Ritz values (Lanczos),
|Δ SLQ trace| / |trace| (SLQ), the Hutchinson difference in standard errors (matfree draws its own probes); at D ≤ 2,000 also
λ_max against the dense float64 eigh of jax.hessian.

Outputs: metrics.jsonl (one record per (method, D)), table.md (printed), time_vs_D.png, and
summary.json with keys `<method>/D=<D>/<library>/{median_s,first_call_s}`, `<method>/D=<D>/speedup`
(matfree median / ours median; > 1: ours faster), accuracy keys, and `all_at_least_as_fast`.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import landscape
from experiments.common import plots
from experiments.common.config_checks import ConfigError, check_fields, integer, names_from, number
from experiments.common.data import load_digits
from experiments.common.timing import interleaved_median_times
from experiments.common.workdir import atomic_write_text
from sketching.gradients import hvp

METHODS = ("lanczos", "slq", "hutchinson")
NUM_INPUTS, NUM_CLASSES = 64, 10


def validate_config(config) -> None:
    check_fields("config", config, ("experiment", "preset", "seed", "target_dims", "num_examples", "num_iters",
                                    "slq_probes", "slq_iters", "hutchinson_probes", "methods", "repeats",
                                    "warmup", "min_timed_s", "time_budget_s", "matfree", "quiet"))
    dims = tuple(config.target_dims)
    if not dims:
        raise ConfigError("config.target_dims must name at least one D")
    for d in dims:
        integer("config.target_dims entries", d, low=max(85, config.num_iters, config.slq_iters))
    for name in ("num_examples", "num_iters", "slq_probes", "slq_iters", "hutchinson_probes", "repeats", "warmup"):
        integer(f"config.{name}", config[name])
    names_from("config.methods", tuple(config.methods), METHODS)
    number("config.time_budget_s", config.time_budget_s, low=0.0, low_open=True)
    number("config.min_timed_s", config.min_timed_s, low=0.0)


def matfree_available() -> bool:
    try:
        import matfree  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# The problem
# ----------------------------------------------------------------------------------------------

def hidden_for(target_dim: int) -> int:
    return max(1, round((target_dim - NUM_CLASSES) / (NUM_INPUTS + 1 + NUM_CLASSES)))


def init_params(key, hidden: int) -> dict:
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (NUM_INPUTS, hidden), jnp.float64) / np.sqrt(NUM_INPUTS),
            "b1": jnp.zeros((hidden,), jnp.float64),
            "w2": jax.random.normal(k2, (hidden, NUM_CLASSES), jnp.float64) / np.sqrt(hidden),
            "b2": jnp.zeros((NUM_CLASSES,), jnp.float64)}


def loss_fn(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1))


def digits_batch(num_examples: int, seed: int) -> dict:
    train = load_digits(seed)["train"]
    count = min(num_examples, len(train["y"]))
    return {"x": jnp.asarray(train["x"][:count].reshape(count, -1), jnp.float64),
            "y": jnp.asarray(train["y"][:count])}


def _flatten(tree):
    return jnp.concatenate([leaf.reshape(-1) for leaf in jax.tree_util.tree_leaves(tree)])


def _unflatten_like(template):
    leaves, treedef = jax.tree_util.tree_flatten(template)
    shapes = [leaf.shape for leaf in leaves]
    sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes])

    def unflatten(flat):
        return jax.tree_util.tree_unflatten(treedef, [flat[a:b].reshape(s) for a, b, s in zip(sizes[:-1], sizes[1:], shapes)])

    return unflatten


def matfree_fns(params, batch, config):
    """matfree's Lanczos, SLQ and Hutchinson on the same HVP, each under one jax.jit."""
    from matfree import decomp, stochtrace

    unflatten = _unflatten_like(params)

    def flat_hvp(v, p):
        return _flatten(hvp(loss_fn, p, batch, unflatten(v)))

    tridiag = decomp.tridiag_sym(config.num_iters, reortho="full", materialize=True, custom_vjp=False)
    tridiag_slq = decomp.tridiag_sym(config.slq_iters, reortho="full", materialize=True, custom_vjp=False)
    lanczos = jax.jit(lambda v0, p: tridiag(flat_hvp, v0, p).J_small)

    def slq_one(z, p):
        t = tridiag_slq(flat_hvp, z, p).J_small
        values, vectors = jnp.linalg.eigh(t)
        return values, vectors[0] ** 2

    slq = jax.jit(lambda probes, p: jax.vmap(lambda z: slq_one(z, p))(probes))
    sampler = stochtrace.sampler_signs(_flatten(params), num=config.hutchinson_probes)
    estimate = stochtrace.estimator_monte_carlo(stochtrace.monte_carlo_trace(), sampler)
    hutchinson = jax.jit(lambda key, p: estimate(flat_hvp, key, p))
    return lanczos, slq, hutchinson


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

def _timed(ours, theirs, config) -> tuple[dict, object, dict | None, object]:
    """(ours' stats, ours' result, matfree's stats, matfree's result); with matfree (`theirs` not None)
    the two are timed interleaved, call after call, so that drifting machine speed hits both alike."""
    fns = {"ours": ours} if theirs is None else {"ours": ours, "matfree": theirs}
    stats = interleaved_median_times(fns, warmup=config.warmup, repeats=config.repeats,
                                     budget_s=config.time_budget_s, min_timed_s=config.min_timed_s)
    if theirs is None:
        return stats["ours"], ours(), None, None
    return stats["ours"], ours(), stats["matfree"], theirs()


def _block(result):
    """What `median_time` waits on for our results (host NumPy arrays are already complete)."""
    return result.basis if isinstance(result, landscape.KrylovResult) else 0


def measure_dimension(target_dim: int, config, use_matfree: bool) -> list[dict]:
    hidden = hidden_for(target_dim)
    key = jax.random.key(config.seed)
    params = init_params(key, hidden)
    batch = digits_batch(config.num_examples, config.seed)
    dim = int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))
    operator = landscape.hvp_fn(loss_fn, params, [batch])
    layout_unflatten = _unflatten_like(params)
    start_flat = jax.random.rademacher(jax.random.fold_in(key, 1), (dim,), jnp.float64)
    start = layout_unflatten(start_flat)
    mf = matfree_fns(params, batch, config) if use_matfree else None
    records = []
    base = {"D": dim, "hidden": hidden}

    if "lanczos" in config.methods:
        k = config.num_iters
        mf_lanczos = None if mf is None else (lambda: mf[0](start_flat, params))
        ours_stats, ours, mf_stats, t = _timed(
            lambda: _block_ritz(landscape.lanczos(operator, params, k, key, start=start)), mf_lanczos, config)
        record = {**base, "method": "lanczos", "num_iters": k, "ours": ours_stats,
                  "ours_top": ours.eigenvalues[:10].tolist(),
                  "ours_max_residual_top10": float(np.max(ours.residual_norms[:10]))}
        shifted = jax.tree_util.tree_map(lambda a: a * 1.01, params)
        other = landscape.hvp_fn(loss_fn, shifted, [batch])
        t0 = time.perf_counter()
        _block_ritz(landscape.lanczos(other, shifted, k, key, start=start))
        record["ours_new_point_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _block_ritz(landscape.lanczos(operator, params, max(1, k - 3), key, start=start))
        record["ours_new_iters_s"] = time.perf_counter() - t0
        if mf is not None:
            values = np.sort(np.linalg.eigvalsh(np.asarray(t, np.float64)))[::-1]
            record["matfree"] = mf_stats
            scale = abs(ours.eigenvalues[0])
            diff = max(np.max(np.abs(values[:10] - ours.eigenvalues[:10])),
                       np.max(np.abs(values[-2:] - ours.eigenvalues[-2:])))
            record["max_rel_diff_vs_matfree"] = float(diff / scale)
        if dim <= 2000:
            flat_params = _flatten(params)
            dense = jax.hessian(lambda f: loss_fn(layout_unflatten(f), batch))(flat_params)
            exact = np.sort(np.linalg.eigvalsh(np.asarray(dense)))[::-1]
            record["ours_lambda_max_rel_err_vs_dense"] = float(abs(ours.eigenvalues[0] - exact[0]) / abs(exact[0]))
        records.append(record)

    if "slq" in config.methods:
        p, k = config.slq_probes, config.slq_iters
        probes = landscape.probe_vectors(key, p, dim)
        mf_slq = None if mf is None else (lambda: mf[1](probes, params))
        ours_stats, density, mf_stats, mf_out = _timed(lambda: landscape.slq(operator, params, k, p, key), mf_slq, config)
        record = {**base, "method": "slq", "num_iters": k, "probes": p, "ours": ours_stats,
                  "ours_trace": density.trace()}
        if mf is not None:
            nodes, weights = mf_out
            mf_trace = dim * float(np.mean(np.sum(np.asarray(nodes) * np.asarray(weights), axis=1)))
            record["matfree"] = mf_stats
            record["matfree_trace"] = mf_trace
            record["rel_diff_vs_matfree"] = abs(mf_trace - density.trace()) / abs(density.trace())
        records.append(record)

    if "hutchinson" in config.methods:
        p = config.hutchinson_probes
        mf_hutchinson = None if mf is None else (lambda: mf[2](key, params))
        ours_stats, estimate, mf_stats, value = _timed(lambda: landscape.hutchinson(operator, params, p, key),
                                                       mf_hutchinson, config)
        record = {**base, "method": "hutchinson", "probes": p, "ours": ours_stats, "ours_trace": estimate.mean,
                  "ours_stderr": estimate.stderr}
        if mf is not None:
            record["matfree"] = mf_stats
            record["matfree_trace"] = float(value)
            # Different Rademacher draws (matfree samples its own): agreement within the standard errors.
            record["diff_in_stderr"] = abs(float(value) - estimate.mean) / max(estimate.stderr, 1e-300)
        records.append(record)
    return records


def _flat_record(record: dict) -> dict:
    """metrics.jsonl keeps numbers: `<method>/<field>` and `<method>/<library>/<timing>` keys."""
    method = record["method"]
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            for inner, number in value.items():
                flat[f"{method}/{key}/{inner}"] = number
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{method}/{key}"] = value
    return flat


def _block_ritz(result):
    jax.block_until_ready(result.basis)
    return result


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _table(records: list[dict], use_matfree: bool) -> str:
    lines = ["| method | D | ours median (s) | ours first call (s) | matfree median (s) | matfree first call (s) "
             "| speed-up (matfree/ours) | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        mf = r.get("matfree")
        accuracy = (f"max rel diff {r['max_rel_diff_vs_matfree']:.1e}" if "max_rel_diff_vs_matfree" in r
                    else f"trace rel diff {r['rel_diff_vs_matfree']:.1e}" if "rel_diff_vs_matfree" in r
                    else f"|Δ|/SE {r['diff_in_stderr']:.2f}" if "diff_in_stderr" in r else "–")
        speed = f"{mf['median_s'] / r['ours']['median_s']:.2f}" if mf else "–"
        lines.append(f"| {r['method']} | {r['D']:,} | {r['ours']['median_s']:.4f} | {r['ours']['first_call_s']:.2f} | "
                     + (f"{mf['median_s']:.4f} | {mf['first_call_s']:.2f} | " if mf else "skipped | skipped | ")
                     + f"{speed} | {accuracy} |")
    if not use_matfree:
        lines.append("\nmatfree is not installed (`pip install -e .[bench]`): its columns are skipped.")
    return "\n".join(lines) + "\n"


def run(config, workdir) -> dict:
    use_matfree = bool(config.matfree) and matfree_available()
    summary = {"matfree_available": matfree_available(), "matfree_used": use_matfree}
    records = []
    with jax.enable_x64(True):
        for target in config.target_dims:
            for record in measure_dimension(int(target), config, use_matfree):
                workdir.log(record["D"], **_flat_record(record))
                records.append(record)
                if not config.get("quiet", False):
                    print(f"[bench_lanczos] {record['method']} D={record['D']}: ours {record['ours']['median_s']:.4f} s"
                          + (f", matfree {record['matfree']['median_s']:.4f} s" if "matfree" in record else ""), flush=True)
    speedups = []
    for r in records:
        prefix = f"{r['method']}/D={r['D']}"
        summary[f"{prefix}/ours/median_s"] = r["ours"]["median_s"]
        summary[f"{prefix}/ours/first_call_s"] = r["ours"]["first_call_s"]
        for name in ("ours_new_point_s", "ours_new_iters_s", "max_rel_diff_vs_matfree", "rel_diff_vs_matfree",
                     "diff_in_stderr", "ours_lambda_max_rel_err_vs_dense", "ours_max_residual_top10"):
            if name in r:
                summary[f"{prefix}/{name}"] = r[name]
        if "matfree" in r:
            summary[f"{prefix}/matfree/median_s"] = r["matfree"]["median_s"]
            summary[f"{prefix}/matfree/first_call_s"] = r["matfree"]["first_call_s"]
            speedups.append(r["matfree"]["median_s"] / r["ours"]["median_s"])
            summary[f"{prefix}/speedup"] = speedups[-1]
    if speedups:
        summary["min_speedup"] = float(min(speedups))
        summary["all_at_least_as_fast"] = bool(min(speedups) >= 1.0)
    table = _table(records, use_matfree)
    atomic_write_text(workdir.file("table.md"), table)
    if not config.get("quiet", False):
        print(table, flush=True)
    panels = []
    for method in config.methods:
        rows = [r for r in records if r["method"] == method]
        series = {"landscape (ours)": ([r["D"] for r in rows], [r["ours"]["median_s"] for r in rows])}
        if use_matfree:
            series["matfree"] = ([r["D"] for r in rows], [r["matfree"]["median_s"] for r in rows])
        panels.append(plots.Panel(f"{method} (after compilation)", "parameters D", "seconds per call", series,
                                  xscale_base=10))
    plots.save_panel_grid(workdir.file("time_vs_D.png"), [panels],
                          suptitle="landscape vs matfree on the same HVP (float64, full re-orthogonalisation)")
    return summary
