"""The generalised Gauss–Newton (GGN) operator of a softmax cross-entropy loss (Martens 2020; Grosse
et al. 2023 use its damped inverse as the influence-function curvature).

For a loss L(θ) = Σ_n w_n CE(softmax(f_n(θ)), y_n) with logits f_n(θ) ∈ R^C,

    G = Σ_n w_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n,      J_n = ∂f_n/∂θ,  p_n = softmax(f_n(θ)),

which is positive semi-definite (the softmax-CE Hessian in the logits is diag(p) − ppᵀ ⪰ 0) and
equals the Hessian where the model is linear in θ. G v costs one JVP and one VJP of the logits.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

__all__ = ["softmax_ggn_matvec"]


def softmax_ggn_matvec(logits_fn: Callable[[Any], jax.Array], params: Any,
                       weights: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """Returns `matvec(V)`: the rows of V (k, D) ↦ rows of G V, with D the flat parameter count
    (`jax.flatten_util.ravel_pytree` order). `logits_fn(params)` gives logits of shape (..., C);
    `weights` has the leading shape (...) (0 drops a position, e.g. padding or prompt tokens).
    The logits are linearised once (one VJP closure); each call maps all rows with `vmap`."""
    _, unravel = ravel_pytree(params)
    logits, vjp = jax.vjp(logits_fn, params)
    if weights.shape != logits.shape[:-1]:
        raise ValueError(f"weights must have the logits' leading shape {logits.shape[:-1]}, got {weights.shape}")
    probs = jax.nn.softmax(logits, axis=-1)

    def one(v):
        _, jv = jax.jvp(logits_fn, (params,), (unravel(v),))
        output_hessian_jv = probs * jv - probs * jnp.sum(probs * jv, axis=-1, keepdims=True)
        return ravel_pytree(vjp(output_hessian_jv * weights[..., None])[0])[0]

    return jax.vmap(one)
