"""Building blocks against exact references (tests T9, T10)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from sketching import transforms as T


@pytest.mark.parametrize("n,block", [(1, 16), (2, 16), (64, 4), (512, 16), (1024, 128)])
def test_fwht_is_sylvester_hadamard(n, block, x64):
    x = jax.random.normal(jax.random.key(0), (3, n), jnp.float64)
    expected = x @ scipy.linalg.hadamard(n).T / np.sqrt(n)
    np.testing.assert_allclose(T.fwht(x, block), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.fwht(T.fwht(x, block), block), x, rtol=1e-12, atol=1e-12)  # involution


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100])
def test_dht_matches_definition_and_is_involutive(n, x64):
    x = jax.random.normal(jax.random.key(1), (2, n), jnp.float64)
    k = np.arange(n)
    angle = 2 * np.pi * np.outer(k, k) / n
    cas = (np.cos(angle) + np.sin(angle)) / np.sqrt(n)
    np.testing.assert_allclose(T.dht(x), np.asarray(x) @ cas.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(T.dht(T.dht(x)), x, rtol=1e-12, atol=1e-12)


def test_kron_apply_ordering(x64):
    """T9: row-major (A ⊗ B ⊗ C) x with unequal shapes, n₁≠n₂, m₁≠m₂."""
    keys = jax.random.split(jax.random.key(2), 4)
    a = jax.random.normal(keys[0], (2, 5), jnp.float64)
    b = jax.random.normal(keys[1], (3, 4), jnp.float64)
    c = jax.random.normal(keys[2], (6, 3), jnp.float64)
    x = jax.random.normal(keys[3], (2, 5 * 4 * 3), jnp.float64)
    np.testing.assert_allclose(T.kron_apply((a, b), x[:, :20]), x[:, :20] @ jnp.kron(a, b).T, rtol=1e-12)
    np.testing.assert_allclose(T.kron_apply((a, b, c), x), x @ jnp.kron(jnp.kron(a, b), c).T, rtol=1e-12)
    with pytest.raises(ValueError, match="product of factor columns"):
        T.kron_apply((a, b), x)


def test_haar_orthogonal_is_orthogonal_and_haar(x64):
    """T10: QᵀQ = I; E[Q₁₁] = 0 and E[Q₁₁²] = 1/n within 3 standard errors; matches LAPACK QR + sign fix."""
    n, draws = 16, 2000
    q = T.haar_orthogonal(jax.random.key(0), n, jnp.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-13)
    g = np.asarray(jax.random.normal(jax.random.key(0), (n, n), jnp.float64))
    q_ref, r_ref = np.linalg.qr(g)
    np.testing.assert_allclose(q, q_ref * np.sign(np.diag(r_ref))[None, :], atol=1e-12)
    qs = jax.vmap(lambda k: T.haar_orthogonal(k, n, jnp.float64))(jax.random.split(jax.random.key(1), draws))
    entry = np.asarray(qs[:, 0, 0])
    assert abs(entry.mean()) < 3 * entry.std() / np.sqrt(draws)
    second = entry**2
    assert abs(second.mean() - 1 / n) < 3 * second.std() / np.sqrt(draws)
    # Without the sign fix Q's diagonal would be biased (LAPACK makes R's diagonal negative or positive).
    diag = np.asarray(qs[:, np.arange(n), np.arange(n)]).ravel()
    assert abs(diag.mean()) < 3 * diag.std() / np.sqrt(diag.size)


def test_random_signs_are_balanced_and_independent_of_length():
    s = np.asarray(T.random_signs(jax.random.key(0), 100_003, jnp.float32))
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert abs(s.mean()) < 4 / np.sqrt(s.size)
    assert abs(np.mean(s[1:] * s[:-1])) < 4 / np.sqrt(s.size)
    prefix = np.asarray(T.random_signs(jax.random.key(0), 64, jnp.float32))
    np.testing.assert_array_equal(prefix, s[:64])


@pytest.mark.parametrize("kind", T.MIXERS)
def test_mixers_are_orthogonal(kind, x64):
    n = 64
    mixer = T.Mixer(kind, n, block=8)
    tables = mixer.tables(jax.random.key(0), jnp.float64)
    eye = jnp.eye(n, dtype=jnp.float64)
    matrix = mixer.forward(tables, eye).T  # columns are images of basis vectors
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(mixer.transpose(tables, eye).T, matrix.T, atol=1e-12)


def test_mixer_rejects_bad_lengths():
    with pytest.raises(ValueError, match="power-of-two"):
        T.Mixer("hadamard", 48)
    with pytest.raises(ValueError, match="allowed values"):
        T.Mixer("fft", 64)


@pytest.mark.parametrize("kind, permute", [("hadamard", "rows"), ("hadamard", "columns"), ("orthogonal", "none"),
                                           ("hadamard", "none")])
@pytest.mark.parametrize("n, block, m", [(256, 16, 16), (256, 16, 40), (512, 8, 100), (1024, 32, 1024), (64, 64, 7)])
def test_forward_rows_are_the_first_rows_and_transpose_rows_their_adjoint(kind, permute, n, block, m):
    """R_m M x from only the Kronecker factor rows it needs equals the full transform cropped, and
    transpose_rows is its exact adjoint (dense float64 reference)."""
    from sketching.transforms import Mixer

    with jax.enable_x64(True):
        mixer = Mixer(kind, n, block, permute)
        tables = mixer.tables(jax.random.key(3), jnp.float64)
        full = np.asarray(jax.vmap(lambda e: mixer.forward(tables, e))(jnp.eye(n, dtype=jnp.float64))).T  # M
        x = np.random.default_rng(0).normal(size=(3, n))
        got = np.asarray(mixer.forward_rows(tables, jnp.asarray(x), m))
        np.testing.assert_allclose(got, x @ full[:m].T, rtol=1e-10, atol=1e-10)
        w = np.random.default_rng(1).normal(size=(2, m))
        back = np.asarray(mixer.transpose_rows(tables, jnp.asarray(w), m))
        np.testing.assert_allclose(back, w @ full[:m], rtol=1e-10, atol=1e-10)
