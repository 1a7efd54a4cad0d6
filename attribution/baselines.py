"""Non-gradient attribution baselines: representation similarity and bag-of-n-gram similarity.

Both map Q queries and N training examples to a (Q, N) score matrix, higher = more similar (read as
"more helpful", like the gradient scorers of `attribution.scorers`), so they sit in the same
evaluation tables.

- Representation (feature) similarity [Hanawa et al. 2021, "Evaluation of similarity-based
  explanations", ICLR, §3: the "last-layer" relevance metrics]: with r(x) the final hidden state of
  the network (the input of the output layer),
      dot:    S = ⟨r(z), r(x)⟩          cosine: S = ⟨r(z), r(x)⟩ / (‖r(z)‖ ‖r(x)‖).
  Sequences are pooled over their tokens (mean over the mask, or the last real token).
  `hidden_states` captures r(x) from any Flax model without changing its code
  (`flax.linen.intercept_methods` on the module at a given path: its output, or its input).
- Bag-of-n-grams: every sequence becomes the count vector c(x) of its contiguous n-grams for each n in
  `n` (word or token-id n-grams),
      cosine:  S = ⟨c(z), c(x)⟩ / (‖c(z)‖ ‖c(x)‖)      dot: S = ⟨c(z), c(x)⟩
      jaccard: S = |set(z) ∩ set(x)| / |set(z) ∪ set(x)|   (sets of n-grams).
  This is the lexical-overlap baseline Grosse et al. 2023 (§3.2.1) warn TF-IDF filtering biases towards.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from attribution.tfidf import tokenize

__all__ = ["REPRESENTATION_KINDS", "NGRAM_KINDS", "POOLS", "hidden_states", "representation_scores",
           "ngrams", "ngram_scores"]

REPRESENTATION_KINDS = ("dot", "cosine")
NGRAM_KINDS = ("cosine", "dot", "jaccard")
POOLS = ("mean", "last", "none")


def hidden_states(apply_fn: Callable[[Any, dict], Any], params: Any, batch: dict, module: str, *,
                  which: str = "output", pool: str = "mean") -> jax.Array:
    """r(x) for every example of `batch`: the output (which='output') or first input (which='input') of
    the Flax module at path `module` (e.g. 'ln_final' of the transformer LM, whose output feeds the
    tied output embedding; 'head' with which='input' for a classifier's penultimate features).
    (B, ..., d) activations are pooled to (B, d): pool='mean' averages over the positions (weighted by
    batch['mask'] when present), 'last' takes the last position with mask 1 (the last position without
    a mask), 'none' keeps (B, d) inputs as they are and refuses sequences."""
    if which not in ("output", "input"):
        raise ValueError(f"which={which!r}; allowed values: ['output', 'input']")
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; allowed values: {list(POOLS)}")
    found: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.path) == module:
            found["h"] = out if which == "output" else args[0]
        return out

    with nn.intercept_methods(interceptor):
        apply_fn(params, batch)
    if "h" not in found:
        raise ValueError(f"module={module!r} was not called by apply_fn; module paths are '/'-joined Flax "
                         "names such as 'ln_final', 'head' or 'block_0/mlp_in'")
    h = found["h"]
    batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if h.ndim == 2:
        return h
    if pool == "none":
        raise ValueError(f"module {module!r} gives activations of shape {h.shape}; use pool='mean' or 'last'")
    h = h.reshape(batch_size, -1, h.shape[-1])
    mask = batch.get("mask") if isinstance(batch, dict) else None
    if mask is None or mask.shape != h.shape[:2]:
        mask = jnp.ones(h.shape[:2], h.dtype)
    mask = mask.astype(h.dtype)
    if pool == "mean":
        return jnp.sum(h * mask[..., None], axis=1) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
    return h[jnp.arange(batch_size), last]


def representation_scores(query_reps, train_reps, *, kind: str = "cosine", eps: float = 1e-12) -> jax.Array:
    """(Q, N) similarity of final hidden states (module docstring): kind 'dot' or 'cosine'."""
    if kind not in REPRESENTATION_KINDS:
        raise ValueError(f"kind={kind!r}; allowed values: {list(REPRESENTATION_KINDS)}")
    q, t = jnp.asarray(query_reps), jnp.asarray(train_reps)
    if q.ndim != 2 or t.ndim != 2:
        raise ValueError(f"query_reps and train_reps must be (count, d); got {q.shape} and {t.shape}")
    if q.shape[1] != t.shape[1]:
        raise ValueError(f"query_reps have d={q.shape[1]} but train_reps have d={t.shape[1]}")
    if kind == "cosine":
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), eps)
        t = t / jnp.maximum(jnp.linalg.norm(t, axis=1, keepdims=True), eps)
    return q @ t.T


def _orders(n) -> tuple[int, ...]:
    orders = (n,) if isinstance(n, (int, np.integer)) else tuple(n)
    if not orders or any(not isinstance(k, (int, np.integer)) or k < 1 for k in orders):
        raise ValueError(f"n must be a positive int or a non-empty sequence of them, got {n!r}")
    return tuple(int(k) for k in orders)


def ngrams(doc, n=(1, 2)) -> list[tuple]:
    """The contiguous n-grams (as tuples, each order of `n` in turn) of a string (lower-cased word
    tokens, `attribution.tfidf.tokenize`) or of a token sequence."""
    tokens = tokenize(doc)
    return [tuple(tokens[i:i + k]) for k in _orders(n) for i in range(len(tokens) - k + 1)]


def _counter(items) -> dict:
    out: dict = {}
    for g in items:
        out[g] = out.get(g, 0) + 1
    return out


def ngram_scores(queries: Sequence, documents: Sequence, *, n=(1, 2), kind: str = "cosine") -> np.ndarray:
    """(Q, N) bag-of-n-gram similarity (module docstring) of each query to each document; strings are
    word-tokenised, sequences (e.g. token ids without padding) are used as they are. A query or document
    without any n-gram scores 0."""
    if kind not in NGRAM_KINDS:
        raise ValueError(f"kind={kind!r}; allowed values: {list(NGRAM_KINDS)}")
    orders = _orders(n)
    if len(documents) == 0 or len(queries) == 0:
        raise ValueError(f"queries and documents must be non-empty, got {len(queries)} and {len(documents)}")
    vocab: dict = {}

    def counts(docs, grow):
        rows, cols, vals = [], [], []
        for r, doc in enumerate(docs):
            bag: dict[int, int] = {}
            for g in ngrams(doc, orders):
                j = vocab.setdefault(g, len(vocab)) if grow else vocab.get(g)
                if j is not None:
                    bag[j] = bag.get(j, 0) + 1
            rows += [r] * len(bag)
            cols += list(bag)
            vals += list(bag.values())
        return rows, cols, vals

    doc_entries = counts(documents, True)
    query_entries = counts(queries, False)  # n-grams absent from every document cannot match
    shape_d, shape_q = (len(documents), len(vocab)), (len(queries), len(vocab))
    d = sp.csr_matrix((np.asarray(doc_entries[2], np.float64), (doc_entries[0], doc_entries[1])), shape=shape_d)
    q = sp.csr_matrix((np.asarray(query_entries[2], np.float64), (query_entries[0], query_entries[1])), shape=shape_q)
    if kind == "dot":
        return np.asarray((q @ d.T).todense())
    if kind == "cosine":
        # the query norm counts its n-grams that no document contains as well
        nq = np.sqrt(np.asarray([sum(c * c for c in _counter(ngrams(x, orders)).values()) for x in queries],
                                np.float64))
        nd = np.sqrt(np.asarray(d.multiply(d).sum(1)).ravel())
        dense = np.asarray((q @ d.T).todense())
        return dense / np.maximum(np.outer(nq, nd), 1e-300) * (np.outer(nq, nd) > 0)
    # jaccard on sets; query n-grams unseen in the documents still count in the union
    qb, db = (q > 0).astype(np.float64), (d > 0).astype(np.float64)
    inter = np.asarray((qb @ db.T).todense())
    q_sizes = np.asarray([len(set(ngrams(x, orders))) for x in queries], np.float64)
    union = q_sizes[:, None] + np.asarray(db.sum(1)).ravel()[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
