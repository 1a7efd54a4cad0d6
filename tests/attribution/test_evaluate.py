"""Metrics against direct definitions."""
import numpy as np
import pytest

from attribution import evaluate


def _scipy_like_spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return np.corrcoef(ra, rb)[0, 1]


def test_spearman_and_lds():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    np.testing.assert_allclose(evaluate.spearman(a, b), [_scipy_like_spearman(x, y) for x, y in zip(a, b)], rtol=1e-12)
    np.testing.assert_allclose(evaluate.spearman([1, 2, 2, 3], [1, 2, 2, 3]), 1.0)
    scores = rng.normal(size=(4, 30))
    masks = rng.integers(0, 2, size=(25, 30))
    losses = -(masks @ scores.T)  # a perfectly additive model: loss falls with helpful examples
    assert evaluate.lds(scores, masks, losses) == pytest.approx(1.0)
    assert evaluate.lds(-scores, masks, losses) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="subset_losses"):
        evaluate.lds(scores, masks, losses.T)


def test_loo_recall_mrr():
    s = np.array([[3.0, 1.0, 2.0, 0.0]])
    assert evaluate.loo_correlation(s, 2 * s + 1) == pytest.approx(1.0)
    assert evaluate.loo_correlation(s, s ** 3, method="spearman") == pytest.approx(1.0)
    retrieved = [[2, 0, 1], [1, 2, 0]]
    assert evaluate.recall_at_k(retrieved, [[0], [0, 2]], k=2) == pytest.approx((1 + 0.5) / 2)
    assert evaluate.mean_reciprocal_rank(retrieved, [[0], [0]]) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_first_relevant_ranks_and_retrieval_metrics():
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [0.3, 0.2, 0.3, 0.0]])
    # query 0: order by descending score, ties by index -> [1, 3, 2, 0]; relevant {2, 0} -> best rank 3
    # query 1: order [0, 2, 1, 3]; relevant {2} -> rank 2
    ranks = evaluate.first_relevant_ranks(scores, [(2, 0), (2,)])
    np.testing.assert_array_equal(ranks, [3, 2])
    metrics = evaluate.retrieval_metrics(ranks, [1, 2, 3])
    assert metrics == {"recall@1": 0.0, "recall@2": 0.5, "recall@3": 1.0, "mrr": (1 / 3 + 1 / 2) / 2}
    with pytest.raises(ValueError, match="relevant"):
        evaluate.first_relevant_ranks(scores, [(0,), ()])


def test_rank_of_relevant_counts_strictly_better_examples():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.3]])
    np.testing.assert_array_equal(evaluate.rank_of_relevant(scores, np.array([2, 0])), [2, 1])
    with pytest.raises(ValueError, match="relevant"):
        evaluate.rank_of_relevant(scores, np.array([0]))

