"""Intrinsic dimension by random-subspace training through any sketch (Li et al. 2018; Aghajanyan et al. 2021).

Subspace training [Li et al. 2018; Aghajanyan et al. 2021]: only z ∈ R^d is trained, in

    θ(z) = θ0 + P z,   P = √(d / D) · Φᵀ,   z0 = 0,

with Φ: R^D → R^d any sketch of `sketching/` (`transpose` gives Φᵀ). Φ is JL-normalised
(E ΦᵀΦ = I_D, so ΦΦᵀ ≈ (D/d) I_d) and the factor √(d/D) makes each column of P a roughly unit-norm
direction in parameter space, as the intrinsic-dimension papers normalise P; the sketch
state regenerates its O(D) tables from the key, so the extra memory is O(d + √D), never D × d.
The gradient w.r.t. z is ∇_z L = √(d/D) · Φ ∇_θ L — autodiff through the sketch's transpose, whose
FWHT / Kronecker blocks are plain matmuls, so the 1/√L backward-scaling bug of the
Aghajanyan-lineage code cannot occur (tests check the gradient against Φ∇θL and finite differences).

d90: the smallest d whose subspace-trained metric reaches 90% of the full-training metric. Two
searches, both resumable from a JSON results file in which each trained (d, seed) is recorded once
(`DimensionSearchLog`), over a caller-supplied `train_at(d, seed) -> metric`:
  * `doubling_search` — the multi-run procedure: d = d0,
    2 d0, 4 d0, … until the metric (median over seeds) reaches the target, which brackets d90 in
    [d/2, d]; then bisection in log2 space inside the bracket until d_hi / d_lo ≤ `ratio`.
  * `binary_search` — plain integer bisection on [lo, hi] (the metric assumed monotone in d).
Both return a `SearchResult` with d90 (the upper end of the final bracket), the bracket and every
point trained. d values a sketch cannot take (AFJL needs a power of two dividing its padded length)
are moved to the next accepted one by `accepted_dimension`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import artifacts
import sketching
from landscape.lanczos import check_positive_int
from sketching.gradients import add_to_params

PyTree = Any
TARGET_FRACTION = 0.9


# ----------------------------------------------------------------------------------------------
# Subspace parameterisation and training
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subspace:
    """θ(z) = θ0 + √(d/D) Φᵀ z for one sketch Φ of dimension d (the state holds only O(d + √D) tables)."""

    sketch: sketching.Sketch
    state: sketching.SketchState
    theta0: PyTree
    scale: float

    @property
    def dimension(self) -> int:
        return self.sketch.m

    def params(self, z: jax.Array) -> PyTree:
        return self.params_at(self.theta0, self.state, z)

    def params_at(self, theta0: PyTree, state: sketching.SketchState, z: jax.Array) -> PyTree:
        """θ0 + √(d/D) Φᵀ z with θ0 and the sketch state passed explicitly (as jit arguments, so that
        XLA never constant-folds a D-sized θ0 or stored sketch tables closed over by a jitted step)."""
        offset = self.sketch.transpose(state, self.scale * z)
        offset = jax.tree_util.tree_map(lambda o, t: o.astype(t.dtype), offset, theta0)
        return add_to_params(theta0, offset)

    def gradient_at(self, state: sketching.SketchState, grad_theta: PyTree) -> jax.Array:
        """∇_z L = √(d/D) Φ ∇_θ L: the explicit form of the gradient w.r.t. z (paper eq. 5)."""
        return self.scale * self.sketch.apply(state, grad_theta)

    def zeros(self) -> jax.Array:
        return jnp.zeros((self.dimension,), self.state.layout.compute_dtype)


def make_subspace(name: str, d: int, theta0: PyTree, key: jax.Array, **options) -> Subspace:
    """The subspace of dimension d through sketch `name` (any of sketching.NAMES) at θ0."""
    d = check_positive_int("d", d)
    sketch = sketching.get(name, d, **options)
    state = sketch.init(key, theta0)
    num_params = state.layout.size
    return Subspace(sketch, state, theta0, math.sqrt(d / num_params))


def accepted_dimension(name: str, d: int, template: PyTree, **options) -> int:
    """d if sketch `name` accepts it for this template; else the next power of two above d that it
    accepts (at most D), else the largest accepted power of two below d."""
    num_params = sketching.Layout.from_template(template).size
    above = [1 << j for j in range(int(d).bit_length(), num_params.bit_length() + 1) if (1 << j) <= num_params]
    below = [1 << j for j in range(int(d).bit_length() - 1, -1, -1) if (1 << j) < d]
    for candidate in [int(d)] + above + below:
        try:
            sketching.get(name, candidate, **options).init(jax.random.key(0), template)
            return candidate
        except ValueError:
            continue
    raise ValueError(f"sketch {name!r} accepts no dimension near d={d} for a template with D={num_params}")


@dataclasses.dataclass(frozen=True)
class SubspaceRun:
    z: jax.Array
    metric: float
    final_loss: float
    seconds_per_step: float


def train_subspace(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    subspace: Subspace,
    optimizer: optax.GradientTransformation,
    batch_at: Callable[[int], Any],
    num_steps: int,
    metric_fn: Callable[[PyTree], float],
    mode: str = "explicit",
) -> SubspaceRun:
    """Minimises z ↦ loss_fn(θ0 + P z, batch) from z = 0 for `num_steps` optax steps; only z is
    updated (`mode`: see `masked_step_fn`). Returns z, metric_fn(θ(z)), the last loss and the median
    wall time per step."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    step = masked_step_fn(loss_fn, subspace, optimizer, mode=mode)
    params_fn = jitted_params(subspace)
    full = jnp.asarray(subspace.dimension, jnp.int32)  # nothing masked

    z = subspace.zeros()
    opt_state = optimizer.init(z)
    times, loss = [], jnp.nan
    for i in range(num_steps):
        start = time.perf_counter()
        z, opt_state, loss = step(z, opt_state, batch_at(i), full)
        loss = jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    steady = times[1:] if len(times) > 1 else times  # the first step includes compilation
    return SubspaceRun(z, float(metric_fn(params_fn(z))), float(loss), float(np.median(steady)))


