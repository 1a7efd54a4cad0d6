"""Query batching with low-rank preconditioned query gradients.

Training gradients do not depend on the query, so one pass over the training set can serve many
queries if their preconditioned gradients P_q = (Ĝ + λI)⁻¹ ∇L(z_q) fit in memory. Per layer, G23
[Grosse et al. 2023 §3.2.2] replace P_q (a matrix (in+1) × out) by its rank-k SVD truncation

    P_q ≈ L R,     L = U_k Σ_k  ((in+1) × k),   R = V_kᵀ  (k × out)      (Eckart–Young optimal)

which stores k·(in+1+out) numbers instead of (in+1)·out, and scores a training sequence with layer
inputs X̃ (T × (in+1)) and output gradients Δ (T × out) without forming its gradient X̃ᵀΔ:

    ⟨P_q, X̃ᵀΔ⟩_F ≈ ⟨L R, X̃ᵀΔ⟩_F = Σ_t (x̃_tᵀ L) · (R δ_t) = sum((X̃ L) ⊙ (Δ Rᵀ))     O(T k (in + out))

rank = min(in+1, out) is exact. G23 found rank 32 gave Pearson 0.995 with full-rank scores.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["low_rank_queries", "low_rank_scores", "score_error"]


def low_rank_queries(preconditioned: Mapping[str, jax.Array], rank: int) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per layer `(L, R)` with L (Q, in+1, k), R (Q, k, out), k = min(rank, in+1, out), from the SVD
    of each query's preconditioned layer gradient (Q, in+1, out)."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank={rank!r}; must be a positive int")
    out = {}
    for path, p in preconditioned.items():
        u, s, vt = jnp.linalg.svd(p, full_matrices=False)
        k = min(int(rank), s.shape[-1])
        out[path] = (u[..., :k] * s[..., None, :k], vt[..., :k, :])
    return out


def low_rank_scores(factors: Mapping[str, tuple[jax.Array, jax.Array]],
                    train_acts: Mapping[str, tuple[jax.Array, jax.Array]], per_layer: bool = False):
    """(Q, B) scores Σ_ℓ Σ_t (x̃_t L_q)(R_q δ_t) against training examples given by (X̃, Δ) (B, T, ·)."""
    hi = jax.lax.Precision.HIGHEST
    out = {}
    for path, (x, d) in train_acts.items():
        L, R = factors[path]
        xl = jnp.einsum("bti,qik->qbtk", x, L, precision=hi)
        dr = jnp.einsum("bto,qko->qbtk", d, R, precision=hi)
        out[path] = jnp.sum(xl * dr, axis=(2, 3))
    return out if per_layer else sum(out.values())


def score_error(approx: np.ndarray, exact: np.ndarray) -> dict:
    """`rel_error` = ‖approx − exact‖_F / ‖exact‖_F and `pearson` (mean over queries of the Pearson
    correlation across training examples) between low-rank and full-rank scores (Q, B)."""
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    rel = float(np.linalg.norm(approx - exact) / max(np.linalg.norm(exact), 1e-300))
    pearson = [np.corrcoef(a, e)[0, 1] for a, e in zip(approx, exact) if np.std(a) > 0 and np.std(e) > 0]
    return {"rel_error": rel, "pearson": float(np.mean(pearson)) if pearson else float("nan")}
