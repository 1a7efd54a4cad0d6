"""Curvature operators over PyTrees for `lanczos` / `slq` / `hutchinson` (LANDSCAPE.md §1).

`hvp_fn(loss_fn, params, batches)` is the Hessian of the mean loss over a fixed, deterministic data
subset given as a sequence of batches:

    J(θ) = Σ_b n_b J_b(θ) / Σ_b n_b,      H v = Σ_b n_b H_b v / Σ_b n_b

where J_b is `loss_fn(θ, batch_b)` (a mean over the batch's n_b examples) and H_b v is the
forward-over-reverse product jvp(grad J_b)(θ; v) (PyHessian's `dataloader_hv_product` weighting).
The per-batch product is compiled once per batch shape; batches are visited in order every call,
so the operator is a deterministic function of v (no shuffling, no dropout: the models here are
deterministic, LANDSCAPE §1).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

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


def hvp_fn(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Sequence[Any]) -> Callable[[PyTree], PyTree]:
    """matvec(v) = H v for the Hessian of the example-weighted mean of `loss_fn` over `batches` at `params`.

    `batches` is a non-empty sequence of batches (one batch is fine: `[batch]`). Returns a function of a
    PyTree shaped like `params`, in the parameters' dtype.
    """
    fractions = _batch_fractions(batches)
    batch_hvp = jax.jit(lambda p, batch, v: hvp(loss_fn, p, batch, v))

    def matvec(vector: PyTree) -> PyTree:
        return _weighted_sum(fractions, (batch_hvp(params, batch, vector) for batch in batches))

    return matvec


def mean_gradient(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batches: Sequence[Any]) -> PyTree:
    """∇J(θ) for the same weighted mean over `batches` as `hvp_fn` (the gradient of alignment studies)."""
    grad = jax.jit(jax.grad(loss_fn))
    return _weighted_sum(_batch_fractions(batches), (grad(params, batch) for batch in batches))