# ----------------------------------------------------------------------------------------------
# Resumable searches for d90
# ----------------------------------------------------------------------------------------------

class DimensionSearchLog:
    """A JSON file {"points": {"<d>/<seed>": metric}, "seconds": {"<d>/<seed>": training wall time},
    "fingerprint": {...}} written atomically after every trained point, so an interrupted search resumes without retraining anything it has recorded.

    `fingerprint` (a JSON-able mapping of everything that determines train_at's metric: task, sketch,
    steps per d, learning rate, …) is stored in the log and compared on every reopening: a log made
    with other settings, or one that records none, raises `artifacts.FingerprintMismatchError` naming
    the differing fields instead of silently supplying stale metrics (e.g. after the number of training
    steps per d changed). Without a fingerprint nothing is checked."""

    def __init__(self, path: str | None, fingerprint: dict | None = None):
        self.path = path
        self.fingerprint = None if fingerprint is None else artifacts.normalise(fingerprint)
        self.points: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        if path is not None and os.path.exists(path):
            stored = artifacts.read_json(path)
            if self.fingerprint is not None:
                artifacts.check_fields(path, stored.get("fingerprint"), self.fingerprint, what="d90 search log")
            self.points = {k: float(v) for k, v in stored["points"].items()}
            self.seconds = {k: float(v) for k, v in stored.get("seconds", {}).items() if v is not None}

    def get(self, d: int, seed: int) -> float | None:
        return self.points.get(f"{d}/{seed}")

    def seconds_of(self, d: int, seed: int) -> float:
        """The recorded training wall time of (d, seed), NaN if the log has none."""
        return self.seconds.get(f"{d}/{seed}", float("nan"))

    def record(self, d: int, seed: int, metric: float, seconds: float | None = None) -> None:
        self.points[f"{d}/{seed}"] = float(metric)
        if seconds is not None:
            self.seconds[f"{d}/{seed}"] = float(seconds)
        if self.path is None:
            return
        record = {"points": self.points, "seconds": self.seconds}
        if self.fingerprint is not None:
            record["fingerprint"] = self.fingerprint
        artifacts.atomic_write_json(self.path, record, nonfinite="flag")


