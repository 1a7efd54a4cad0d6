"""Attribution scorers on (sketched or plain) per-example gradient features.

Every scorer maps query features G_q (Q, m) and training features G_t (N, m) to a score matrix
S (Q, N). Features may be plain flattened gradients g = ∇θ ℓ (sketch "none") or sketched ones Φg
(⟨Φg_z, Φg_x⟩ ≈ ⟨g_z, g_x⟩), so each scorer works for every sketch.

Sign convention: HIGHER = MORE HELPFUL, i.e. a larger score means that up-weighting the training
example x is predicted to lower the query loss ℓ(z) more.

- dot:     S = ⟨g_z, g_x⟩                     (gradient similarity; scale: loss² per unit step)
- cosine:  S = ⟨g_z, g_x⟩ / (‖g_z‖ ‖g_x‖)     (in [-1, 1])
- unit:    S = ⟨g_z, g_x/‖g_x‖⟩                (training gradients unit-normalised; query scale kept)
- tracin:  S = Σ_t η_t ⟨g_t(z), g_t(x)⟩         (Pruthi et al. 2020, learning-rate weighted sum over
                                                  checkpoints t)
- trak:    S = (1/E) Σ_e Φ_e(z) (Φ_eᵀΦ_e + λI)⁻¹ Φ_e(x)ᵀ   (Park et al. 2023, ensemble over E models;
                                                  Φ_e are per-example output-gradient features)
- arnoldi:  S = Σ_{i≤p} ⟨u_i, g_z⟩⟨u_i, g_x⟩ / λ_i   (Schioppa et al. 2022, "Scaling up influence
                                                  functions": the inverse Hessian restricted to its top-p
                                                  eigenpairs (λ_i, u_i) found by Arnoldi; with a sketch the
                                                  eigenpairs are those of ΦHΦᵀ and g are sketched)
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
           "arnoldi_influence_scores", "inverse_hvp", "influence_scores"]


def _as2d(name: str, x) -> jax.Array:
    """`x` as a 2-D array; ValueError for another rank or for a row holding NaN / inf (a NaN query
    would otherwise score NaN everywhere, or 0 under a zero-norm rule). Traced values (under `jit`)
    are not checked."""
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (count, m), got shape {x.shape}")
    if not isinstance(x, jax.core.Tracer):
        finite = np.asarray(jnp.all(jnp.isfinite(x), axis=1))
        if not finite.all():
            raise ValueError(f"{name} row {int(np.flatnonzero(~finite)[0])} holds non-finite values (NaN or inf); "
                             "scores of it would be meaningless")
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


def trak_scores(queries_per_model: Sequence, train_per_model: Sequence, *, damping: float = 0.0,
                train_weights_per_model: Sequence | None = None) -> jax.Array:
    """TRAK (Park et al. 2023, eq. 11): the mean over models e of
    Φ_e(z) (Φ_eᵀΦ_e + λI)⁻¹ Φ_e(x)ᵀ Q_e(x), where Φ_e (N, m) holds the (projected) output-gradient
    features of model e and Q_e = diag(1 − p_e(x)) re-weights each training example by one minus its
    predicted probability of the correct class (`train_weights_per_model`, (N,) per model; omitted: 1).
    λ = `damping` ≥ 0. For m > N the N × N Gram form Φ(z)Φᵀ(ΦΦᵀ + λI)⁻¹ is used (equal for λ > 0, and the
    minimum-norm pseudo-inverse limit for λ = 0), so exact gradients (m = D) need no D × D matrix."""
    if len(queries_per_model) != len(train_per_model) or not queries_per_model:
        raise ValueError("queries_per_model and train_per_model must be non-empty lists of equal length")
    if train_weights_per_model is not None and len(train_weights_per_model) != len(train_per_model):
        raise ValueError(f"train_weights_per_model has {len(train_weights_per_model)} entries but there are "
                         f"{len(train_per_model)} models")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    total = 0.0
    for e, (q, t) in enumerate(zip(queries_per_model, train_per_model)):
        q, t = _as2d("queries", q), _as2d("train", t)
        _check_dims(q, t)
        if t.shape[1] <= t.shape[0]:  # (ΦᵀΦ + λI)⁻¹ in feature space, m × m
            kernel = t.T @ t + damping * jnp.eye(t.shape[1], dtype=t.dtype)
            scores = jnp.linalg.solve(kernel, q.T).T @ t.T
        else:  # m > N: the same by (ΦᵀΦ + λI)⁻¹Φᵀ = Φᵀ(ΦΦᵀ + λI)⁻¹, an N × N solve
            gram = t @ t.T + damping * jnp.eye(t.shape[0], dtype=t.dtype)
            scores = jnp.linalg.solve(gram, (q @ t.T).T).T
        if train_weights_per_model is not None:
            weights = jnp.asarray(train_weights_per_model[e], scores.dtype)
            if weights.shape != (t.shape[0],):
                raise ValueError(f"train weights of model {e} have shape {weights.shape}, expected ({t.shape[0]},)")
            scores = scores * weights[None, :]
        total = total + scores
    return total / len(queries_per_model)


def arnoldi_influence_scores(queries, train, eigenvalues, eigenvectors, *, min_eigenvalue: float = 0.0) -> jax.Array:
    """Arnoldi influence (Schioppa et al. 2022, §3): S = Σ_i ⟨u_i, g_z⟩⟨u_i, g_x⟩ / λ_i over the
    eigenpairs with λ_i > `min_eigenvalue` (the top-p Ritz pairs of H, or of ΦHΦᵀ when the features are
    sketched). eigenvectors: (p, m) orthonormal rows in feature space (e.g.
    `landscape.arnoldi(...).ritz_vectors()`). Equals ∇ℓ(z)ᵀ H⁺ ∇ℓ(x) when p = D (H positive definite)."""
    q, t = _as2d("queries", queries), _as2d("train", train)
    _check_dims(q, t)
    u = _as2d("eigenvectors", eigenvectors).astype(q.dtype)
    lam = jnp.asarray(eigenvalues, q.dtype)
    if u.shape != (lam.shape[0], q.shape[1]):
        raise ValueError(f"eigenvectors have shape {u.shape}; expected ({lam.shape[0]}, {q.shape[1]}) "
                         "(one row per eigenvalue, in feature space)")
    keep = np.asarray(lam) > min_eigenvalue
    if not keep.any():
        raise ValueError(f"no eigenvalue exceeds min_eigenvalue={min_eigenvalue}; got {np.asarray(lam)}")
    u, lam = u[keep], lam[keep]
    return ((q @ u.T) / lam) @ (t @ u.T).T


def inverse_hvp(hvp_flat: Callable[[jax.Array], jax.Array], vectors, *, damping: float = 0.0,
                tol: float = 1e-10, max_iters: int = 1000, batch_size: int | None = None,
                return_info: bool = False):
    """Rows of (H + λI)⁻¹ v for each row v of `vectors` (Q, D), by conjugate gradient (Hestenes &
    Stiefel 1952) on flat HVPs.

    Rows are solved `batch_size` at a time (all at once for None): each iteration applies
    `jax.vmap(hvp_flat)` to the block's search directions (one batched HVP instead of one per row),
    and a row stops updating once ‖r‖ ≤ tol‖v‖. `hvp_flat` must be vmappable (any JAX function is).
    With `return_info=True` returns (x, iterations, max_relative_residual): the largest number of CG
    iterations of a block and max over rows of ‖(H + λI)x − v‖ / ‖v‖, recomputed from x."""
    vectors = _as2d("vectors", vectors)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    batched = jax.jit(jax.vmap(lambda v: hvp_flat(v) + damping * v))
    size = batch_size or vectors.shape[0]
    blocks = [_block_cg(batched, vectors[i:i + size], tol, max_iters) for i in range(0, vectors.shape[0], size)]
    x = jnp.concatenate([block for block, _ in blocks])
    if not return_info:
        return x
    iterations = max(count for _, count in blocks)
    residual = jnp.linalg.norm(batched(x) - vectors, axis=1) / jnp.maximum(jnp.linalg.norm(vectors, axis=1), 1e-30)
    return x, iterations, float(jnp.max(residual))


def _block_cg(batched_matvec, b: jax.Array, tol: float, max_iters: int) -> tuple[jax.Array, int]:
    """Independent CG solves A x_i = b_i for the rows of b, advanced together; (x, iterations run)."""
    def row_dot(u, v):
        return jnp.sum(u * v, axis=1)

    x = jnp.zeros_like(b)
    r = b
    p = r
    rs = row_dot(r, r)
    threshold = (tol ** 2) * rs
    iterations = 0
    for _ in range(max_iters):
        active = rs > threshold
        if not bool(jnp.any(active)):
            break
        iterations += 1
        ap = batched_matvec(p)
        curvature = row_dot(p, ap)
        alpha = jnp.where(active, rs / jnp.where(active, curvature, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = row_dot(r, r)
        beta = jnp.where(active, rs_new / jnp.where(active, rs, 1.0), 0.0)
        p = jnp.where(active[:, None], r + beta[:, None] * p, p)
        rs = jnp.where(active, rs_new, rs)
    return x, iterations


IHVP_SOLVERS = ("cg", "lissa")


def influence_scores(queries, train, hvp_flat: Callable[[jax.Array], jax.Array], *, damping: float = 0.0,
                     tol: float = 1e-10, max_iters: int = 1000, solver: str = "cg",
                     lissa: dict | None = None) -> jax.Array:
    """Exact influence I(z, x) = ∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(x) (Koh & Liang 2017; higher = more helpful),
    with H the Hessian of the mean training loss given as a flat HVP, solved per query by `solver`:
    'cg' (conjugate gradient, `tol`, `max_iters`) or 'lissa' (`attribution.lissa.lissa_inverse_hvp`;
    `lissa` = its keyword arguments, at least scale and depth; raises LiSSADivergenceError when the
    recursion diverges instead of returning scores)."""
    q, t = _as2d("queries", queries), _as2d("train", train)
    _check_dims(q, t)
    if solver not in IHVP_SOLVERS:
        raise ValueError(f"solver={solver!r}; allowed values: {list(IHVP_SOLVERS)}")
    if solver == "lissa":
        from attribution.lissa import lissa_inverse_hvp

        options = dict(lissa or {})
        missing = [k for k in ("scale", "depth") if k not in options]
        if missing:
            raise ValueError(f"solver='lissa' needs lissa={{'scale': ..., 'depth': ...}}; missing {missing}")
        return lissa_inverse_hvp(hvp_flat, q, damping=damping, **options) @ t.T
    if lissa is not None:
        raise ValueError("lissa options given but solver='cg'; pass solver='lissa'")
    return inverse_hvp(hvp_flat, q, damping=damping, tol=tol, max_iters=max_iters) @ t.T


SCORERS = {"dot": dot_scores, "cosine": cosine_scores, "unit": unit_scores, "tracin": tracin_scores,
           "trak": trak_scores, "arnoldi": arnoldi_influence_scores, "exact_if": influence_scores}
