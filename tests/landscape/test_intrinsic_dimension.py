"""Subspace training and the d90 searches (LANDSCAPE.md §10 tests 20–24; issue 6)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape import intrinsic_dimension as idim


def quadratic_problem(num_params=64, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((96, num_params))
    target = rng.standard_normal(96)
    theta0 = {"w": jnp.asarray(rng.standard_normal(num_params) * 0.1),
              "b": jnp.asarray(rng.standard_normal((2, 3)) * 0.1)}

    def loss_fn(params, batch):
        flat = jnp.concatenate([params["w"], params["b"].ravel()])[:num_params]
        return jnp.mean((batch["a"] @ flat - batch["t"]) ** 2) + jnp.sum(params["b"] ** 2)

    return loss_fn, theta0, {"a": jnp.asarray(a), "t": jnp.asarray(target)}


@pytest.mark.parametrize("name", ["dense", "ffd", "affd", "afjl", "qk"])
def test_gradient_wrt_z_is_the_sketched_gradient(x64, name):
    """∇_z L(θ0 + √(d/D) Φᵀz) = √(d/D) Φ ∇_θ L: no FWHT scaling bug (LANDSCAPE §7.4)."""
    loss_fn, theta0, batch = quadratic_problem()
    subspace = idim.make_subspace(name, 16, theta0, jax.random.key(3))
    z = jax.random.normal(jax.random.key(4), (16,), jnp.float64) * 0.1
    grad_z = jax.grad(lambda w: loss_fn(subspace.params(w), batch))(z)
    grad_theta = jax.grad(loss_fn)(subspace.params(z), batch)
    expected = subspace.scale * subspace.sketch.apply(subspace.state, grad_theta)
    np.testing.assert_allclose(grad_z, expected, rtol=1e-10, atol=1e-12)
    # Central finite differences along two coordinates.
    for i in (0, 7):
        e = jnp.zeros(16).at[i].set(1e-6)
        fd = (loss_fn(subspace.params(z + e), batch) - loss_fn(subspace.params(z - e), batch)) / 2e-6
        assert float(fd) == pytest.approx(float(grad_z[i]), rel=1e-6, abs=1e-9)


def test_zero_offset_is_the_initial_model_and_columns_have_unit_norm(x64):
    _, theta0, _ = quadratic_problem()
    subspace = idim.make_subspace("affd", 16, theta0, jax.random.key(0))
    same = subspace.params(subspace.zeros())
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(theta0)):
        np.testing.assert_array_equal(a, b)
    # P = √(d/D)Φᵀ: columns P e_j have norm ≈ 1 on average (LANDSCAPE test 21).
    columns = [jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(jnp.subtract, subspace.params(jnp.eye(16)[j]), theta0))]) for j in range(16)]
    norms = np.array([float(jnp.linalg.norm(c)) for c in columns])
    assert np.mean(norms ** 2) == pytest.approx(1.0, abs=0.25)


def test_full_dimension_subspace_reaches_the_full_training_loss(x64):
    """d = D with a dense (full-rank) Φ: the subspace can reach the full-space optimum."""
    loss_fn, theta0, batch = quadratic_problem(num_params=32)
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(theta0))
    flat_opt = optax.adam(5e-2)
    params, state = theta0, flat_opt.init(theta0)
    step = jax.jit(lambda p, s: _adam_step(loss_fn, flat_opt, p, s, batch))
    for _ in range(3000):
        params, state = step(params, state)
    full_loss = float(loss_fn(params, batch))
    subspace = idim.make_subspace("dense", num_params, theta0, jax.random.key(1))
    run = idim.train_subspace(loss_fn, subspace, optax.adam(5e-2), lambda i: batch, 3000,
                              lambda p: float(loss_fn(p, batch)))
    assert run.metric == pytest.approx(full_loss, rel=1e-3, abs=1e-6)
    assert run.seconds_per_step > 0


def _adam_step(loss_fn, optimizer, params, state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def monotone_curve(d90_true, noise=0.0, seed=0):
    """metric(d) = logistic in log2 d, crossing 0.9 at d90_true."""
    rng = np.random.default_rng(seed)

    def train_at(d, s):
        x = math.log2(d) - math.log2(d90_true - 0.5)  # crosses 0.9 between d90_true − 1 and d90_true
        return 1 / (1 + math.exp(-4 * x - math.log(9))) + noise * rng.standard_normal()

    return train_at


def test_searches_bracket_a_monotone_curve():
    for true in (37, 100, 300, 1500):
        result = idim.doubling_search(monotone_curve(true), 0.9, d0=16, d_max=1 << 14)
        low, high = result.bracket
        assert low < true <= high and high / low <= 1.1 + 1e-9, (true, result.bracket)
        binary = idim.binary_search(monotone_curve(true), 0.9, lo=0, hi=1 << 14)
        assert binary.d90 == true


def test_search_resumes_without_retraining(tmp_path):
    calls = []

    def train_at(d, seed):
        calls.append((d, seed))
        return monotone_curve(200)(d, seed)

    log = str(tmp_path / "search.json")
    first = idim.doubling_search(train_at, 0.9, d0=16, d_max=4096, seeds=(0, 1), log_path=log)
    assert first.num_trained == len(calls) == len(set(calls))
    calls.clear()
    again = idim.doubling_search(train_at, 0.9, d0=16, d_max=4096, seeds=(0, 1), log_path=log)
    assert calls == [] and again.num_trained == 0 and again.d90 == first.d90
    with open(log) as f:
        assert len(json.load(f)["points"]) == first.num_trained
    # A search interrupted after 3 points resumes from them.
    partial = str(tmp_path / "partial.json")
    budget = {"left": 3}

    def interrupted(d, seed):
        if budget["left"] == 0:
            raise KeyboardInterrupt
        budget["left"] -= 1
        return monotone_curve(200)(d, seed)

    with pytest.raises(KeyboardInterrupt):
        idim.doubling_search(interrupted, 0.9, d0=16, d_max=4096, log_path=partial)
    calls.clear()
    resumed = idim.doubling_search(train_at, 0.9, d0=16, d_max=4096, log_path=partial)
    assert resumed.num_trained == len(calls) and all(d > 64 for d, _ in calls)


def test_planted_dimension_found_within_a_factor_two():
    """Linear regression whose loss depends on a k = 16 subspace: d90 ∈ [k/2, 2k]."""
    from configs import intrinsic_dimension as config_module
    from experiments import intrinsic_dimension as experiment

    config = config_module.get_config("quick")
    config.search.num_steps = 150
    task = experiment.planted_task(config)
    full = experiment.full_training_metric(task, 150, config.search.full_learning_rate)
    assert full > 0.99
    train_at = experiment.subspace_trainer(task, "affd", config)
    result = idim.doubling_search(train_at, 0.9 * full, d0=4, d_max=1024)
    assert 8 <= result.d90 <= 32


def test_bad_arguments():
    _, theta0, _ = quadratic_problem()
    with pytest.raises(ValueError, match="d must be a positive int"):
        idim.make_subspace("affd", 0, theta0, jax.random.key(0))
    with pytest.raises(ValueError, match="target_metric must be a finite number"):
        idim.doubling_search(monotone_curve(10), None, d_max=100)
    with pytest.raises(ValueError, match="d0 must be an int"):
        idim.doubling_search(monotone_curve(10), 0.9, d0=0, d_max=100)
    with pytest.raises(ValueError, match="lo < hi"):
        idim.binary_search(monotone_curve(10), 0.9, lo=5, hi=5)
    assert idim.accepted_dimension("afjl", 50, theta0) == 64  # afjl: m a power of two dividing 128, m ≤ D = 70
    assert idim.accepted_dimension("afjl", 100, theta0) == 64
    assert idim.accepted_dimension("dense", 37, theta0) == 37
