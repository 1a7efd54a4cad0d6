"""Sketched gradients and HVPs against dense float64 references on a small MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sketching


def mlp_problem(dtype=jnp.float64, batch=6):
    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        "l1": {"w": jax.random.normal(keys[0], (5, 8), dtype) / 2, "b": jax.random.normal(keys[1], (8,), dtype) / 4},
        "l2": {"w": jax.random.normal(keys[2], (8, 3), dtype) / 3, "b": jnp.zeros((3,), dtype)},
    }
    data = {"x": jax.random.normal(keys[3], (batch, 5), dtype), "y": jax.random.randint(keys[4], (batch,), 0, 3)}

    def loss_fn(p, b):
        h = jnp.tanh(b["x"] @ p["l1"]["w"] + p["l1"]["b"])
        logits = h @ p["l2"]["w"] + p["l2"]["b"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, b["y"][:, None], axis=1))

    return params, data, loss_fn


def sketch_matrix(sketch, state, params):
    """Φ as an explicit m×D matrix (columns are images of basis vectors), for references only."""
    flat, unravel = ravel_pytree(params)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    return jax.vmap(lambda e: sketch.apply(state, unravel(e)))(basis).T


SKETCHES = ["dense", "fjl", "affd", "afjl", "qk", "sjlt"]


@pytest.mark.parametrize("name", SKETCHES)
def test_implicit_equals_explicit_equals_dense_reference(name, x64):
    params, data, loss_fn = mlp_problem()
    sketch = sketching.get(name, 16)
    state = sketch.init(jax.random.key(1), params)
    explicit = sketching.sketch_gradient(sketch, state, loss_fn, params, data, mode="explicit")
    implicit = jax.jit(lambda p: sketching.sketch_gradient(sketch, state, loss_fn, p, data, mode="implicit"))(params)
    flat_grad = ravel_pytree(jax.grad(loss_fn)(params, data))[0]
    reference = sketch_matrix(sketch, state, params) @ flat_grad
    np.testing.assert_allclose(explicit, reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(implicit, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["afjl", "qk"])
def test_implicit_equals_explicit_float32(name):
    params, data, loss_fn = mlp_problem(jnp.float32)
    sketch = sketching.get(name, 16)
    state = sketch.init(jax.random.key(1), params)
    e = sketching.sketch_gradient(sketch, state, loss_fn, params, data, mode="explicit")
    i = sketching.sketch_gradient(sketch, state, loss_fn, params, data, mode="implicit")
    assert jnp.linalg.norm(e - i) <= 1e-4 * jnp.linalg.norm(e)


@pytest.mark.parametrize("mode", sketching.MODES)
def test_per_example_gradients(mode, x64):
    params, data, loss_fn = mlp_problem()
    sketch = sketching.get("afjl", 16)
    state = sketch.init(jax.random.key(2), params)
    ys = sketching.sketch_per_example_gradients(sketch, state, loss_fn, params, data, mode=mode)
    chunked = sketching.sketch_per_example_gradients(sketch, state, loss_fn, params, data, mode=mode, chunk_size=4)
    plain = sketching.per_example_gradients(loss_fn, params, data)
    phi = sketch_matrix(sketch, state, params)
    for i in range(data["y"].shape[0]):
        one = jax.tree_util.tree_map(lambda a: a[i:i + 1], data)
        g = ravel_pytree(jax.grad(loss_fn)(params, one))[0]
        np.testing.assert_allclose(ys[i], phi @ g, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(chunked[i], phi @ g, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], plain))[0], g, rtol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        sketching.sketch_gradient(sketch, state, loss_fn, params, data, mode="forward")


def test_hvp_and_sketched_hvp_match_dense_hessian(x64):
    params, data, loss_fn = mlp_problem()
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: loss_fn(unravel(f), data))(flat)
    v = jax.random.normal(jax.random.key(3), flat.shape, jnp.float64)
    hv = ravel_pytree(sketching.hvp(loss_fn, params, data, unravel(v)))[0]
    np.testing.assert_allclose(hv, hessian @ v, rtol=1e-10, atol=1e-12)
    for name in ["afjl", "qk", "affd"]:
        sketch = sketching.get(name, 16)
        state = sketch.init(jax.random.key(4), params)
        phi = sketch_matrix(sketch, state, params)
        np.testing.assert_allclose(sketching.sketch_hvp(sketch, state, loss_fn, params, data, unravel(v)), phi @ hessian @ v, rtol=1e-10, atol=1e-12)
        # ∇²_ω L(θ + Φᵀω)|₀ = Φ H Φᵀ (the m×m operator Lanczos runs on)
        operator = sketching.sketched_hessian_operator(sketch, state, loss_fn, params, data)
        u = jax.random.normal(jax.random.key(5), (16,), jnp.float64)
        np.testing.assert_allclose(operator(u), phi @ hessian @ phi.T @ u, rtol=1e-9, atol=1e-11)
