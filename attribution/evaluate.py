"""Evaluation metrics for attribution scores.

- LDS (Park et al. 2023, §2.2): for R random training subsets S_r (indicator rows of `masks`, (R, N)),
  the additive prediction of the query-z output is f̂_r(z) = Σ_{j∈S_r} τ(z, x_j); LDS(z) is the Spearman
  rank correlation over r between f̂_r(z) and the actual output of the model retrained on S_r; the score
  is the mean over queries. With our sign ("higher = more helpful") the predicted quantity is the NEGATIVE
  query loss, so we correlate f̂ with −loss.
- LOO correlation: Pearson/Spearman between scores and the actual loss increase when x_j is left out.
- Retrieval: recall@k (fraction of the relevant training examples among the top k) and MRR (mean of
  1/rank of the first relevant example). From full score matrices: `first_relevant_ranks` (1-based
  rank of each query's best-ranked relevant example) and `retrieval_metrics`, whose recall@k is the
  share of queries with a relevant example in the top k (success@k, the fact-retrieval metric).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["spearman", "lds", "loo_correlation", "recall_at_k", "mean_reciprocal_rank", "first_relevant_ranks",
           "retrieval_metrics", "rank_of_relevant"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, axis=-1, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(x.shape[-1], dtype=np.float64) * np.ones_like(x), axis=-1)
    out = np.empty_like(ranks)
    for idx in np.ndindex(x.shape[:-1]):
        row, r = x[idx], ranks[idx].copy()
        _, inv, counts = np.unique(row, return_inverse=True, return_counts=True)
        if (counts > 1).any():
            sums = np.bincount(inv, weights=r)
            r = (sums / counts)[inv]
        out[idx] = r
    return out


def spearman(a, b) -> np.ndarray:
    """Spearman rank correlation along the last axis (Pearson of average ranks); NaN for constant rows."""
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))


def lds(scores, masks, subset_losses) -> float:
    """Linear datamodeling score. scores (Q, N) (higher = more helpful), masks (R, N) in {0, 1},
    subset_losses (R, Q) = query losses of models trained on each subset. Mean over queries of
    Spearman_r(Σ_j masks[r, j] scores[q, j], −subset_losses[r, q])."""
    scores, masks, subset_losses = np.asarray(scores), np.asarray(masks, dtype=np.float64), np.asarray(subset_losses)
    if masks.shape[1] != scores.shape[1] or subset_losses.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"shapes: scores {scores.shape} (Q, N), masks {masks.shape} (R, N), "
                         f"subset_losses {subset_losses.shape} must be (R, Q)")
    predicted = scores @ masks.T  # (Q, R)
    return float(np.nanmean(spearman(predicted, -subset_losses.T)))


def loo_correlation(scores, loo_loss_change, *, method: str = "pearson") -> float:
    """Mean over queries of the correlation between scores (Q, N) and the actual query-loss change
    when x_j is left out (Q, N) (removing a helpful example raises the loss: expected positive)."""
    s, a = np.asarray(scores, np.float64), np.asarray(loo_loss_change, np.float64)
    if method == "spearman":
        return float(np.nanmean(spearman(s, a)))
    if method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    s, a = s - s.mean(1, keepdims=True), a - a.mean(1, keepdims=True)
    return float(np.mean((s * a).sum(1) / np.sqrt((s ** 2).sum(1) * (a ** 2).sum(1))))


def _check_relevant(retrieved, relevant):
    if len(retrieved) != len(relevant):
        raise ValueError(f"retrieved has {len(retrieved)} queries but relevant has {len(relevant)}")


def recall_at_k(retrieved, relevant: Sequence[Sequence[int]], k: int) -> float:
    """Mean over queries of |top-k ∩ relevant| / |relevant|; retrieved (Q, ≥k) indices, best first."""
    _check_relevant(retrieved, relevant)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean([len(set(np.asarray(r)[:k].tolist()) & set(rel)) / len(rel)
                          for r, rel in zip(retrieved, relevant)]))


def mean_reciprocal_rank(retrieved, relevant: Sequence[Sequence[int]]) -> float:
    """Mean over queries of 1/(rank of the first relevant index) (0 if none is retrieved)."""
    _check_relevant(retrieved, relevant)
    out = []
    for r, rel in zip(retrieved, relevant):
        hits = [i for i, j in enumerate(np.asarray(r).tolist()) if j in set(rel)]
        out.append(1.0 / (hits[0] + 1) if hits else 0.0)
    return float(np.mean(out))


def first_relevant_ranks(scores, relevant: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank of the best-ranked relevant example per query. scores (Q, N), higher = better;
    examples sorted by descending score, ties broken by index (a stable sort), so ranks are deterministic."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(relevant) != scores.shape[0]:
        raise ValueError(f"scores must be (Q, N) with Q = len(relevant) = {len(relevant)}, got shape {scores.shape}")
    ranks = np.empty(len(relevant), np.int64)
    for j, docs in enumerate(relevant):
        if len(docs) == 0:
            raise ValueError(f"relevant[{j}] is empty: every query needs at least one relevant example")
        order = np.argsort(-scores[j], kind="stable")
        position = np.empty_like(order)
        position[order] = np.arange(1, len(order) + 1)
        ranks[j] = position[list(docs)].min()
    return ranks


def retrieval_metrics(ranks, ks: Sequence[int]) -> dict:
    """From first-relevant ranks: recall@k = mean(rank ≤ k) (success@k) and mrr = mean(1 / rank)."""
    ranks = np.asarray(ranks)
    metrics = {f"recall@{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics["mrr"] = float(np.mean(1.0 / ranks))
    return metrics


def rank_of_relevant(scores, relevant) -> np.ndarray:
    """Per query j, 1 + the number of examples scored strictly higher than example relevant[j]
    (scores (Q, N); ties count in the relevant example's favour, an optimistic rank)."""
    scores, relevant = np.asarray(scores), np.asarray(relevant)
    if scores.ndim != 2 or relevant.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (Q, N) and relevant (Q,), got {scores.shape} and {relevant.shape}")
    chosen = scores[np.arange(len(relevant)), relevant]
    return 1 + np.sum(scores > chosen[:, None], axis=1)
