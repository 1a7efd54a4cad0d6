"""TF-IDF / BM25 candidate filtering before influence scoring.

Computing a training gradient per (query, candidate) pair is the bottleneck of influence functions
[Grosse et al. 2023 ("G23") §3.2], so G23 first keep, per query, the top N training sequences by a
modified Okapi BM25 with binary term presence [G23 eq. 28–29]:

    score(q, D) = Σ_{t ∈ set(q)} IDF(t) · (k1 + 1)·e(t, D) / (k1 + e(t, D)),   e(t, D) = 1[t ∈ D],  k1 = 1.5
    IDF(t) = log( (C − n(t) + 0.5) / (n(t) + 0.5) + 1 ),   C = #documents, n(t) = #documents containing t

Since e ∈ {0, 1} the fraction is 1 when t occurs, so the score is the sum of IDFs of the query's
distinct tokens present in D (G23's text says the sum runs over the tokens of D; only the sum over
query tokens makes sense, and is what is implemented). `method="sklearn"` instead ranks by the cosine
of scikit-learn `TfidfVectorizer` vectors (sublinear tf, l2 norm). Documents and queries are strings
(split on whitespace after lower-casing, punctuation stripped) or sequences of tokens (ints / strs).

`filter_recall` measures what the filter costs: for each query, the fraction of the true top-k
training examples (by unfiltered influence) that survive among the N candidates, and the fraction of
the top-k influence mass that survives [G23 warn that the filter biases toward token overlap].
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

__all__ = ["METHODS", "DEFAULT_K1", "tokenize", "bm25_scores", "tfidf_scores", "top_candidates", "filter_recall"]

METHODS = ("bm25", "sklearn")
DEFAULT_K1 = 1.5
_WORD = re.compile(r"[\w']+")


def tokenize(doc) -> list:
    """A string -> lower-cased word tokens; a sequence of tokens is returned as a list."""
    if isinstance(doc, str):
        return _WORD.findall(doc.lower())
    return [t.item() if isinstance(t, np.generic) else t for t in doc]


def bm25_scores(queries: Sequence, documents: Sequence, k1: float = DEFAULT_K1) -> np.ndarray:
    """(Q, C) binary-BM25 scores of G23 eq. 28–29 (module docstring)."""
    if not k1 > 0:
        raise ValueError(f"k1={k1!r}; must be > 0")
    if len(documents) == 0:
        raise ValueError("documents is empty")
    doc_sets = [set(tokenize(d)) for d in documents]
    vocab: dict = {}
    for s in doc_sets:
        for t in s:
            vocab.setdefault(t, len(vocab))
    presence = np.zeros((len(doc_sets), len(vocab)), np.float64)
    for i, s in enumerate(doc_sets):
        presence[i, [vocab[t] for t in s]] = 1.0
    C = len(doc_sets)
    n = presence.sum(0)
    idf = np.log((C - n + 0.5) / (n + 0.5) + 1.0)
    weight = idf * (k1 + 1.0) / (k1 + 1.0)  # e = 1 wherever presence is 1; kept to mirror the formula
    q_mat = np.zeros((len(queries), len(vocab)), np.float64)
    for j, q in enumerate(queries):
        ids = [vocab[t] for t in set(tokenize(q)) if t in vocab]  # tokens absent from every document add 0
        q_mat[j, ids] = 1.0
    return (q_mat * weight) @ presence.T


def tfidf_scores(queries: Sequence, documents: Sequence, method: str = "bm25", k1: float = DEFAULT_K1) -> np.ndarray:
    """(Q, C) lexical relevance of every document to every query by `method` in METHODS."""
    if method == "bm25":
        return bm25_scores(queries, documents, k1)
    if method == "sklearn":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(analyzer=tokenize, sublinear_tf=True, norm="l2")
        d = vec.fit_transform(list(documents))
        q = vec.transform(list(queries))
        return np.asarray((q @ d.T).todense(), np.float64)
    raise ValueError(f"method={method!r}; allowed values: {list(METHODS)}")


def top_candidates(scores: np.ndarray, n: int) -> np.ndarray:
    """(Q, n) indices of the n best documents per query (descending score, ties to the lower index)."""
    scores = np.asarray(scores)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n={n!r}; must be an int in [1, {scores.shape[1]}] (the number of documents)")
    return np.argsort(-scores, axis=1, kind="stable")[:, :n]


def filter_recall(influence: np.ndarray, candidates: np.ndarray, k: int) -> dict:
    """How much of the true top-k influence survives a candidate filter. `influence` (Q, C) unfiltered
    scores, `candidates` (Q, N) kept indices. Returns `recall` = mean_q |top_k(q) ∩ cand(q)| / k and
    `mass` = mean_q Σ_{i ∈ top_k(q) ∩ cand(q)} |I_qi| / Σ_{i ∈ top_k(q)} |I_qi|."""
    influence = np.asarray(influence, np.float64)
    top = top_candidates(influence, k)
    recall, mass = [], []
    for q in range(influence.shape[0]):
        keep = np.isin(top[q], candidates[q])
        recall.append(keep.mean())
        w = np.abs(influence[q, top[q]])
        mass.append(w[keep].sum() / w.sum() if w.sum() > 0 else float(keep.mean()))
    return {"recall": float(np.mean(recall)), "mass": float(np.mean(mass))}
