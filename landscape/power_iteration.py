"""The largest eigenvalue of a symmetric PSD operator by power iteration (von Mises 1929).

    v_0 ~ N(0, I),   w_t = A v_t / ‖v_t‖,   λ_t = ‖w_t‖,   v_{t+1} = w_t

λ_t increases towards λ_max(A) for PSD A at the rate (λ_2/λ_1)^t. Cheap (one matvec per step) and
enough to set a damping relative to λ_max; use `landscape.lanczos` for spectra or accurate values.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["top_eigenvalue"]


def top_eigenvalue(matvec_rows: Callable[[jax.Array], jax.Array], dim: int, *, num_iters: int,
                   key: jax.Array) -> float:
    """Power-iteration estimate of λ_max after `num_iters` steps. `matvec_rows` maps a (1, dim)
    row block to A applied to its row (the batched-operator convention of `softmax_ggn_matvec`)."""
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    v = jax.random.normal(key, (1, dim))
    estimate = 0.0
    for _ in range(num_iters):
        w = matvec_rows(v / jnp.linalg.norm(v))
        estimate = float(jnp.linalg.norm(w))
        if not jnp.isfinite(estimate):
            raise FloatingPointError(f"power iteration: the operator returned a non-finite vector (‖Av‖ = {estimate})")
        v = w
    return estimate
