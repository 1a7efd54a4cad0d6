"""Representation-similarity and n-gram baselines against direct (loop) definitions."""
import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution import baselines


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, batch):
        h = nn.relu(nn.Dense(4, name="dense")(batch["x"]))
        return nn.Dense(3, name="head")(h)


class _Seq(nn.Module):
    @nn.compact
    def __call__(self, batch):
        x = nn.Embed(7, 5, name="embed")(batch["tokens"])
        return nn.Dense(7, name="out")(nn.LayerNorm(name="ln_final")(x))


def test_hidden_states_classifier_and_sequences():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
    model = _MLP()
    params = model.init(jax.random.key(0), {"x": x})
    h = baselines.hidden_states(model.apply, params, {"x": x}, "head", which="input")
    p = params["params"]["dense"]
    np.testing.assert_allclose(h, jax.nn.relu(x @ p["kernel"] + p["bias"]), rtol=1e-6)

    tokens = jnp.asarray([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]])
    seq = _Seq()
    sp = seq.init(jax.random.key(1), {"tokens": tokens})
    full = nn.LayerNorm().apply({"params": sp["params"]["ln_final"]}, sp["params"]["embed"]["embedding"][tokens])
    batch = {"tokens": tokens, "mask": mask}
    mean = baselines.hidden_states(seq.apply, sp, batch, "ln_final")
    np.testing.assert_allclose(mean[0], full[0, :3].mean(0), rtol=1e-5)
    np.testing.assert_allclose(mean[1], full[1, :2].mean(0), rtol=1e-5)
    last = baselines.hidden_states(seq.apply, sp, batch, "ln_final", pool="last")
    np.testing.assert_allclose(last, jnp.stack([full[0, 2], full[1, 1]]), rtol=1e-5)
    with pytest.raises(ValueError, match="module"):
        baselines.hidden_states(seq.apply, sp, batch, "nope")
    with pytest.raises(ValueError, match="pool"):
        baselines.hidden_states(seq.apply, sp, batch, "ln_final", pool="none")


def test_representation_scores_dense():
    rng = np.random.default_rng(1)
    q, t = rng.normal(size=(2, 4)), rng.normal(size=(5, 4))
    np.testing.assert_allclose(baselines.representation_scores(q, t, kind="dot"), q @ t.T, rtol=1e-5)
    cos = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in t] for a in q]
    np.testing.assert_allclose(baselines.representation_scores(q, t), cos, rtol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        baselines.representation_scores(q, t, kind="l2")
    with pytest.raises(ValueError, match="d=3"):
        baselines.representation_scores(q, t[:, :3])


def _bag(doc, orders):
    toks = doc.lower().split() if isinstance(doc, str) else list(doc)
    return collections.Counter(tuple(toks[i:i + k]) for k in orders for i in range(len(toks) - k + 1))


@pytest.mark.parametrize("orders", [(1,), (1, 2), (2, 3)])
def test_ngram_scores_match_counter_definitions(orders):
    docs = ["the cat sat on the mat", "a dog sat", "the cat the cat", "mat on cat", "zebra"]
    queries = ["the cat sat", "dog on a mat", "unicorn", "the the"]
    cos = baselines.ngram_scores(queries, docs, n=orders)
    dot = baselines.ngram_scores(queries, docs, n=orders, kind="dot")
    jac = baselines.ngram_scores(queries, docs, n=orders, kind="jaccard")
    for i, qd in enumerate(queries):
        a = _bag(qd, orders)
        for j, dd in enumerate(docs):
            b = _bag(dd, orders)
            d = sum(a[g] * b[g] for g in a)
            na, nb = np.sqrt(sum(v * v for v in a.values())), np.sqrt(sum(v * v for v in b.values()))
            assert dot[i, j] == pytest.approx(d)
            assert cos[i, j] == pytest.approx(d / (na * nb) if na * nb else 0.0)
            union = len(set(a) | set(b))
            assert jac[i, j] == pytest.approx(len(set(a) & set(b)) / union if union else 0.0)
    # token-id sequences work the same way
    ids = baselines.ngram_scores([[1, 2, 3]], [[1, 2], [3, 1, 2, 3], [9]], n=(1, 2), kind="dot")
    np.testing.assert_array_equal(ids, [[3, 6, 0]])
    with pytest.raises(ValueError, match="kind"):
        baselines.ngram_scores(queries, docs, kind="bm25")
    with pytest.raises(ValueError, match="n must"):
        baselines.ngram_scores(queries, docs, n=0)
