"""PBRF influence equals the damped Gauss–Newton influence on a convex model; resumable store."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution import pbrf


def _problem(seed=0, n=40, d=4, c=3, q=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + q, d))
    y = rng.integers(0, c, size=n + q)
    train = {"x": jnp.asarray(x[:n]), "y": jnp.asarray(y[:n])}
    queries = {"x": jnp.asarray(x[n:]), "y": jnp.asarray(y[n:])}
    params = {"w": jnp.asarray(rng.normal(size=(d, c)) * 0.5), "b": jnp.asarray(rng.normal(size=c) * 0.1)}

    def outputs_fn(p, batch):
        return batch["x"] @ p["w"] + p["b"]

    def output_loss(logits, batch):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]

    def measurement(p):
        return output_loss(outputs_fn(p, queries), queries)

    return train, queries, params, outputs_fn, output_loss, measurement


def _dense_influence(train, queries, params, outputs_fn, output_loss, damping):
    """∇fᵀ (G + λI)⁻¹ ∇L in float64 with the dense Hessian of the mean loss (= G: the model is linear)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    mean_loss = lambda v: jnp.mean(output_loss(outputs_fn(unravel(v), train), train))  # noqa: E731
    h = jax.hessian(mean_loss)(flat)
    per_ex = lambda v, b: output_loss(outputs_fn(unravel(v), b), b)[0]  # noqa: E731
    one = lambda tree: jax.tree_util.tree_map(lambda a: a[:, None], tree)  # noqa: E731
    gq = jax.vmap(jax.grad(per_ex), (None, 0))(flat, one(queries))
    gt = jax.vmap(jax.grad(per_ex), (None, 0))(flat, one(train))
    return np.asarray(gq @ np.linalg.solve(h + damping * np.eye(flat.size), gt.T))


import jax.flatten_util  # noqa: E402


def test_pbrf_equals_damped_gauss_newton_influence(x64):
    train, queries, params, outputs_fn, output_loss, measurement = _problem()
    lam = 0.05
    exact = _dense_influence(train, queries, params, outputs_fn, output_loss, lam)
    examples = [0, 3, 7, 11, 19]
    res = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, examples, damping=lam,
                              epsilon=1e-5, num_steps=500, optimizer="sgd", learning_rate=1.0, chunk_size=3)
    assert res.scores.shape == (5, 5) and res.residuals.max() < 1e-9
    # the central difference's O(ε²) bias is ≈ 50 ε² relative here
    np.testing.assert_allclose(res.scores, exact[:, examples], rtol=1e-7, atol=1e-8 * np.abs(exact).max())
    lbfgs = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, examples[:2], damping=lam,
                                epsilon=1e-5, num_steps=40, optimizer="lbfgs", learning_rate=None, chunk_size=2)
    np.testing.assert_allclose(lbfgs.scores, exact[:, examples[:2]], rtol=1e-7, atol=1e-8 * np.abs(exact).max())


def test_pbrf_central_difference_converges_quadratically(x64):
    """Error vs the ε → 0 limit shrinks like ε² (central difference), and both signs are solved."""
    train, queries, params, outputs_fn, output_loss, measurement = _problem(seed=1)
    lam = 0.1
    exact = _dense_influence(train, queries, params, outputs_fn, output_loss, lam)[:, :4]
    errors = []
    for eps in (0.04, 0.02, 0.01):
        res = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, range(4), damping=lam,
                                  epsilon=eps, num_steps=500, optimizer="sgd", learning_rate=1.0, chunk_size=4)
        errors.append(np.abs(res.scores - exact).max())
        # the two solutions move the query losses in opposite directions (first order)
        assert np.all(np.sign(res.measurements_plus - measurement(params)) ==
                      -np.sign(res.measurements_minus - measurement(params)))
    assert errors[0] > errors[1] > errors[2] > 0
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 3.0) & (ratios < 5.0)), (errors, ratios)


def test_pbrf_adam_minibatch_close_to_exact(x64):
    """The stochastic Adam path (mini-batches shared by ±ε) approximates the exact value."""
    train, queries, params, outputs_fn, output_loss, measurement = _problem(seed=2)
    lam = 0.1
    exact = _dense_influence(train, queries, params, outputs_fn, output_loss, lam)[:, :4]
    res = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, range(4), damping=lam,
                              epsilon=1e-3, num_steps=400, optimizer="adam", learning_rate=0.05, batch_size=20,
                              chunk_size=4)
    corr = np.corrcoef(res.scores.ravel(), exact.ravel())[0, 1]
    assert corr > 0.97, corr
    full = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, range(4), damping=lam,
                               epsilon=1e-3, num_steps=400, optimizer="sgd", learning_rate=0.5, chunk_size=4)
    np.testing.assert_allclose(full.scores, exact, rtol=1e-3, atol=1e-3 * np.abs(exact).max())


def test_pbrf_store_resumes_and_rejects_other_settings(tmp_path, x64):
    train, queries, params, outputs_fn, output_loss, measurement = _problem(seed=3)
    store = str(tmp_path / "pbrf")
    kw = dict(damping=0.1, epsilon=1e-3, num_steps=200, optimizer="sgd", learning_rate=1.0, chunk_size=2,
              store=store, fingerprint={"model": "logreg"})
    first = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, [1, 2, 5], **kw)
    files = sorted(f for f in os.listdir(store) if f.startswith("example_"))
    assert files == ["example_0000001.npz", "example_0000002.npz", "example_0000005.npz"]
    # a stored result is reused (not recomputed): tamper with one and read it back
    with np.load(os.path.join(store, files[0])) as data:
        row = {k: data[k] for k in data.files}
    row["scores"] = row["scores"] + 123.0
    np.savez(os.path.join(store, files[0]), **row)
    second = pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, [5, 1, 7], **kw)
    np.testing.assert_allclose(second.scores[:, 0], first.scores[:, 2])
    np.testing.assert_allclose(second.scores[:, 1], first.scores[:, 0] + 123.0)
    assert os.path.exists(os.path.join(store, "example_0000007.npz"))
    assert json.load(open(os.path.join(store, "fingerprint.json")))["fields"]["fingerprint"] == {"model": "logreg"}
    with pytest.raises(pbrf.PBRFStoreMismatchError, match="damping"):
        pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, [1], **{**kw, "damping": 0.2})
    with pytest.raises(pbrf.PBRFStoreMismatchError, match="fingerprint"):
        pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, [1], **{**kw, "fingerprint": "x"})


def test_pbrf_validates_inputs(x64):
    train, queries, params, outputs_fn, output_loss, measurement = _problem()
    call = lambda **kw: pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, [0],  # noqa: E731
                                            **{"damping": 0.1, **kw})
    with pytest.raises(ValueError, match="damping"):
        call(damping=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        call(optimizer="newton")
    with pytest.raises(ValueError, match="epsilon"):
        call(epsilon=-1e-3)
    with pytest.raises(ValueError, match="lbfgs"):
        call(optimizer="lbfgs", batch_size=10)
    with pytest.raises(ValueError, match="examples"):
        pbrf.pbrf_influence(outputs_fn, output_loss, params, train, measurement, [40], damping=0.1)
