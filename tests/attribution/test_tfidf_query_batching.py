"""Tests of attribution/tfidf.py (BM25 / TF-IDF candidate filter) and attribution/query_batching.py."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from attribution import query_batching as qb
from attribution import tfidf

DOCS = ["The cat sat on the mat.", "A dog sat.", "Cats and dogs", "the mat is red, the mat is flat"]


def test_bm25_is_sum_of_idf_of_present_query_tokens():
    scores = tfidf.bm25_scores(["the mat dog", "zebra"], DOCS)
    C = len(DOCS)

    def idf(n):
        return math.log((C - n + 0.5) / (n + 0.5) + 1.0)

    # 'the' in docs 0 and 3, 'mat' in docs 0 and 3, 'dog' in doc 1 only; repeated tokens count once.
    expected = [2 * idf(2), idf(1), 0.0, 2 * idf(2)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-12)
    np.testing.assert_array_equal(scores[1], 0.0)  # a token in no document contributes nothing
    np.testing.assert_array_equal(tfidf.top_candidates(scores, 2)[0], [0, 3])  # ties -> lower index


def test_token_id_documents_and_sklearn_method():
    docs = [[1, 2, 3], [3, 4], [5, 6, 6]]
    np.testing.assert_allclose(tfidf.bm25_scores([[6, 6]], docs)[0], [0, 0, math.log(2.5 / 1.5 + 1)])
    s = tfidf.tfidf_scores(["red mat"], DOCS, method="sklearn")
    assert s.shape == (1, 4) and int(np.argmax(s[0])) == 3 and s[0, 1] == 0.0
    with pytest.raises(ValueError, match="method"):
        tfidf.tfidf_scores(["x"], DOCS, method="bm26")


def test_filter_recall():
    influence = np.array([[5.0, -4.0, 3.0, 0.1, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    full = tfidf.filter_recall(influence, np.tile(np.arange(5), (2, 1)), k=2)
    assert full == {"recall": 1.0, "mass": 1.0}
    part = tfidf.filter_recall(influence, np.array([[0, 3], [4, 0]]), k=2)
    # query 0: top-2 {0, 2}, kept {0} -> recall 1/2, mass 5/8; query 1: top-2 {4, 3}, kept {4} -> 1/2, 4/7
    assert part["recall"] == pytest.approx(0.5)
    assert part["mass"] == pytest.approx((5 / 8 + 4 / 7) / 2)
    with pytest.raises(ValueError, match="n="):
        tfidf.top_candidates(influence, 6)


def _problem(seed=0, Q=3, B=5, T=4, IN=7, OUT=5):
    rng = np.random.default_rng(seed)
    pre = {"a": rng.normal(size=(Q, IN, OUT)), "b": rng.normal(size=(Q, 3, 6))}
    acts = {"a": (rng.normal(size=(B, T, IN)), rng.normal(size=(B, T, OUT))),
            "b": (rng.normal(size=(B, T, 3)), rng.normal(size=(B, T, 6)))}
    exact = sum(np.einsum("qio,bti,bto->qb", pre[p], *acts[p]) for p in pre)
    return pre, acts, exact


def test_full_rank_is_exact_and_low_rank_is_truncated_svd(x64):
    pre, acts, exact = _problem()
    full = qb.low_rank_scores(qb.low_rank_queries({p: jnp.asarray(v) for p, v in pre.items()}, 5), acts)
    np.testing.assert_allclose(full, exact, rtol=1e-10, atol=1e-10)
    lr = qb.low_rank_queries({p: jnp.asarray(v) for p, v in pre.items()}, 2)
    ref = 0.0
    for p, v in pre.items():
        u, s, vt = np.linalg.svd(v, full_matrices=False)
        v2 = np.einsum("qik,qk,qko->qio", u[..., :2], s[..., :2], vt[..., :2, :])
        ref = ref + np.einsum("qio,bti,bto->qb", v2, *acts[p])
    np.testing.assert_allclose(qb.low_rank_scores(lr, acts), ref, rtol=1e-10, atol=1e-10)
    errors = [qb.score_error(qb.low_rank_scores(qb.low_rank_queries(pre, k), acts), exact)["rel_error"]
              for k in (1, 2, 3, 4, 5)]
    assert errors[-1] < 1e-10 and all(a >= b for a, b in zip(errors, errors[1:]))
    with pytest.raises(ValueError, match="rank"):
        qb.low_rank_queries(pre, 0)