@dataclasses.dataclass(frozen=True)
class SearchResult:
    d90: int | None              # None when the target was not reached below d_max
    bracket: tuple[int, int]     # (largest d below target, smallest d at/above target) seen
    target: float
    points: dict[int, float]     # d → median metric over seeds
    num_trained: int             # points trained in this call (not read from the log)
    num_runs: int = 0            # (d, seed) trainings the search used, trained now or read from the log
    seconds: float = float("nan")  # their total training wall time (NaN if a log entry has none)


def _validate_search(target_metric, seeds) -> None:
    if target_metric is None or not np.isfinite(target_metric):
        raise ValueError(f"target_metric must be a finite number (90% of the full-training metric), got {target_metric!r}")
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence of ints")


class _Evaluator:
    """train_at(d, seed) behind the log: the median metric over seeds, each point trained once."""

    def __init__(self, train_at, seeds, log: DimensionSearchLog, adjust: Callable[[int], int]):
        self.train_at, self.seeds, self.log, self.adjust = train_at, tuple(seeds), log, adjust
        self.points: dict[int, float] = {}
        self.trained = 0
        self.used: set[tuple[int, int]] = set()

    @property
    def seconds(self) -> float:
        return float(sum(self.log.seconds_of(d, seed) for d, seed in self.used))

    def __call__(self, d: int) -> tuple[int, float]:
        d = self.adjust(int(d))
        values = []
        for seed in self.seeds:
            value = self.log.get(d, seed)
            if value is None:
                start = time.perf_counter()
                value = float(self.train_at(d, seed))
                self.trained += 1
                self.log.record(d, seed, value, seconds=time.perf_counter() - start)
            self.used.add((d, seed))
            values.append(value)
        self.points[d] = float(np.median(values))
        return d, self.points[d]


def doubling_search(
    train_at: Callable[[int, int], float],
    target_metric: float,
    *,
    d0: int = 16,
    d_max: int,
    seeds=(0,),
    ratio: float = 1.1,
    log_path: str | None = None,
    adjust: Callable[[int], int] = lambda d: d,
    fingerprint: dict | None = None,
) -> SearchResult:
    """The paper's search (doubling, then log-space bisection of the bracket; module docstring).
    `fingerprint`: see `DimensionSearchLog` (a log made with other settings is refused)."""
    _validate_search(target_metric, seeds)
    if not (isinstance(d0, int) and 1 <= d0 <= d_max):
        raise ValueError(f"d0 must be an int in [1, d_max={d_max}], got {d0!r}")
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1, got {ratio!r}")
    evaluate = _Evaluator(train_at, seeds, DimensionSearchLog(log_path, fingerprint), adjust)
    low, high, d = 0, None, d0
    while d <= d_max:
        d, metric = evaluate(d)
        if metric >= target_metric:
            high = d
            break
        low, d = d, 2 * d
    if high is None:
        return SearchResult(None, (low, d_max), target_metric, evaluate.points, evaluate.trained,
                        len(evaluate.used), evaluate.seconds)
    while low > 0 and high / low > ratio:
        middle = int(round(math.sqrt(low * high)))
        if middle <= low or middle >= high:
            break
        middle, metric = evaluate(middle)
        if middle >= high:
            break
        if metric >= target_metric:
            high = middle
        else:
            low = middle
    return SearchResult(high, (low, high), target_metric, evaluate.points, evaluate.trained,
                        len(evaluate.used), evaluate.seconds)


