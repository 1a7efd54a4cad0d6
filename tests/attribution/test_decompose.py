"""Decompositions sum to their totals (float64)."""
import jax
import jax.numpy as jnp
import numpy as np

from attribution import decompose


def _params(rng):
    return {"dense1": {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.zeros(4)},
            "dense2": {"w": jnp.asarray(rng.normal(size=(4, 2)))}}


def _loss(p, x, y):  # per-token losses of a toy "sequence": x (T, 3), y (T,)
    logits = jnp.tanh(x @ p["dense1"]["w"] + p["dense1"]["b"]) @ p["dense2"]["w"]
    return jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(len(y)), y]


def test_per_layer_and_per_token_sum_to_total(x64):
    rng = np.random.default_rng(0)
    p = _params(rng)
    xs, ys = rng.normal(size=(5, 4, 3)), rng.integers(0, 2, size=(5, 4))
    flat = lambda g: jnp.concatenate([l.reshape(l.shape[0], -1) for l in jax.tree_util.tree_leaves(g)], 1)  # noqa: E731
    grads = jax.vmap(lambda x, y: jax.grad(lambda q: _loss(q, x, y).sum())(p))(xs, ys)
    layers = decompose.per_layer_scores(grads, grads)
    assert set(layers) == {"dense1", "dense2"}
    total = flat(grads) @ flat(grads).T
    np.testing.assert_allclose(sum(layers.values()), total, rtol=1e-12)
    tok = decompose.per_token_gradients(lambda q: _loss(q, xs[0], ys[0]), p)
    s = decompose.per_token_scores(tok, grads)
    assert s.shape == (4, 5)
    np.testing.assert_allclose(s.sum(0), total[0], rtol=1e-10)
