"""Intrinsic dimension by random-subspace training through any sketch (SPEC §4.3, LANDSCAPE.md §7).

Subspace training [Li et al. 2018; Aghajanyan et al. 2021]: only z ∈ R^d is trained, in

    θ(z) = θ0 + P z,   P = √(d / D) · Φᵀ,   z0 = 0,

with Φ: R^D → R^d any sketch of `sketching/` (`transpose` gives Φᵀ). Φ is JL-normalised
(E ΦᵀΦ = I_D, so ΦΦᵀ ≈ (D/d) I_d) and the factor √(d/D) makes each column of P a roughly unit-norm
direction in parameter space, as the intrinsic-dimension papers normalise P (SPEC §4.3); the sketch
state regenerates its O(D) tables from the key, so the extra memory is O(d + √D), never D × d.
The gradient w.r.t. z is ∇_z L = √(d/D) · Φ ∇_θ L — autodiff through the sketch's transpose, whose
FWHT / Kronecker blocks are plain matmuls, so the Aghajanyan-lineage 1/√L backward-scaling bug of
LANDSCAPE §7.4 cannot occur (tests check the gradient against Φ∇θL and finite differences).

d90: the smallest d whose subspace-trained metric reaches 90% of the full-training metric. Two
searches, both resumable from a JSON results file in which each trained (d, seed) is recorded once
(`DimensionSearchLog`), over a caller-supplied `train_at(d, seed) -> metric`:
  * `doubling_search` — the paper's procedure as SPEC §4.3 / LANDSCAPE §7.5 reconstruct it: d = d0,
    2 d0, 4 d0, … until the metric (median over seeds) reaches the target, which brackets d90 in
    [d/2, d]; then bisection in log2 space inside the bracket until d_hi / d_lo ≤ `ratio`.
  * `binary_search` — plain integer bisection on [lo, hi] (the metric assumed monotone in d).
Both return a `SearchResult` with d90 (the upper end of the final bracket), the bracket and every
point trained. d values a sketch cannot take (AFJL needs a power of two dividing its padded length)
are moved to the next accepted one by `accepted_dimension`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sketching
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
        offset = self.sketch.transpose(self.state, self.scale * z)
        offset = jax.tree_util.tree_map(lambda o, t: o.astype(t.dtype), offset, self.theta0)
        return add_to_params(self.theta0, offset)

    def zeros(self) -> jax.Array:
        return jnp.zeros((self.dimension,), self.state.layout.compute_dtype)


def make_subspace(name: str, d: int, theta0: PyTree, key: jax.Array, **options) -> Subspace:
    """The subspace of dimension d through sketch `name` (any of sketching.NAMES) at θ0."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    sketch = sketching.get(name, int(d), **options)
    state = sketch.init(key, theta0)
    num_params = state.layout.size
    return Subspace(sketch, state, theta0, math.sqrt(int(d) / num_params))


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
) -> SubspaceRun:
    """Minimises z ↦ loss_fn(θ0 + P z, batch) from z = 0 for `num_steps` optax steps; only z is
    updated. Returns z, metric_fn(θ(z)), the last loss and the median wall time per step."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")

    @jax.jit
    def step(z, opt_state, batch):
        loss, grad = jax.value_and_grad(lambda w: loss_fn(subspace.params(w), batch))(z)
        updates, opt_state = optimizer.update(grad, opt_state, z)
        return optax.apply_updates(z, updates), opt_state, loss

    z = subspace.zeros()
    opt_state = optimizer.init(z)
    times, loss = [], jnp.nan
    for i in range(num_steps):
        start = time.perf_counter()
        z, opt_state, loss = step(z, opt_state, batch_at(i))
        loss = jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    steady = times[1:] if len(times) > 1 else times  # the first step includes compilation
    return SubspaceRun(z, float(metric_fn(subspace.params(z))), float(loss), float(np.median(steady)))


# ----------------------------------------------------------------------------------------------
# Resumable searches for d90
# ----------------------------------------------------------------------------------------------

class DimensionSearchLog:
    """A JSON file {"points": {"<d>/<seed>": metric}} written atomically after every trained point,
    so an interrupted search resumes without retraining anything it has recorded."""

    def __init__(self, path: str | None):
        self.path = path
        self.points: dict[str, float] = {}
        if path is not None and os.path.exists(path):
            with open(path) as f:
                self.points = {k: float(v) for k, v in json.load(f)["points"].items()}

    def get(self, d: int, seed: int) -> float | None:
        return self.points.get(f"{d}/{seed}")

    def record(self, d: int, seed: int, metric: float) -> None:
        self.points[f"{d}/{seed}"] = float(metric)
        if self.path is None:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"points": self.points}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


@dataclasses.dataclass(frozen=True)
class SearchResult:
    d90: int | None              # None when the target was not reached below d_max
    bracket: tuple[int, int]     # (largest d below target, smallest d at/above target) seen
    target: float
    points: dict[int, float]     # d → median metric over seeds
    num_trained: int             # points trained in this call (not read from the log)


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

    def __call__(self, d: int) -> tuple[int, float]:
        d = self.adjust(int(d))
        values = []
        for seed in self.seeds:
            value = self.log.get(d, seed)
            if value is None:
                value = float(self.train_at(d, seed))
                self.trained += 1
                self.log.record(d, seed, value)
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
) -> SearchResult:
    """The paper's search (doubling, then log-space bisection of the bracket; module docstring)."""
    _validate_search(target_metric, seeds)
    if not (isinstance(d0, int) and 1 <= d0 <= d_max):
        raise ValueError(f"d0 must be an int in [1, d_max={d_max}], got {d0!r}")
    if not ratio > 1:
        raise ValueError(f"ratio must be > 1, got {ratio!r}")
    evaluate = _Evaluator(train_at, seeds, DimensionSearchLog(log_path), adjust)
    low, high, d = 0, None, d0
    while d <= d_max:
        d, metric = evaluate(d)
        if metric >= target_metric:
            high = d
            break
        low, d = d, 2 * d
    if high is None:
        return SearchResult(None, (low, d_max), target_metric, evaluate.points, evaluate.trained)
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
    return SearchResult(high, (low, high), target_metric, evaluate.points, evaluate.trained)


def binary_search(
    train_at: Callable[[int, int], float],
    target_metric: float,
    *,
    lo: int,
    hi: int,
    seeds=(0,),
    log_path: str | None = None,
    adjust: Callable[[int], int] = lambda d: d,
) -> SearchResult:
    """Plain bisection on integers: the smallest d in (lo, hi] with metric ≥ target, assuming hi reaches it."""
    _validate_search(target_metric, seeds)
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
        raise ValueError(f"need ints 0 <= lo < hi, got lo={lo!r}, hi={hi!r}")
    evaluate = _Evaluator(train_at, seeds, DimensionSearchLog(log_path), adjust)
    hi, metric = evaluate(hi)
    if metric < target_metric:
        return SearchResult(None, (lo, hi), target_metric, evaluate.points, evaluate.trained)
    while hi - lo > 1:
        middle, metric = evaluate((lo + hi) // 2)
        if middle >= hi:
            break
        if metric >= target_metric:
            hi = middle
        else:
            lo = middle
    return SearchResult(hi, (lo, hi), target_metric, evaluate.points, evaluate.trained)
