"""Scorers equal their dense float64 definitions; exact IF matches leave-one-out refits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution import scorers


def _feats(seed, q=3, n=7, m=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(q, m)), rng.normal(size=(n, m))


def test_dot_cosine_unit_dense(x64):
    q, t = _feats(0)
    np.testing.assert_allclose(scorers.dot_scores(q, t), [[a @ b for b in t] for a in q], rtol=1e-12)
    cos = [[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in t] for a in q]
    np.testing.assert_allclose(scorers.cosine_scores(q, t), cos, rtol=1e-12)
    np.testing.assert_allclose(scorers.unit_scores(q, t), [[a @ b / np.linalg.norm(b) for b in t] for a in q], rtol=1e-12)
    with pytest.raises(ValueError, match="m=5"):
        scorers.dot_scores(q, t[:, :4])


def test_tracin_and_trak_dense(x64):
    (q1, t1), (q2, t2) = _feats(1), _feats(2)
    np.testing.assert_allclose(scorers.tracin_scores([q1, q2], [t1, t2], [0.5, 0.1]),
                               0.5 * q1 @ t1.T + 0.1 * q2 @ t2.T, rtol=1e-12)
    lam = 0.3
    ref = sum(q @ np.linalg.inv(t.T @ t + lam * np.eye(5)) @ t.T for q, t in [(q1, t1), (q2, t2)]) / 2
    np.testing.assert_allclose(scorers.trak_scores([q1, q2], [t1, t2], damping=lam), ref, rtol=1e-10)


def test_cg_solves_spd(x64):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6)); a = a @ a.T + np.eye(6)
    b = rng.normal(size=(2, 6))
    x = scorers.inverse_hvp(lambda v: jnp.asarray(a) @ v, b, damping=0.5)
    np.testing.assert_allclose(scorers.inverse_hvp(lambda v: jnp.asarray(a) @ v, b, damping=0.5, batch_size=1), x, rtol=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(a + 0.5 * np.eye(6), b.T).T, rtol=1e-8)
    y, iterations, residual = scorers.inverse_hvp(lambda v: jnp.asarray(a) @ v, b, damping=0.5, return_info=True)
    np.testing.assert_array_equal(y, x)
    assert 1 <= iterations <= 6 + 1  # CG on a 6×6 SPD system converges in ≤ 6 steps in exact arithmetic
    assert residual < 1e-8


def test_exact_if_matches_leave_one_out(x64):
    """L2-regularised logistic regression, L(θ) = mean_i ℓ_i + (c/2)‖θ‖². Removing x_j changes the
    query loss by ≈ I(z, x_j)/N to first order; checked against exact refits (Newton) within 5%."""
    rng = np.random.default_rng(0)
    n, d, c = 60, 3, 0.5
    x = rng.normal(size=(n, d)); y = (x @ np.array([1.0, -2.0, 0.5]) + 0.5 * rng.normal(size=n) > 0).astype(float)
    xq, yq = rng.normal(size=(2, d)), np.array([1.0, 0.0])

    def ell(theta, xb, yb):
        z = xb @ theta
        return jnp.logaddexp(0.0, z) - yb * z

    def objective(th, w):
        return jnp.sum(w * ell(th, x, y)) / n + 0.5 * c * th @ th

    @jax.jit
    def newton(w):
        step = lambda th, _: (th - jnp.linalg.solve(jax.hessian(objective)(th, w), jax.grad(objective)(th, w)), None)  # noqa: E731
        return jax.lax.scan(step, jnp.zeros(d), None, length=12)[0]

    def fit(w):
        return newton(w), lambda th: objective(th, w)

    theta, obj = fit(jnp.ones(n))
    gq = jax.vmap(jax.grad(lambda th, a, b: ell(th, a, b)), (None, 0, 0))(theta, xq, yq)
    # removing x_j removes ℓ_j/N from the objective (the regulariser stays): Δθ ≈ H⁻¹∇ℓ_j/N
    gt = jax.vmap(jax.grad(lambda th, a, b: ell(th, a, b)), (None, 0, 0))(theta, x, y)
    hvp = lambda v: jax.jvp(jax.grad(obj), (theta,), (v,))[1]  # noqa: E731
    pred = scorers.influence_scores(gq, gt, hvp) / n
    actual = np.zeros((2, n))
    for j in range(n):
        th_j, _ = fit(jnp.ones(n).at[j].set(0.0))
        actual[:, j] = ell(th_j, xq, yq) - ell(theta, xq, yq)
    # removal increases the query loss by ≈ +I/N (helpful examples hurt when removed); exact refit
    # differs at second order O(1/N²)
    np.testing.assert_allclose(pred, actual, atol=0.05 * np.abs(actual).max())
    assert np.corrcoef(pred.ravel(), actual.ravel())[0, 1] > 0.99


def test_trak_train_weights_rescale_columns(x64):
    (q1, t1), (q2, t2) = _feats(4), _feats(5)
    w1, w2 = np.linspace(0.1, 0.9, 7), np.linspace(1.0, 0.2, 7)
    ref = (q1 @ np.linalg.inv(t1.T @ t1 + 0.2 * np.eye(5)) @ t1.T * w1
           + q2 @ np.linalg.inv(t2.T @ t2 + 0.2 * np.eye(5)) @ t2.T * w2) / 2
    got = scorers.trak_scores([q1, q2], [t1, t2], damping=0.2, train_weights_per_model=[w1, w2])
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    with pytest.raises(ValueError, match="train weights of model 0"):
        scorers.trak_scores([q1], [t1], train_weights_per_model=[w1[:3]])


def test_arnoldi_influence_full_rank_equals_inverse_and_truncation(x64):
    """With all D eigenpairs of an SPD H (found by landscape.arnoldi) the Arnoldi score equals
    g_zᵀ H⁻¹ g_x; keeping the top p equals the rank-p truncated pseudo-inverse."""
    from landscape import arnoldi

    rng = np.random.default_rng(6)
    d = 12
    a = rng.normal(size=(d, d))
    h = a @ a.T / d + 0.1 * np.eye(d)
    q, t = rng.normal(size=(3, d)), rng.normal(size=(8, d))
    result = arnoldi(lambda v: jnp.asarray(h) @ v, jnp.zeros(d), d, jax.random.PRNGKey(0))
    vecs = np.asarray(result.ritz_vectors())
    full = scorers.arnoldi_influence_scores(q, t, result.eigenvalues, vecs)
    np.testing.assert_allclose(full, q @ np.linalg.solve(h, t.T), rtol=1e-7, atol=1e-9)
    lam, u = np.linalg.eigh(h)
    top = slice(d - 4, d)
    ref = q @ u[:, top] @ np.diag(1 / lam[top]) @ u[:, top].T @ t.T
    np.testing.assert_allclose(scorers.arnoldi_influence_scores(q, t, result.eigenvalues[:4], vecs[:4]), ref,
                               rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="no eigenvalue exceeds"):
        scorers.arnoldi_influence_scores(q, t, -np.ones(2), vecs[:2])


def test_trak_gram_form_for_wide_features(x64):
    """m > N switches to the N × N Gram form; it equals the m × m formula for λ > 0."""
    q, t = _feats(7, q=2, n=4, m=9)
    ref = q @ np.linalg.inv(t.T @ t + 0.5 * np.eye(9)) @ t.T
    np.testing.assert_allclose(scorers.trak_scores([q], [t], damping=0.5), ref, rtol=1e-10)
    np.testing.assert_allclose(scorers.trak_scores([q], [t]), q @ np.linalg.pinv(t) , rtol=1e-8)


@pytest.mark.parametrize("name", ["dot", "cosine", "unit"])
def test_non_finite_query_or_train_rows_raise_instead_of_scoring(name):
    """A NaN query used to score 0.0 under cosine (and NaN under dot); now every scorer refuses it,
    naming the row."""
    fn = scorers.SCORERS[name]
    train = np.random.default_rng(0).normal(size=(6, 3))
    queries = np.ones((3, 3))
    queries[2, 1] = np.nan
    with pytest.raises(ValueError, match="queries row 2 holds non-finite"):
        fn(queries, train)
    bad_train = train.copy()
    bad_train[4, 0] = np.inf
    with pytest.raises(ValueError, match="train row 4 holds non-finite"):
        fn(np.ones((2, 3)), bad_train)
    with pytest.raises(ValueError, match="vectors row 0"):
        scorers.inverse_hvp(lambda v: v, np.full((1, 3), np.nan))
