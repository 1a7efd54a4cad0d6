"""The softmax-CE Gauss–Newton operator equals Jᵀ(diag p − ppᵀ)J built densely in float64, is PSD,
and power iteration finds its largest eigenvalue."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from landscape import softmax_ggn_matvec, top_eigenvalue


def _problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=(3,)))}
    x = jnp.asarray(rng.normal(size=(5, 4)))
    weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(5,)))

    def logits_fn(p):
        return jnp.tanh(x @ p["w"]) + p["b"]  # nonlinear in θ: the GGN differs from the Hessian

    return params, logits_fn, weights


def _dense_ggn(params, logits_fn, weights):
    flat, unravel = ravel_pytree(params)
    jac = jax.jacfwd(lambda f: logits_fn(unravel(f)))(flat)  # (N, C, D)
    probs = jax.nn.softmax(logits_fn(params), axis=-1)
    out = np.zeros((flat.size, flat.size))
    for n in range(jac.shape[0]):
        h = np.diag(probs[n]) - np.outer(probs[n], probs[n])
        out += float(weights[n]) * np.asarray(jac[n]).T @ h @ np.asarray(jac[n])
    return out


def test_ggn_matvec_equals_dense_reference(x64):
    params, logits_fn, weights = _problem()
    dense = _dense_ggn(params, logits_fn, weights)
    matvec = softmax_ggn_matvec(logits_fn, params, weights)
    v = np.random.default_rng(1).normal(size=(3, dense.shape[0]))
    np.testing.assert_allclose(np.asarray(matvec(jnp.asarray(v))), v @ dense.T, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(dense).min() > -1e-12  # PSD
    with pytest.raises(ValueError, match="weights"):
        softmax_ggn_matvec(logits_fn, params, weights[:3])


def test_power_iteration_reaches_the_top_eigenvalue(x64):
    params, logits_fn, weights = _problem()
    dense = _dense_ggn(params, logits_fn, weights)
    top = np.linalg.eigvalsh(dense)[-1]
    rows = softmax_ggn_matvec(logits_fn, params, weights)
    estimate = top_eigenvalue(lambda v: rows(v[None])[0], dense.shape[0], num_iters=300, key=jax.random.key(0),
                              dtype=jnp.float64)
    assert estimate <= top * (1 + 1e-9)
    assert estimate == pytest.approx(top, rel=1e-3)
    rayleigh = top_eigenvalue(lambda v: rows(v[None])[0], dense.shape[0], num_iters=300, key=jax.random.key(0),
                              estimate="rayleigh", dtype=jnp.float64)
    assert rayleigh == pytest.approx(top, rel=1e-6)  # the Rayleigh quotient converges at twice the rate
    with pytest.raises(FloatingPointError, match="non-finite"):
        top_eigenvalue(lambda v: v * jnp.nan, 3, num_iters=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="estimate"):
        top_eigenvalue(lambda v: v, 3, num_iters=2, key=jax.random.key(0), estimate="max")
