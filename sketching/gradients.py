"""Sketched gradients and Hessian-vector products of `loss_fn(params, batch) -> scalar`.

* Explicit: materialise g = ∇_θ L(θ), then Φg.
* Implicit: differentiate ω ↦ L(θ + Φᵀω) at ω = 0; the chain rule gives Φ ∇_θ L(θ) while the
  backward pass applies the VJP of Φᵀ, which *is* Φ: the full gradient PyTree is never returned.
  Both agree to float tolerance (test T7); which is faster depends on model and sketch
  (the paper's Table 4 axis "implicit → explicit").
* HVP: forward-over-reverse, Hv = ∂/∂t ∇L(θ + t v). Sketched HVP: Φ(Hv).
* Sketched Hessian operator: u ↦ Φ H Φᵀ u = ∇²_ω L(θ + Φᵀω)|₀ u, an m×m operator costing one full HVP
  per product; Lanczos on it stores Krylov vectors of size m instead of D.

Per-example functions call `loss_fn` on a batch of one example (a leading axis of size 1 is added),
so the same `loss_fn` serves whole batches and single examples.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sketching.base import Sketch, SketchState

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]
MODES = ("explicit", "implicit")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed values: {list(MODES)}")


def add_to_params(params: PyTree, delta: PyTree) -> PyTree:
    """θ + δ leaf by leaf, keeping each parameter's dtype."""
    return jax.tree_util.tree_map(lambda p, d: p + d.astype(p.dtype), params, delta)


def sketch_gradient(
    sketch: Sketch, state: SketchState, loss_fn: LossFn, params: PyTree, batch: Any, mode: str = "explicit"
) -> jax.Array:
    """Φ ∇_θ loss_fn(params, batch), shape (m,)."""
    _check_mode(mode)
    if mode == "explicit":
        return sketch.apply(state, jax.grad(loss_fn)(params, batch))

    def reparametrised(omega):
        return loss_fn(add_to_params(params, sketch.transpose(state, omega)), batch)

    return jax.grad(reparametrised)(jnp.zeros((sketch.m,), state.layout.compute_dtype))


def _one_example_batch(example: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.expand_dims(a, 0), example)


def sketch_per_example_gradients(
    sketch: Sketch,
    state: SketchState,
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    mode: str = "explicit",
    chunk_size: int | None = None,
) -> jax.Array:
    """Φ g_i for every example i of `batch` (leading axis), shape (B, m).

    `chunk_size` bounds memory: examples are processed `chunk_size` at a time under `jax.lax.map`
    (each chunk vectorised with vmap); None vectorises the whole batch at once.
    """
    _check_mode(mode)

    def one(example):
        return sketch_gradient(sketch, state, loss_fn, params, _one_example_batch(example), mode)

    if chunk_size is None:
        return jax.vmap(one)(batch)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return jax.lax.map(one, batch, batch_size=chunk_size)


def per_example_gradients(loss_fn: LossFn, params: PyTree, batch: Any) -> PyTree:
    """The plain (unsketched) per-example gradients: a PyTree with a leading batch axis."""
    return jax.vmap(lambda ex: jax.grad(loss_fn)(params, _one_example_batch(ex)))(batch)


def flatten_per_example(tree: PyTree) -> jax.Array:
    """A per-example PyTree (every leaf with leading batch axis B) as one (B, D) matrix, leaves in
    tree-flatten order (the order of `sketching.layout.Layout`)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def hvp(loss_fn: LossFn, params: PyTree, batch: Any, vector: PyTree) -> PyTree:
    """Exact Hessian-vector product H v (forward-over-reverse)."""
    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
    return jax.jvp(grad_fn, (params,), (vector,))[1]


def sketch_hvp(
    sketch: Sketch, state: SketchState, loss_fn: LossFn, params: PyTree, batch: Any, vector: PyTree
) -> jax.Array:
    """Φ (H v), shape (m,)."""
    return sketch.apply(state, hvp(loss_fn, params, batch, vector))


def sketched_hessian_operator(
    sketch: Sketch, state: SketchState, loss_fn: LossFn, params: PyTree, batch: Any
) -> Callable[[jax.Array], jax.Array]:
    """u ↦ Φ H Φᵀ u (R^m -> R^m), the Hessian of ω ↦ L(θ + Φᵀω) at ω = 0."""

    def reparametrised(omega):
        return loss_fn(add_to_params(params, sketch.transpose(state, omega)), batch)

    zero = jnp.zeros((sketch.m,), state.layout.compute_dtype)

    def operator(u: jax.Array) -> jax.Array:
        return jax.jvp(jax.grad(reparametrised), (zero,), (u.astype(zero.dtype),))[1]

    return operator
