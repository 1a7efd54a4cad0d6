"""Tests of sketching/logra.py: dense float64 reference, adjoint, scaling, activation-side projection."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sketching import logra


def _tree(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    return {"dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), dtype), "bias": jnp.asarray(rng.normal(size=5), dtype)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), dtype)}}


def test_matches_dense_kronecker_reference_and_adjoint(x64):
    tree = _tree()
    sk = logra.get(m=3 * 3 + 3 * 3 + 2, rank=3, tables="store")  # two 3x3 blocks + 2 dims for the bias
    state = sk.init(jax.random.key(1), tree)
    flat = state.layout.flatten(tree)
    D = flat.shape[0]
    phi = np.stack([np.asarray(sk.apply(state, state.layout.unflatten(jnp.eye(D)[i]))) for i in range(D)], 1)
    np.testing.assert_allclose(phi @ np.asarray(flat), sk.apply(state, tree), rtol=1e-12, atol=1e-12)
    # The matrix blocks come first, in leaf order; each is (P_in ⊗ P_out)ᵀ on its leaf's slice.
    pos = 0
    for leaf, off, a, c, ra, rc in state.plan.matrices:
        kron = np.kron(np.asarray(state.tables[f"in_{leaf}"]), np.asarray(state.tables[f"out_{leaf}"]))
        np.testing.assert_allclose(phi[pos:pos + ra * rc, off:off + a * c], kron.T, atol=1e-12)
        pos += ra * rc
    assert pos == 18 and state.plan.m_vector == 2
    y = np.random.default_rng(2).normal(size=sk.m)
    back = state.layout.flatten(sk.transpose(state, jnp.asarray(y)))
    np.testing.assert_allclose(back, phi.T @ y, rtol=1e-12, atol=1e-12)
    regen = logra.get(m=sk.m, rank=3)
    np.testing.assert_allclose(regen.apply(regen.init(jax.random.key(1), tree), tree), sk.apply(state, tree), rtol=1e-12)


def test_unbiased_norm(x64):
    tree = _tree()
    sk = logra.get(m=20)
    sq = [float(jnp.sum(sk.apply(sk.init(jax.random.key(k), tree), tree) ** 2)) for k in range(300)]
    norm = sum(float(jnp.sum(l ** 2)) for l in jax.tree_util.tree_leaves(tree))
    assert abs(np.mean(sq) / norm - 1) < 0.1


def test_projection_from_activations_equals_apply_slot(x64):
    rng = np.random.default_rng(3)
    x, d = jnp.asarray(rng.normal(size=(2, 7, 6))), jnp.asarray(rng.normal(size=(2, 7, 5)))
    tree = _tree()
    sk = logra.get(m=30)
    state = sk.init(jax.random.key(0), tree)
    kernel_leaf = state.plan.matrices[0][0]
    for b in range(2):
        g = {**tree, "dense": {"kernel": x[b].T @ d[b], "bias": jnp.zeros(5)}, "head": {"kernel": jnp.zeros((5, 3))}}
        np.testing.assert_allclose(logra.project_from_activations(state, kernel_leaf, x, d)[b],
                                   sk.apply(state, g)[logra.slot(state, kernel_leaf)], rtol=1e-10)


def test_m_validation():
    tree = _tree(jnp.float32)
    with pytest.raises(ValueError, match="rank"):
        logra.get(m=10, rank=3).init(jax.random.key(0), tree)
    with pytest.raises(ValueError, match="not attainable"):
        logra.get(m=7).init(jax.random.key(0), {"k": jnp.zeros((4, 4))})
    assert logra.get(m=9).init(jax.random.key(0), {"k": jnp.zeros((4, 4))}).plan.matrices[0][4:] == (3, 3)