def binary_search(
    train_at: Callable[[int, int], float],
    target_metric: float,
    *,
    lo: int,
    hi: int,
    seeds=(0,),
    log_path: str | None = None,
    adjust: Callable[[int], int] = lambda d: d,
    fingerprint: dict | None = None,
) -> SearchResult:
    """Plain bisection on integers: the smallest d in (lo, hi] with metric ≥ target, assuming hi reaches it.
    `fingerprint`: see `DimensionSearchLog`."""
    _validate_search(target_metric, seeds)
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
        raise ValueError(f"need ints 0 <= lo < hi, got lo={lo!r}, hi={hi!r}")
    evaluate = _Evaluator(train_at, seeds, DimensionSearchLog(log_path, fingerprint), adjust)
    hi, metric = evaluate(hi)
    if metric < target_metric:
        return SearchResult(None, (lo, hi), target_metric, evaluate.points, evaluate.trained,
                        len(evaluate.used), evaluate.seconds)
    while hi - lo > 1:
        middle, metric = evaluate((lo + hi) // 2)
        if middle >= hi:
            break
        if metric >= target_metric:
            hi = middle
        else:
            lo = middle
    return SearchResult(hi, (lo, hi), target_metric, evaluate.points, evaluate.trained,
                        len(evaluate.used), evaluate.seconds)


# ----------------------------------------------------------------------------------------------
# The paper's single-run search (Schioppa 2024, Sec. 4 and App. B.5 Listing 9)
# ----------------------------------------------------------------------------------------------

def coordinate_mask(d: jax.Array | int, size: int, dtype=jnp.float32) -> jax.Array:
    """1 on coordinates 0…d−1 of a `size`-vector and 0 on d…size−1 (d may be traced)."""
    return (jnp.arange(size) < d).astype(dtype)


STEP_MODES = ("explicit", "implicit")


def jitted_params(subspace: Subspace) -> Callable[[jax.Array], PyTree]:
    """z ↦ θ(z), compiled once (θ0 and the sketch state as arguments)."""
    core = jax.jit(subspace.params_at)
    return lambda z: core(subspace.theta0, subspace.state, z)


def masked_step_fn(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    subspace: Subspace,
    optimizer: optax.GradientTransformation,
    mode: str = "explicit",
) -> Callable:
    """A jitted step (z, opt_state, batch, d) -> (z, opt_state, loss) of the masked subspace training:

        g = M_d ∇_z L(θ0 + √(D_max/D) Φᵀ z),   (u, s) = optimizer.update(g, s, z),   z ← z + M_d u,

    with M_d = diag(1_{j<d}). Zeroing the gradient above d is the paper's rule (Listing 9); masking the
    update as well keeps the frozen coordinates exactly unchanged for any optax optimiser (weight decay,
    momentum). d is a traced argument, so doubling d never recompiles.

    mode "explicit" (default): θ = θ0 + √(D_max/D)Φᵀz, (L, ∇θL) by one backward pass of the model, then
    ∇zL = √(D_max/D) Φ ∇θL with the sketch's own `apply` (paper eq. 5): one Φᵀ and one Φ per step.
    "implicit": autodiff of z ↦ L(θ(z)) through Φᵀ (paper eq. 4); the same gradient (tested), but on
    CPU XLA compiles the fused backward of a 22M-parameter model through Φᵀ far worse (measured 14× (AFJL)
    and 25× (QK) slower per step for MiniLM at d = 2^16). θ0 and the sketch state are jit arguments,
    not closure constants."""
    if mode not in STEP_MODES:
        raise ValueError(f"mode={mode!r}; allowed values: {list(STEP_MODES)}")

    @jax.jit
    def core(theta0, state, z, opt_state, batch, d):
        if mode == "explicit":
            loss, grad_theta = jax.value_and_grad(loss_fn)(subspace.params_at(theta0, state, z), batch)
            grad = subspace.gradient_at(state, grad_theta).astype(z.dtype)
        else:
            loss, grad = jax.value_and_grad(lambda w: loss_fn(subspace.params_at(theta0, state, w), batch))(z)
        mask = coordinate_mask(d, z.shape[0], z.dtype)
        updates, opt_state = optimizer.update(grad * mask, opt_state, z)
        updates = jax.tree_util.tree_map(lambda u: u * mask.astype(u.dtype), updates)
        return optax.apply_updates(z, updates), opt_state, loss

    def step(z, opt_state, batch, d):
        return core(subspace.theta0, subspace.state, z, opt_state, batch, d)

    return step


def next_dimension(d: int, metric: float, previous: float, target: float, delta: float, d_max: int) -> tuple[str, int]:
    """One decision of Listing 9 after an interval of c steps: ("found", d) if metric ≥ target;
    else if metric − previous < δ ("double", min(2d, d_max)), or ("exhausted", d) when d = d_max
    already; else ("continue", d)."""
    if metric >= target:
        return "found", d
    if metric - previous < delta:
        if d >= d_max:
            return "exhausted", d
        return "double", min(2 * d, d_max)
    return "continue", d


@dataclasses.dataclass(frozen=True)
class SingleRunResult:
    """Outcome of `single_run_search`.

    d_star        D* (the d at which the target was first reached), None if it was not within the budget
    status        "found" | "exhausted" (d = d_max stopped improving) | "budget" (max_steps reached)
    target        τ90, the target metric
    num_steps     optimiser steps of the whole search (including those done before a resume)
    history       one record per evaluation: {"step", "d", "metric", "loss"} (step 0: θ0, loss None)
    schedule      [(step, d)]: the step from which each d was trained
    z             the final D_max-vector (coordinates ≥ the final d are exactly 0)
    resumed_from  the step the run resumed from (0: it started fresh)
    seconds       wall time of this call (not of earlier, interrupted calls)
    seconds_total wall time of the whole search, interrupted calls included (up to their last checkpoint)
    seconds_per_step  median wall time per optimiser step in this call (first step, with compilation, excluded)
    """

    d_star: int | None
    status: str
    target: float
    num_steps: int
    history: list
    schedule: list
    z: jax.Array
    resumed_from: int
    seconds: float
    seconds_per_step: float
    seconds_total: float


class _Checkpoint:
    """One .npz file holding z, the optimiser-state leaves and a strict-JSON header (d, step, τ_old,
    history, schedule, fingerprint), replaced atomically (`artifacts.atomic_write_npz`); read back with
    allow_pickle=False. A checkpoint whose fingerprint differs raises FingerprintMismatchError."""

    def __init__(self, path: str | None, fingerprint: dict):
        self.path, self.fingerprint = path, artifacts.normalise(fingerprint)

    def save(self, z, opt_state, header: dict) -> None:
        if self.path is None:
            return
        leaves = jax.tree_util.tree_leaves(opt_state)
        arrays = {"z": np.asarray(z)}
        arrays.update({f"opt_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        header = dict(header, fingerprint=self.fingerprint, num_opt_leaves=len(leaves))
        arrays["header"] = np.frombuffer(artifacts.dumps(header, indent=None).encode("utf-8"), np.uint8)
        artifacts.atomic_write_npz(self.path, arrays)

    def load(self, z_template, opt_template):
        """(z, opt_state, header), or None when there is no checkpoint yet."""
        if self.path is None or not os.path.exists(self.path):
            return None
        with np.load(self.path, allow_pickle=False) as data:
            header = artifacts.loads(bytes(data["header"]).decode("utf-8"), what=f"checkpoint header of {self.path}")
            artifacts.check_fields(self.path, header.get("fingerprint"), self.fingerprint,
                                   what="single-run search checkpoint")
            leaves, treedef = jax.tree_util.tree_flatten(opt_template)
            restored = [np.asarray(data[f"opt_{i}"]) for i in range(header["num_opt_leaves"])]
            if (data["z"].shape != z_template.shape or len(restored) != len(leaves)
                    or any(r.shape != leaf.shape for r, leaf in zip(restored, leaves))):
                raise ValueError(f"the checkpoint at {self.path} does not fit this optimiser's state "
                                 "(another optimiser with the same fingerprint?); delete it to restart")
            z = jnp.asarray(data["z"], z_template.dtype)
            restored = [jnp.asarray(r, leaf.dtype) for r, leaf in zip(restored, leaves)]
        return z, jax.tree_util.tree_unflatten(treedef, restored), header


def single_run_search(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    subspace: Subspace,
    optimizer: optax.GradientTransformation,
    batch_at: Callable[[int], Any],
    metric_fn: Callable[[PyTree], float],
    target_metric: float,
    *,
    d_min: int,
    interval: int,
    delta: float,
    max_steps: int | None = None,
    checkpoint_path: str | None = None,
    checkpoint_every: int | None = None,
    fingerprint: dict | None = None,
    quiet: bool = True,
    mode: str = "explicit",
) -> SingleRunResult:
    """The paper's intrinsic-dimension search inside ONE training run (Schioppa 2024, Sec. 4 and
    App. B.5 Listing 9), for any sketch.

    One fixed D_max-dimensional subspace (`subspace`, D_max = subspace.dimension):

        θ(z) = θ0 + √(D_max/D) Φᵀ z,   z ∈ R^{D_max},   z0 = 0,

    trained with the gradient (and update) of coordinates d…D_max−1 zeroed (`masked_step_fn`):
      1. d = d_min, τ_old = metric(θ0) (metrics are maximised: pass −loss for a loss);
      2. train c = `interval` steps; τ_new = metric(θ(z));
      3. τ_new ≥ τ90 (`target_metric`): return D* = d;
      4. otherwise, if τ_new − τ_old < δ: d ← 2d (capped at D_max; stop if d was D_max already);
      5. τ_old ← τ_new and go to 2.
    Training continues across doublings with the same Φ and z: the trained coordinates keep their
    values and the newly unmasked ones start at 0; only masking is involved, so no nested sketch is
    needed. D* is within a factor 2 of the intrinsic dimension; `verification_run` trains at D*/2 to
    check it stays below τ90. The columns of √(D_max/D) Φᵀ have unit norm on average, so a
    coordinate's scale does not depend on D_max (the intrinsic-dimension papers' normalisation).

    `batch_at(step)` must be deterministic in the step. With `checkpoint_path` the state (z, optimiser
    state, d, τ_old, step, history) is written atomically to one .npz (no pickle) every
    `checkpoint_every` steps (default: every interval); a rerun with the same `fingerprint` (a JSON-able
    dict naming everything that determines the run: task, optimiser, learning rate, …; the search's own
    arguments are added) resumes from it and reproduces the uninterrupted run; a checkpoint with another
    fingerprint raises `artifacts.FingerprintMismatchError` naming the differing fields (never resumed).
    `max_steps` bounds the total optimiser steps (status "budget" when reached without D*). `mode`:
    how ∇_z L is computed (`masked_step_fn`).
    """
    d_max = subspace.dimension
    d_min = check_positive_int("d_min", d_min)
    if d_min > d_max:
        raise ValueError(f"d_min must be <= the subspace dimension D_max={d_max}, got {d_min}")
    interval = check_positive_int("interval", interval)
    if max_steps is not None:
        max_steps = check_positive_int("max_steps", max_steps)
    checkpoint_every = interval if checkpoint_every is None else check_positive_int("checkpoint_every", checkpoint_every)
    if target_metric is None or not np.isfinite(target_metric):
        raise ValueError(f"target_metric must be a finite number (τ90), got {target_metric!r}")
    if delta is None or not np.isfinite(delta):
        raise ValueError(f"delta must be a finite number (the minimal improvement per interval), got {delta!r}")
    identity = {"search": "single_run", "sketch": subspace.sketch.name, "d_max": d_max, "d_min": d_min,
                "num_params": int(subspace.state.layout.size), "interval": interval, "delta": float(delta),
                "target": float(target_metric)}  # not max_steps: a larger budget continues a run
    checkpoint = _Checkpoint(checkpoint_path, {**(fingerprint or {}), **identity})

    step_fn = masked_step_fn(loss_fn, subspace, optimizer, mode=mode)
    params_fn = jitted_params(subspace)
    z = subspace.zeros()
    opt_state = optimizer.init(z)
    restored = checkpoint.load(z, opt_state)
    if restored is None:
        d, step, status = d_min, 0, None
        previous = float(metric_fn(params_fn(z)))
        history = [{"step": 0, "d": d, "metric": previous, "loss": None}]
        schedule = [(0, d)]
        seconds_before = 0.0
    else:
        z, opt_state, header = restored
        d, step, previous, status = header["d"], header["step"], header["previous"], header["status"]
        if status == "budget":
            status = None  # re-checked against this call's max_steps
        history, schedule = header["history"], [tuple(s) for s in header["schedule"]]
        seconds_before = float(header["seconds_total"])
    resumed_from = step

    start, times, losses = time.perf_counter(), [], []

    def header():
        return {"d": d, "step": step, "previous": previous, "status": status, "history": history,
                "schedule": [list(s) for s in schedule], "seconds_total": seconds_before + time.perf_counter() - start}

    bar = None
    if not quiet:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_steps, initial=step, desc=f"single-run search ({subspace.sketch.name})")
    while status is None:
        if max_steps is not None and step >= max_steps:
            status = "budget"
            break
        t0 = time.perf_counter()
        z, opt_state, loss = step_fn(z, opt_state, batch_at(step), jnp.asarray(d, jnp.int32))
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(d=d)
        if step % interval == 0:
            metric = float(metric_fn(params_fn(z)))
            if not np.isfinite(metric):
                raise FloatingPointError(f"the metric is {metric} at step {step} (d = {d}): training diverged; "
                                         "lower the learning rate")
            history.append({"step": step, "d": d, "metric": metric,
                            "loss": float(np.mean(losses[-interval:])) if losses else None})
            decision, new_d = next_dimension(d, metric, previous, target_metric, delta, d_max)
            if decision in ("found", "exhausted"):
                status = decision
            elif decision == "double":
                d = new_d
                schedule.append((step, d))
            previous = metric
        if step % checkpoint_every == 0 or status is not None:
            checkpoint.save(z, opt_state, header())
    if bar is not None:
        bar.close()
    if status == "budget":
        checkpoint.save(z, opt_state, header())
    steady = times[1:] if len(times) > 1 else times
    return SingleRunResult(
        d_star=d if status == "found" else None, status=status, target=float(target_metric), num_steps=step,
        history=history, schedule=schedule, z=z, resumed_from=resumed_from, seconds=time.perf_counter() - start,
        seconds_per_step=float(np.median(steady)) if steady else float("nan"),
        seconds_total=seconds_before + time.perf_counter() - start)


def verification_run(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    subspace: Subspace,
    optimizer: optax.GradientTransformation,
    batch_at: Callable[[int], Any],
    metric_fn: Callable[[PyTree], float],
    d: int,
    num_steps: int,
    mode: str = "explicit",
) -> SubspaceRun:
    """The paper's check of D*: train from z = 0 in the same D_max-dimensional subspace with only the
    first d = D*/2 coordinates trainable (fixed mask) for `num_steps` steps; D* is confirmed when the
    returned metric stays below τ90 (Schioppa 2024, Sec. 4)."""
    d = check_positive_int("d", d)
    num_steps = check_positive_int("num_steps", num_steps)
    if d > subspace.dimension:
        raise ValueError(f"d must be <= the subspace dimension {subspace.dimension}, got {d}")
    step_fn = masked_step_fn(loss_fn, subspace, optimizer, mode=mode)
    params_fn = jitted_params(subspace)
    z = subspace.zeros()
    opt_state = optimizer.init(z)
    times, loss = [], jnp.nan
    for i in range(num_steps):
        t0 = time.perf_counter()
        z, opt_state, loss = step_fn(z, opt_state, batch_at(i), jnp.asarray(d, jnp.int32))
        loss = jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    steady = times[1:] if len(times) > 1 else times
    return SubspaceRun(z, float(metric_fn(params_fn(z))), float(loss), float(np.median(steady)))
