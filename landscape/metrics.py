"""Hessian-spectrum metrics of the paper's Fig. 2 studies.

  RNEG      = |λ⁻| / λ⁺_1, λ⁻ the most negative Ritz value (0 when none is negative), λ⁺_1 the largest.
  R(n)      = λ⁺_n / λ⁺_1 for the n-th largest positive eigenvalue.
  outliers  = #{positive λ with R > 20%} (the paper's threshold, after Ghorbani et al. 2019 Fig. 2);
              `gap_outlier_count` is the bulk-edge alternative (a relative gap above the bulk's local spacing).
  alignment = ‖U_kᵀ g‖² / ‖g‖², the fraction of the gradient's squared norm in the span of the top-k
              Ritz vectors (Gur-Ari et al. 2018); with a sketched basis g is replaced by Φg and U_k
              are the sketch-space Ritz vectors.
  overlap   = tr(P_k(t1) P_k(t2)) / k = ‖U_k(t1) U_k(t2)ᵀ‖_F² / k (subspace stability).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape.lanczos import KrylovResult, basis_precision

PyTree = Any
OUTLIER_THRESHOLD = 0.2


def _descending(eigenvalues) -> np.ndarray:
    values = np.sort(np.asarray(eigenvalues, np.float64))[::-1]
    if values.size == 0:
        raise ValueError("eigenvalues is empty")
    return values


def _largest_positive(values: np.ndarray) -> float:
    if values[0] <= 0:
        raise ValueError(f"the largest eigenvalue is {values[0]:.3g} ≤ 0; RNEG and R ratios need λ⁺_1 > 0")
    return float(values[0])


def rneg(eigenvalues) -> float:
    """|most negative eigenvalue| / largest eigenvalue (0 when there is no negative eigenvalue)."""
    values = _descending(eigenvalues)
    top = _largest_positive(values)
    return float(max(-values[-1], 0.0) / top)


def r_ratios(eigenvalues, n: int) -> np.ndarray:
    """R(1..n) = λ⁺_i / λ⁺_1 over the positive eigenvalues; NaN where fewer than n are positive."""
    values = _descending(eigenvalues)
    top = _largest_positive(values)
    positive = values[values > 0]
    ratios = np.full(n, np.nan)
    count = min(n, positive.size)
    ratios[:count] = positive[:count] / top
    return ratios


def outlier_count(eigenvalues, threshold: float = OUTLIER_THRESHOLD) -> int:
    """#{λ > 0 : λ / λ⁺_1 > threshold} (λ⁺_1 itself counts)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    values = _descending(eigenvalues)
    top = _largest_positive(values)
    return int(np.sum(values / top > threshold))


def gap_outlier_count(eigenvalues, factor: float = 2.0, window: int = 5) -> int:
    """Outliers above the bulk edge: the edge is the gap between consecutive positive Ritz values that is
    largest relative to the mean of the `window` spacings just below it; values above it count when
    that ratio exceeds `factor` (separated by a relative gap > 2× local spacing), else 0.
    (The mean, not the median: the edge gap itself then dominates the window of the gap above it.)"""
    values = _descending(eigenvalues)
    positive = np.sort(values[values > 0])  # ascending
    spacings = np.diff(positive)
    best_ratio, best_index = 0.0, None
    for i in range(window, spacings.size):
        local = np.mean(spacings[i - window:i])
        ratio = spacings[i] / max(local, np.finfo(np.float64).tiny)
        if ratio > best_ratio:
            best_ratio, best_index = ratio, i
    if best_index is None or best_ratio <= factor:
        return 0
    return int(positive.size - (best_index + 1))


def _check_k(k: int, available: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= available:
        raise ValueError(f"k must be an int in [1, {available}], got {k!r}")


def gradient_alignment(result: KrylovResult, gradient: PyTree | jax.Array, k: int) -> float:
    """‖U_kᵀ g‖² / ‖g‖² for the top-k Ritz vectors of `result`.

    `gradient` is a PyTree shaped like the template (sketched through `result.sketch` when the basis is
    sketched) or an already flat / sketched vector of the basis' length."""
    _check_k(k, result.num_iters)
    with basis_precision(result.basis):
        return _alignment(result, gradient, k)


def _alignment(result: KrylovResult, gradient, k: int) -> float:
    vectors = result.ritz_vectors(np.arange(k))
    if isinstance(gradient, jax.Array | np.ndarray) and jnp.ndim(gradient) == 1:
        g = jnp.asarray(gradient, vectors.dtype)
    elif result.sketched:
        g = result.sketch.apply(result.sketch_state, gradient).astype(vectors.dtype)
    else:
        g = result.layout.flatten(gradient).astype(vectors.dtype)
    if g.shape != (vectors.shape[1],):
        raise ValueError(f"gradient has length {g.shape}, the Krylov basis has vectors of length {vectors.shape[1]}")
    total = float(jnp.dot(g, g))
    if total == 0:
        raise ValueError("gradient is zero; alignment is undefined")
    coords = jnp.matmul(vectors, g, precision=jax.lax.Precision.HIGHEST)
    return float(jnp.dot(coords, coords)) / total


def subspace_overlap(first: KrylovResult, second: KrylovResult, k: int) -> float:
    """tr(P_k P'_k) / k ∈ [0, 1] between the top-k Ritz subspaces of two runs on the same space."""
    _check_k(k, min(first.num_iters, second.num_iters))
    u = first.ritz_vectors(np.arange(k))
    v = second.ritz_vectors(np.arange(k))
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"the two bases live in different spaces ({u.shape[1]} vs {v.shape[1]})")
    with basis_precision(u):
        cross = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
        return float(jnp.sum(cross ** 2)) / k


def relative_errors(estimate, reference, k: int) -> np.ndarray:
    """|λ̂_i − λ_i| / |λ_i| for the top-k of two descending eigenvalue lists (Table 7 protocol)."""
    est, ref = _descending(estimate)[:k], _descending(reference)[:k]
    if est.size < k or ref.size < k:
        raise ValueError(f"need at least k={k} eigenvalues in both lists, got {est.size} and {ref.size}")
    return np.abs(est - ref) / np.abs(ref)


def affine_relative_error(estimate, reference, k: int) -> float:
    """Mean relative error of the top-k eigenvalues after the best orientation-preserving affine map.

    The paper's Tables 1, 5 and 7 (Sec. 5.2–5.3) compare top-10 eigenvalues "after an
    orientation-preserving linear map R → R": λ̂ ↦ aλ̂ + b with a > 0, fitted here by weighted least
    squares on the relative residuals (aλ̂_i + b − λ_i)/λ_i (if the unconstrained fit has a ≤ 0, the
    best a > 0 tends to 0 and only the shift b is fitted). Returns mean_i |aλ̂_i + b − λ_i| / |λ_i|.
    (The paper does not say whether a shift is allowed or how the map is fitted; this is our choice.)
    """
    est, ref = _descending(estimate)[:k], _descending(reference)[:k]
    if est.size < k or ref.size < k:
        raise ValueError(f"need at least k={k} eigenvalues in both lists, got {est.size} and {ref.size}")
    weights = 1.0 / np.abs(ref)
    design = np.stack([est * weights, weights], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ref * weights, rcond=None)
    if not a > 0:
        a = 0.0
        b = float(np.sum(ref * weights**2) / np.sum(weights**2))
    return float(np.mean(np.abs(a * est + b - ref) / np.abs(ref)))
