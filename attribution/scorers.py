"""Attribution scorers on (sketched or plain) per-example gradient features (issue 7, "Scorers").

Every scorer maps query features G_q (Q, m) and training features G_t (N, m) to a score matrix
S (Q, N). Features may be plain flattened gradients g = ∇θ ℓ (sketch "none") or sketched ones Φg
(SPEC §4.1: ⟨Φg_z, Φg_x⟩ ≈ ⟨g_z, g_x⟩), so each scorer works for every sketch.

Sign convention: HIGHER = MORE HELPFUL, i.e. a larger score means that up-weighting the training
example x is predicted to lower the query loss ℓ(z) more.

- dot:     S = ⟨g_z, g_x⟩                     (gradient similarity; scale: loss² per unit step)
- cosine:  S = ⟨g_z, g_x⟩ / (‖g_z‖ ‖g_x‖)     (in [-1, 1])
- unit:    S = ⟨g_z, g_x/‖g_x‖⟩                (training gradients unit-normalised; query scale kept)
- tracin:  S = Σ_t η_t ⟨g_t(z), g_t(x)⟩         (Pruthi et al. 2020, learning-rate weighted sum over
                                                  checkpoints t)
- trak:    S = (1/E) Σ_e Φ_e(z) (Φ_eᵀΦ_e + λI)⁻¹ Φ_e(x)ᵀ   (Park et al. 2023, ensemble over E models;
                                                  Φ_e are per-example output-gradient features)
- influence (exact IF, Koh & Liang 2017): I(z, x) = ∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(x), solved by conjugate
  gradient on HVPs. This is −(d ℓ(z)/dε) when x is up-weighted by ε in the (1/N-normalised) training
  loss, times N: positive = helpful. The predicted change of the query loss after REMOVING x from a
  mean-of-N loss is +I(z, x)/N (first order).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SCORERS", "dot_scores", "cosine_scores", "unit_scores", "tracin_scores", "trak_scores",
           "conjugate_gradient", "inverse_hvp", "influence_scores"]


def _as2d(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (count, m), got shape {x.shape}")
    return x


def _check_dims(q, t):
    if q.shape[1] != t.shape[1]:
        raise ValueError(f"query features have m={q.shape[1]} but training features have m={t.shape[1]}")


def dot_scores(queries, train) -> jax.Array:
    """S[i, j] = ⟨g_{z_i}, g_{x_j}⟩ (higher = more helpful)."""
    q, t = _as2d("queries", queries), _as2d("train", train)
    _check_dims(q, t)
    return q @ t.T


def _normalise(x, eps):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), eps)


def cosine_scores(queries, train, *, eps: float = 1e-12) -> jax.Array:
    """S[i, j] = ⟨g_z, g_x⟩ / (‖g_z‖‖g_x‖) ∈ [-1, 1]; zero vectors score 0."""
    q, t = _as2d("queries", queries), _as2d("train", train)
    _check_dims(q, t)
    return _normalise(q, eps) @ _normalise(t, eps).T


def unit_scores(queries, train, *, eps: float = 1e-12) -> jax.Array:
    """S[i, j] = ⟨g_z, g_x/‖g_x‖⟩: unit-normalised training gradients (removes the dominance of
    high-loss / large-gradient training examples; the ranking per query equals cosine's)."""
    q, t = _as2d("queries", queries), _as2d("train", train)
    _check_dims(q, t)
    return q @ _normalise(t, eps).T


def tracin_scores(queries_per_ckpt: Sequence, train_per_ckpt: Sequence, learning_rates: Sequence[float]) -> jax.Array:
    """TracIn-CP (Pruthi et al. 2020, eq. 3): S = Σ_t η_t ⟨g_t(z), g_t(x)⟩ over checkpoints t."""
    if not (len(queries_per_ckpt) == len(train_per_ckpt) == len(learning_rates)) or len(learning_rates) == 0:
        raise ValueError("queries_per_ckpt, train_per_ckpt and learning_rates must be non-empty and of equal "
                         f"length, got {len(queries_per_ckpt)}, {len(train_per_ckpt)}, {len(learning_rates)}")
    return sum(float(lr) * dot_scores(q, t) for q, t, lr in zip(queries_per_ckpt, train_per_ckpt, learning_rates))


def trak_scores(queries_per_model: Sequence, train_per_model: Sequence, *, damping: float = 0.0) -> jax.Array:
    """TRAK (Park et al. 2023, eq. 11 without the Q re-weighting): the mean over models e of
    Φ_e(z) (Φ_eᵀΦ_e + λI)⁻¹ Φ_e(x)ᵀ, where Φ_e (N, m) holds the (projected) training features of
    model e. λ = `damping` ≥ 0 (needed when m > N)."""
    if len(queries_per_model) != len(train_per_model) or not queries_per_model:
        raise ValueError("queries_per_model and train_per_model must be non-empty lists of equal length")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    total = 0.0
    for q, t in zip(queries_per_model, train_per_model):
        q, t = _as2d("queries", q), _as2d("train", t)
        _check_dims(q, t)
        kernel = t.T @ t + damping * jnp.eye(t.shape[1], dtype=t.dtype)
        total = total + jnp.linalg.solve(kernel, q.T).T @ t.T
    return total / len(queries_per_model)


def conjugate_gradient(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *, tol: float = 1e-10,
                       max_iters: int = 1000) -> jax.Array:
    """Solve A x = b for symmetric positive definite A (Hestenes & Stiefel 1952) until ‖r‖ ≤ tol‖b‖."""
    x = jnp.zeros_like(b)
    r = b
    p = r
    rs = jnp.vdot(r, r)
    bnorm = jnp.sqrt(rs)
    for _ in range(max_iters):
        if jnp.sqrt(rs) <= tol * bnorm:
            break
        ap = matvec(p)
        alpha = rs / jnp.vdot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = jnp.vdot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def inverse_hvp(hvp_flat: Callable[[jax.Array], jax.Array], vectors, *, damping: float = 0.0,
                tol: float = 1e-10, max_iters: int = 1000) -> jax.Array:
    """Rows of (H + λI)⁻¹ v for each row v of `vectors` (Q, D), by conjugate gradient on flat HVPs."""
    vectors = _as2d("vectors", vectors)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    op = lambda v: hvp_flat(v) + damping * v  # noqa: E731
    return jnp.stack([conjugate_gradient(op, v, tol=tol, max_iters=max_iters) for v in vectors])


def influence_scores(queries, train, hvp_flat: Callable[[jax.Array], jax.Array], *, damping: float = 0.0,
                     tol: float = 1e-10, max_iters: int = 1000) -> jax.Array:
    """Exact influence I(z, x) = ∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(x) (Koh & Liang 2017; higher = more helpful),
    with H the Hessian of the mean training loss given as a flat HVP, solved by CG per query."""
    q, t = _as2d("queries", queries), _as2d("train", train)
    _check_dims(q, t)
    return inverse_hvp(hvp_flat, q, damping=damping, tol=tol, max_iters=max_iters) @ t.T


SCORERS = {"dot": dot_scores, "cosine": cosine_scores, "unit": unit_scores, "tracin": tracin_scores,
           "trak": trak_scores, "exact_if": influence_scores}
