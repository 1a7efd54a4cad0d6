"""LiSSA against the dense float64 inverse-HVP on L2-regularised logistic regression; divergence detected."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape
from attribution import lissa, scorers


def _logreg(seed=0, n=200, d=6, c=1e-2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)
    y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(float)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss(th, xb, yb):
        z = xb @ th
        return jnp.mean(jnp.logaddexp(0.0, z) - yb * z) + 0.5 * c * th @ th

    theta = jnp.asarray(rng.normal(size=d) * 0.3)
    hessian = jax.hessian(loss)(theta, x, y)
    hvp = lambda v: hessian @ v  # noqa: E731

    def sample_hvp(key, v, batch=40):
        idx = jax.random.choice(key, n, (batch,), replace=False)
        return jax.jvp(lambda t: jax.grad(loss)(t, x[idx], y[idx]), (theta,), (v,))[1]

    vectors = jnp.asarray(rng.normal(size=(3, d)))
    return np.asarray(hessian), hvp, sample_hvp, vectors


def test_top_eigenvalue_sets_the_scale(x64):
    """The LiSSA scale comes from landscape.top_eigenvalue (one power iteration in the project)."""
    h, hvp, _, _ = _logreg()
    np.testing.assert_allclose(landscape.top_eigenvalue(hvp, h.shape[0], num_iters=300, key=jax.random.key(0),
                                                        estimate="rayleigh", dtype=jnp.float64),
                               np.linalg.eigvalsh(h)[-1], rtol=1e-6)


def test_lissa_deterministic_matches_exact_ihvp(x64):
    h, hvp, _, v = _logreg()
    lam = 0.05
    exact = np.linalg.solve(h + lam * np.eye(h.shape[0]), np.asarray(v).T).T
    lmax = np.linalg.eigvalsh(h)[-1]
    # error factor (1 − (λ_min + λ)/s)^J: J = 3000 with s = 1.2 (λ_max + λ) reaches ≈ 1e-10
    x, info = lissa.lissa_inverse_hvp(hvp, v, damping=lam, scale=1.2 * (lmax + lam), depth=3000, return_info=True)
    np.testing.assert_allclose(x, exact, rtol=1e-7, atol=1e-9)
    assert info["residual"].max() < 1e-8 and info["max_step_ratio"].max() <= 1.0 + 1e-12
    # truncated early, the error matches the predicted (1 − a_i/s)^J decay per eigen-direction
    s, depth = 1.2 * (lmax + lam), 50
    w, q = np.linalg.eigh(h + lam * np.eye(h.shape[0]))
    predicted = (q @ np.diag((1 - (1 - w / s) ** (depth + 1)) / w) @ q.T @ np.asarray(v).T).T
    np.testing.assert_allclose(lissa.lissa_inverse_hvp(hvp, v, damping=lam, scale=s, depth=depth), predicted,
                               rtol=1e-10, atol=1e-12)


def test_lissa_stochastic_repeats_reduce_error(x64):
    h, hvp, sample_hvp, v = _logreg(seed=1)
    lam = 0.05
    exact = np.linalg.solve(h + lam * np.eye(h.shape[0]), np.asarray(v).T).T
    s = 2.0 * (np.linalg.eigvalsh(h)[-1] + lam)
    err = {}
    for repeats in (1, 16):
        x = lissa.lissa_inverse_hvp(hvp, v, damping=lam, scale=s, depth=1000, repeats=repeats,
                                    sample_hvp=sample_hvp, seed=3)
        err[repeats] = np.linalg.norm(x - exact) / np.linalg.norm(exact)
    assert err[16] < 0.1 and err[16] < err[1], err


def test_lissa_divergence_is_raised_not_returned(x64):
    h, hvp, sample_hvp, v = _logreg(seed=2)
    lmax = np.linalg.eigvalsh(h)[-1]
    with pytest.raises(lissa.LiSSADivergenceError, match="scale"):
        lissa.lissa_inverse_hvp(hvp, v, damping=0.01, scale=0.3 * lmax, depth=200)
    with pytest.raises(lissa.LiSSADivergenceError):
        lissa.lissa_inverse_hvp(hvp, v, damping=0.01, scale=0.3 * lmax, depth=200, sample_hvp=sample_hvp)
    # through the exact-IF scorer: no scores come back
    gt = np.asarray(v)[::-1]
    with pytest.raises(lissa.LiSSADivergenceError):
        scorers.influence_scores(v, gt, hvp, damping=0.01, solver="lissa", lissa={"scale": 0.3 * lmax, "depth": 200})
    # negative curvature beyond the damping diverges as well
    with pytest.raises(lissa.LiSSADivergenceError):
        lissa.lissa_inverse_hvp(lambda u: -jnp.asarray(h) @ u, v, damping=0.0, scale=2 * lmax, depth=2000)


def test_exact_if_lissa_option_matches_cg(x64):
    h, hvp, _, v = _logreg(seed=4)
    lam = 0.05
    gt = jnp.asarray(np.random.default_rng(0).normal(size=(5, h.shape[0])))
    cg = scorers.influence_scores(v, gt, hvp, damping=lam)
    ls = scorers.influence_scores(v, gt, hvp, damping=lam, solver="lissa",
                                  lissa={"scale": 1.2 * (np.linalg.eigvalsh(h)[-1] + lam), "depth": 3000})
    np.testing.assert_allclose(ls, cg, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="solver"):
        scorers.influence_scores(v, gt, hvp, solver="newton")
    with pytest.raises(ValueError, match="depth"):
        scorers.influence_scores(v, gt, hvp, solver="lissa", lissa={"scale": 1.0})


def test_lissa_validates_inputs():
    hvp = lambda u: u  # noqa: E731
    v = jnp.ones((2, 3))
    for kw, field in [({"scale": 0.0}, "scale"), ({"depth": 0}, "depth"), ({"repeats": 0}, "repeats"),
                      ({"damping": -1.0}, "damping")]:
        with pytest.raises(ValueError, match=field):
            lissa.lissa_inverse_hvp(hvp, v, **{"damping": 0.0, "scale": 1.0, "depth": 5, **kw})
    with pytest.raises(ValueError, match="shape"):
        lissa.lissa_inverse_hvp(hvp, jnp.ones(3), damping=0.0, scale=1.0, depth=5)
