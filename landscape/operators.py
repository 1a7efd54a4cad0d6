"""Curvature operators over PyTrees for `lanczos` / `slq` / `hutchinson`.

`hvp_fn(loss_fn, params, batches)` is the Hessian of the mean loss over a fixed, deterministic data
subset given as a sequence of batches:

    J(θ) = Σ_b n_b J_b(θ) / Σ_b n_b,      H v = Σ_b n_b H_b v / Σ_b n_b

where J_b is `loss_fn(θ, batch_b)` (a mean over the batch's n_b examples) and H_b v is the
forward-over-reverse product jvp(grad J_b)(θ; v) (PyHessian's `dataloader_hv_product` weighting).
The per-batch product is compiled once per batch shape; batches are visited in order every call,
so the operator is a deterministic function of v (no shuffling, no dropout: the models here are
deterministic).

Sharded: `hvp_fn(..., mesh=mesh)` (or `sharded_hvp_fn`) splits every batch over the mesh
axis `data_axis` (`NamedSharding(mesh, P("data"))`), keeps parameters already placed on the mesh
(e.g. FSDP-sharded, `sketching.sharded.fsdp_shard_params`) and replicates the others, and places v
like the parameters. Since J_b is a mean over examples, H_b v = (1/n_b) Σ_i H_i v: each device
computes the forward-over-reverse product of its examples and XLA inserts the all-reduce of the
batch mean (GSPMD). A batch whose size n_b is not a multiple of the axis size d is split into a
sharded part of ⌊n_b/d⌋·d examples and a replicated remainder, weighted by their sizes as above (exact
for a mean loss). The result equals the unsharded `hvp_fn` to float tolerance (summation order).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sketching.gradients import hvp

PyTree = Any


def batch_size_of(batch: Any) -> int:
    """n_b: the leading dimension shared by every leaf of a batch."""
    sizes = {int(jnp.shape(leaf)[0]) for leaf in jax.tree_util.tree_leaves(batch) if jnp.ndim(leaf) > 0}
    if len(sizes) != 1:
        raise ValueError(f"a batch must have one leading (batch) dimension shared by all leaves, got sizes {sorted(sizes)}")
    return sizes.pop()


def _batch_fractions(batches: Sequence[Any]) -> list[float]:
    """n_b / Σ n_b for each batch, after checking `batches` is a non-empty sequence of batches."""
    if isinstance(batches, dict) or not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError("batches must be a non-empty sequence of batches (e.g. [batch] for a single batch)")
    sizes = [batch_size_of(batch) for batch in batches]
    return [size / float(sum(sizes)) for size in sizes]


def _weighted_sum(fractions: Sequence[float], trees) -> PyTree:
    """Σ_b fraction_b · tree_b, accumulated one tree at a time."""
    result = None
    for fraction, tree in zip(fractions, trees):
        scaled = jax.tree_util.tree_map(lambda x: x * fraction, tree)
        result = scaled if result is None else jax.tree_util.tree_map(jnp.add, result, scaled)
    return result


class LinearOperator:
    """A linear map on PyTrees written as `pure_fn(args, tree)` with its arrays `args` kept apart.

    Calling it applies `jax.jit(pure_fn)(args, tree)`. The Krylov drivers (`landscape.lanczos`,
    `arnoldi`, `slq`, `hutchinson`) recognise the split and pass `args` (parameters, batches) into
    their compiled loops as arguments, so one compiled program serves every parameter point of a
    training run (same `pure_fn`, same shapes) and nothing large is baked into it as a constant.
    `pure_fn` must be hashable and stable across calls (a module-level or cached function)."""

    def __init__(self, pure_fn: Callable[[Any, PyTree], PyTree], args: Any):
        self.pure_fn = pure_fn
        self.args = args

    def __call__(self, vector: PyTree) -> PyTree:
        return _jitted(self.pure_fn)(self.args, vector)


@functools.lru_cache(maxsize=None)
def _jitted(fn):
    return jax.jit(fn)


@functools.lru_cache(maxsize=256)
def _pure_hvp(loss_fn: Callable, fractions: tuple[float, ...]) -> Callable:
    """(params, batches), v ↦ Σ_b fraction_b · H_b v; one function per (loss_fn, batch weights)."""

    def pure(args, vector):
        params, batches = args
        return _weighted_sum(fractions, (hvp(loss_fn, params, batch, vector) for batch in batches))

    return pure


def hvp_fn(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batches: Sequence[Any],
    *,
    mesh: Any = None,
    data_axis: str = "data",
) -> Callable[[PyTree], PyTree]:
    """matvec(v) = H v for the Hessian of the example-weighted mean of `loss_fn` over `batches` at `params`.

    `batches` is a non-empty sequence of batches (one batch is fine: `[batch]`). Returns a
    `LinearOperator` (a function of a PyTree shaped like `params`, in the parameters' dtype) whose
    parameters and batches are arguments of the compiled Krylov loops, not constants. With `mesh`
    (a `jax.sharding.Mesh`), every batch is split over the mesh axis `data_axis` (see the module
    docstring); the result is then a PyTree of global arrays placed like the parameters.
    """
    if mesh is not None:
        return sharded_hvp_fn(loss_fn, params, batches, mesh, data_axis=data_axis)
    fractions = _batch_fractions(batches)
    batches = [jax.tree_util.tree_map(jnp.asarray, batch) for batch in batches]
    return LinearOperator(_pure_hvp(loss_fn, tuple(fractions)), (params, batches))


def sharded_hvp_fn(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batches: Sequence[Any],
    mesh: Any,
    *,
    data_axis: str = "data",
) -> Callable[[PyTree], PyTree]:
    """`hvp_fn` with every batch split over the mesh axis `data_axis` (module docstring)."""
    from sketching import sharded

    fractions = _batch_fractions(batches)
    d = sharded._check_axis(mesh, data_axis)
    params = sharded._on_mesh(params, mesh)
    param_shardings = sharded._shardings_of(params)
    pieces: list[tuple[float, Any]] = []  # (weight, batch placed on the mesh)
    for fraction, batch in zip(fractions, batches):
        batch = jax.tree_util.tree_map(np.asarray, batch)
        n = batch_size_of(batch)
        head = n - n % d
        if head:
            part = jax.tree_util.tree_map(lambda a: a[:head], batch)
            pieces.append((fraction * head / n, sharded.shard_batch(part, mesh, data_axis)))
        if head < n:
            part = jax.tree_util.tree_map(lambda a: a[head:], batch)
            pieces.append((fraction * (n - head) / n, sharded.replicate(part, mesh)))
    weights = tuple(w for w, _ in pieces)

    def pure(args, vector):
        p, placed = args
        constrain = functools.partial(jax.tree_util.tree_map, lambda v, q, s: jax.lax.with_sharding_constraint(
            v.astype(q.dtype), s))
        vector = constrain(vector, p, param_shardings)
        return constrain(_weighted_sum(weights, (hvp(loss_fn, p, b, vector) for b in placed)), p, param_shardings)

    return _ShardedOperator(pure, (params, [b for _, b in pieces]), param_shardings)


class _ShardedOperator(LinearOperator):
    """A `LinearOperator` whose arrays live on a mesh (possibly spanning several processes): called
    directly, it first places the vector like the parameters; inside a compiled Krylov loop the
    placement is a sharding constraint of `pure_fn`, and the global arrays are loop arguments (a
    multi-process program may not close over arrays on other processes' devices)."""

    def __init__(self, pure_fn, args, shardings):
        super().__init__(pure_fn, args)
        self.shardings = shardings

    def __call__(self, vector: PyTree) -> PyTree:
        from sketching import sharded

        def place(v, p, s):
            if getattr(v, "sharding", None) == s and v.dtype == p.dtype:
                return v
            return sharded.put(jnp.asarray(v, p.dtype), s)

        return super().__call__(jax.tree_util.tree_map(place, vector, self.args[0], self.shardings))


def mean_gradient(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Sequence[Any]) -> PyTree:
    """∇J(θ) for the same weighted mean over `batches` as `hvp_fn` (the gradient of alignment studies)."""
    grad = jax.jit(jax.grad(loss_fn))
    return _weighted_sum(_batch_fractions(batches), (grad(params, batch) for batch in batches))
