"""LiSSA: inverse Hessian-vector products by a stochastic Neumann recursion.

Agarwal, Bullins & Hazan 2017 ("Second-order stochastic optimization for machine learning in linear
time", §3), as used for influence functions by Koh & Liang 2017 (§3) and Grosse et al. 2023 (eq. 10).
For A = H + λI (damping λ ≥ 0) and a scale s > 0, the Neumann series A⁻¹ = (1/s) Σ_k (I − A/s)^k is
truncated after J = `depth` terms and evaluated by the recursion

    r_0 = v,      r_j = v + (I − (H̃_j + λI)/s) r_{j−1},      A⁻¹ v ≈ r_J / s,

where H̃_j is an unbiased estimate of H (a mini-batch HVP drawn independently at every step, via
`sample_hvp`; the full HVP when it is omitted). `repeats` independent recursions are averaged.

Convergence and its failure mode. In an eigen-direction of A with eigenvalue a_i the error decays like
(1 − a_i/s)^J: the recursion converges only if 0 < a_i < 2s for every i, i.e. s > (λ_max(H) + λ)/2, and
the usual safe choice is s ≥ λ_max(H) + λ (all factors in [0, 1)). Directions of small a_i need
J ≫ s / (λ_min + λ) steps; truncation then acts like extra damping. When the scale is too small (or H
has negative curvature beyond λ) the terms grow geometrically. Every step's increment
r_j − r_{j−1} = v − (H̃_j + λI) r_{j−1}/s is the residual of the scaled system, so a converging
recursion keeps ‖r_j − r_{j−1}‖ ≤ ‖v‖ (deterministic H̃) while a diverging one makes it grow like
ρ^j: `lissa_inverse_hvp` raises `LiSSADivergenceError` when max_j ‖r_j − r_{j−1}‖ exceeds
`divergence_factor`·‖v‖ or anything is non-finite, so a divergent estimate is never returned as scores.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LiSSADivergenceError", "lissa_inverse_hvp"]


class LiSSADivergenceError(FloatingPointError):
    """The Neumann recursion diverged (scale too small for the curvature, or negative curvature)."""


def _as2d(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (count, dim), got shape {x.shape}")
    return x


def lissa_inverse_hvp(hvp_flat: Callable[[jax.Array], jax.Array], vectors, *, damping: float, scale: float,
                      depth: int, repeats: int = 1,
                      sample_hvp: Callable[[jax.Array, jax.Array], jax.Array] | None = None, seed: int = 0,
                      divergence_factor: float = 10.0, return_info: bool = False):
    """Rows of (H + λI)⁻¹ v for each row v of `vectors` (Q, D) by the LiSSA recursion (module docstring).

    hvp_flat(v) -> H v (full, deterministic; vmappable). sample_hvp(key, v) -> H̃_key v, an unbiased
    mini-batch estimate (the same key gives the same mini-batch; vmappable in v); when given it replaces
    hvp_flat inside the recursion, with a fresh key per step and repeat. damping: λ ≥ 0; scale: s > 0
    (needs s > (λ_max + λ)/2; s ≥ λ_max + λ is safe); depth: J ≥ 1; repeats: independent recursions averaged.
    Raises LiSSADivergenceError when the recursion diverges. With return_info, also returns a dict with
    `max_step_ratio` (max_j ‖r_j − r_{j−1}‖/‖v‖ per row, over repeats) and `residual` (‖v − (H+λI)x‖/‖v‖
    of the returned x per row, with the full HVP).
    """
    vectors = _as2d("vectors", vectors)
    if not (isinstance(damping, (int, float)) and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    for name, value in (("depth", depth), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")

    norms = jnp.linalg.norm(vectors, axis=1)
    safe = jnp.where(norms > 0, norms, 1.0)

    @jax.jit
    def recursion(key):
        def step(carry, j):
            r, worst = carry
            if sample_hvp is None:
                hr = jax.vmap(hvp_flat)(r)
            else:
                k = jax.random.fold_in(key, j)
                hr = jax.vmap(lambda x: sample_hvp(k, x))(r)
            increment = vectors - (hr + damping * r) / scale
            worst = jnp.maximum(worst, jnp.linalg.norm(increment, axis=1) / safe)
            return (r + increment, worst), None

        (r, worst), _ = jax.lax.scan(step, (vectors, jnp.zeros(vectors.shape[0], vectors.dtype)),
                                     jnp.arange(depth))
        return r / scale, worst

    keys = jax.random.split(jax.random.key(seed), repeats)
    total = jnp.zeros_like(vectors)
    worst = np.zeros(vectors.shape[0])
    for rep in range(repeats):
        estimate, ratio = recursion(keys[rep])
        ratio = np.asarray(ratio, np.float64)
        bad = ~np.isfinite(ratio) | (ratio > divergence_factor) | ~np.asarray(jnp.all(jnp.isfinite(estimate), axis=1))
        if bad.any():
            raise LiSSADivergenceError(
                f"LiSSA diverged for {int(bad.sum())} of {vectors.shape[0]} vectors (repeat {rep}): the step norm "
                f"‖r_j − r_(j−1)‖ reached {np.nanmax(np.where(np.isfinite(ratio), ratio, np.inf)):.3g}·‖v‖ "
                f"(limit {divergence_factor}). The recursion converges only if scale > (λ_max(H) + damping)/2; "
                f"got scale={scale}, damping={damping}. Raise the scale (e.g. to λ_max + damping, with λ_max from "
                "landscape.top_eigenvalue(hvp, D, num_iters=..., key=..., estimate='rayleigh')) or the damping.")
        worst = np.maximum(worst, ratio)
        total = total + estimate
    result = total / repeats
    if not return_info:
        return result
    residual = jnp.linalg.norm(vectors - jax.vmap(hvp_flat)(result) - damping * result, axis=1) / safe
    return result, {"max_step_ratio": worst, "residual": np.asarray(residual, np.float64)}
