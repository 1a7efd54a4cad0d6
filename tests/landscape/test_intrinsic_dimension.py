"""Subspace training, the multi-run d90 searches and the paper's single-run search."""
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
    """∇_z L(θ0 + √(d/D) Φᵀz) = √(d/D) Φ ∇_θ L: no FWHT backward-scaling bug."""
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
    # P = √(d/D)Φᵀ: columns P e_j have norm ≈ 1 on average .
    columns = [jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(jnp.subtract, subspace.params(jnp.eye(16)[j]), theta0))]) for j in range(16)]
    norms = np.array([float(jnp.linalg.norm(c)) for c in columns])
    assert np.mean(norms ** 2) == pytest.approx(1.0, abs=0.25)


def test_full_dimension_subspace_reaches_the_full_training_loss(x64):
    """d = D with a dense (full-rank) Φ: the subspace reaches the full-space optimum (least squares on w,
    b = 0), like training θ directly does. A learning rate decaying to 0 lets Adam settle at the optimum
    instead of hovering around it at rounding-dependent distances."""
    loss_fn, theta0, batch = quadratic_problem(num_params=32)
    a, t = np.asarray(batch["a"]), np.asarray(batch["t"])
    w_opt = np.linalg.lstsq(a, t, rcond=None)[0]
    optimum = float(np.mean((a @ w_opt - t) ** 2))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(theta0))
    optimizer = optax.adam(optax.cosine_decay_schedule(5e-2, 3000))
    params, state = theta0, optimizer.init(theta0)
    step = jax.jit(lambda p, s: _adam_step(loss_fn, optimizer, p, s, batch))
    for _ in range(3000):
        params, state = step(params, state)
    assert float(loss_fn(params, batch)) == pytest.approx(optimum, rel=1e-4)
    subspace = idim.make_subspace("dense", num_params, theta0, jax.random.key(1))
    run = idim.train_subspace(loss_fn, subspace, optimizer, lambda i: batch, 3000, lambda p: float(loss_fn(p, batch)))
    assert run.metric == pytest.approx(optimum, rel=1e-4)
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
    assert again.num_runs == first.num_runs == first.num_trained and again.seconds == pytest.approx(first.seconds)
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
    # afjl with our segment sums: m a power of two dividing 128, m ≤ D = 70; the paper's slice takes any m ≤ D
    assert idim.accepted_dimension("afjl", 50, theta0, reduction="segsum") == 64
    assert idim.accepted_dimension("afjl", 100, theta0, reduction="segsum") == 64
    assert idim.accepted_dimension("afjl", 50, theta0) == 50
    assert idim.accepted_dimension("dense", 37, theta0) == 37


# ----------------------------------------------------------------------------------------------
# The single-run search (paper Sec. 4, App. B.5 Listing 9)
# ----------------------------------------------------------------------------------------------

def planted_regression(num_params=512, k=16, seed=0, count=256):
    """y = xᵀθ* with x in a random k-dimensional subspace of R^D: the loss depends on θ through k
    directions only, so a random d-dimensional subspace explains ≈ min(d, k)/k of the variance."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((num_params, k)))
    theta_star = rng.standard_normal(num_params)

    def sample(n):
        x = rng.standard_normal((n, k)) @ basis.T
        return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(x @ theta_star, jnp.float32)}

    train, test = sample(count), sample(count)

    def loss_fn(params, batch):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    variance = float(jnp.var(test["y"]))
    return loss_fn, {"w": jnp.zeros(num_params, jnp.float32)}, train, (lambda p: 1 - float(loss_fn(p, test)) / variance)


def _search(sketch="affd", checkpoint_path=None, batch_at=None, fingerprint=None, d_max=256, **kwargs):
    loss_fn, theta0, train, metric = planted_regression()
    subspace = idim.make_subspace(sketch, d_max, theta0, jax.random.key(1))
    options = dict(d_min=2, interval=50, delta=0.01, max_steps=3000)
    options.update(kwargs)
    return idim.single_run_search(loss_fn, subspace, optax.adam(0.1), batch_at or (lambda i: train), metric, 0.9,
                                  checkpoint_path=checkpoint_path, fingerprint=fingerprint, **options)


@pytest.mark.parametrize("sketch", ["affd", "qk", "ffd"])
def test_single_run_recovers_a_planted_dimension_within_a_factor_two(sketch):
    """k = 16: D* ∈ [8, 32]; the schedule doubles from d_min; the verification run at D*/2 stays below τ90."""
    result = _search(sketch)
    assert result.status == "found" and 8 <= result.d_star <= 32, (result.d_star, result.schedule)
    ds = [d for _, d in result.schedule]
    assert ds[0] == 2 and all(b == 2 * a for a, b in zip(ds, ds[1:])) and ds[-1] == result.d_star
    assert result.history[-1]["metric"] >= 0.9 > max(h["metric"] for h in result.history[:-1])
    assert result.num_steps == result.history[-1]["step"] and result.num_steps % 50 == 0
    # Coordinates never unmasked are exactly 0.
    np.testing.assert_array_equal(np.asarray(result.z[result.d_star:]), 0.0)
    loss_fn, theta0, train, metric = planted_regression()
    subspace = idim.make_subspace(sketch, 256, theta0, jax.random.key(1))
    check = idim.verification_run(loss_fn, subspace, optax.adam(0.1), lambda i: train, metric,
                                  result.d_star // 2, result.num_steps)
    assert check.metric < 0.9


def test_single_run_schedule_follows_the_listing_9_rule():
    """Every evaluation's decision (found / double / continue) is the one Listing 9 prescribes."""
    result = _search("dense", delta=0.02)
    for before, after in zip(result.history, result.history[1:]):
        decision, new_d = idim.next_dimension(after["d"], after["metric"], before["metric"], 0.9, 0.02, 256)
        nxt = result.history[result.history.index(after) + 1] if after is not result.history[-1] else None
        if decision == "found":
            assert nxt is None and result.d_star == after["d"]
        else:
            assert nxt is not None and nxt["d"] == new_d
    assert idim.next_dimension(8, 0.95, 0.5, 0.9, 0.1, 64) == ("found", 8)
    assert idim.next_dimension(8, 0.55, 0.5, 0.9, 0.1, 64) == ("double", 16)
    assert idim.next_dimension(8, 0.75, 0.5, 0.9, 0.1, 64) == ("continue", 8)
    assert idim.next_dimension(48, 0.5, 0.5, 0.9, 0.1, 64) == ("double", 64)
    assert idim.next_dimension(64, 0.5, 0.5, 0.9, 0.1, 64) == ("exhausted", 64)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1, momentum=0.9), optax.adam(0.05),
                                       optax.adamw(0.05, weight_decay=0.5)], ids=["momentum", "adam", "adamw"])
def test_masked_step_leaves_frozen_coordinates_unchanged(optimizer):
    """From a non-zero z and a warmed-up optimiser state (every coordinate has momentum), steps at d = 5
    change only coordinates 0…4, even with weight decay and momentum."""
    loss_fn, theta0, batch = quadratic_problem()
    subspace = idim.make_subspace("affd", 16, theta0, jax.random.key(0))
    step = idim.masked_step_fn(loss_fn, subspace, optimizer)
    z = jax.random.normal(jax.random.key(1), (16,)) * 0.1
    opt_state = optimizer.init(z)
    z, opt_state, _ = step(z, opt_state, batch, jnp.asarray(16, jnp.int32))  # all coordinates move once
    frozen = np.asarray(z[5:])
    for _ in range(5):
        z, opt_state, _ = step(z, opt_state, batch, jnp.asarray(5, jnp.int32))
        np.testing.assert_array_equal(np.asarray(z[5:]), frozen)
    assert np.all(np.abs(np.asarray(z[:5]) - np.asarray(
        step(z, opt_state, batch, jnp.asarray(16, jnp.int32))[0][:5])) > 0)


@pytest.mark.parametrize("mode", idim.STEP_MODES)
def test_masked_sgd_step_matches_a_dense_float64_reference(x64, mode):
    """z1 = z0 − η M_d √(d_max/D) Φ ∇θL(θ0 + √(d_max/D) Φᵀ z0) with Φ materialised as a matrix, for the
    explicit (Φ applied to ∇θL) and the implicit (autodiff through Φᵀ) gradient."""
    loss_fn, theta0, batch = quadratic_problem()
    subspace = idim.make_subspace("qk", 16, theta0, jax.random.key(2))
    z0 = jax.random.normal(jax.random.key(3), (16,), jnp.float64) * 0.1
    step = idim.masked_step_fn(loss_fn, subspace, optax.sgd(0.5), mode=mode)
    z1, _, _ = step(z0, optax.sgd(0.5).init(z0), batch, jnp.asarray(6, jnp.int32))
    layout = subspace.state.layout
    phi_t = np.asarray(jax.jit(jax.vmap(lambda e: layout.flatten(subspace.sketch.transpose(subspace.state, e))))(
        jnp.eye(16, dtype=jnp.float64))).T  # (D, 16) = Φᵀ
    theta = np.asarray(layout.flatten(theta0)) + subspace.scale * phi_t @ np.asarray(z0)
    grad_theta = np.asarray(layout.flatten(jax.grad(loss_fn)(layout.unflatten(jnp.asarray(theta)), batch)))
    expected = np.asarray(z0) - 0.5 * (np.arange(16) < 6) * subspace.scale * (phi_t.T @ grad_theta)
    np.testing.assert_allclose(np.asarray(z1), expected, rtol=1e-12, atol=1e-14)


_KILLED_CHILD = r"""
import sys, time
from tests.landscape.test_intrinsic_dimension import _search, planted_regression
train = planted_regression()[2]
def slow(i):
    time.sleep(0.01)
    return train
_search("affd", checkpoint_path=sys.argv[1], batch_at=slow, checkpoint_every=10, fingerprint={"run": "kill"})
"""


def test_single_run_resumes_after_sigkill(tmp_path):
    """A search in a subprocess is SIGKILLed mid-run; the rerun resumes from its last checkpoint
    (z, optimiser state, d, τ_old) and ends exactly where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = str(tmp_path / "search.npz")
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, path], cwd=repo, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, killed_at = time.time() + 90, None
    while time.time() < deadline and child.poll() is None:
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as data:
                step = json.loads(bytes(data["header"]).decode())["step"]
            if step >= 160:
                killed_at = step
                break
        time.sleep(0.02)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and killed_at is not None
    resumed = _search("affd", checkpoint_path=path, checkpoint_every=10, fingerprint={"run": "kill"})
    assert killed_at <= resumed.resumed_from < resumed.num_steps
    assert resumed.resumed_from % 10 == 0
    reference = _search("affd")
    assert (resumed.d_star, resumed.schedule, resumed.num_steps) == (reference.d_star, reference.schedule,
                                                                    reference.num_steps)
    np.testing.assert_allclose([h["metric"] for h in resumed.history], [h["metric"] for h in reference.history],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(resumed.z), np.asarray(reference.z), rtol=1e-5, atol=1e-6)
    assert resumed.seconds_total > resumed.seconds  # the killed call's time is counted
    # Rerunning a finished search trains nothing.
    again = _search("affd", checkpoint_path=path, checkpoint_every=10, fingerprint={"run": "kill"})
    assert again.resumed_from == again.num_steps == reference.num_steps and again.d_star == reference.d_star


def test_single_run_checkpoint_of_another_run_is_refused(tmp_path):
    import artifacts
    path = str(tmp_path / "search.npz")
    first = _search("affd", checkpoint_path=path, fingerprint={"learning_rate": 0.1}, max_steps=100)
    assert first.status == "budget" and first.num_steps == 100
    same = _search("affd", checkpoint_path=path, fingerprint={"learning_rate": 0.1}, max_steps=200)
    with pytest.raises(artifacts.FingerprintMismatchError, match="learning_rate"):
        _search("affd", checkpoint_path=path, fingerprint={"learning_rate": 0.2}, max_steps=100)
    with pytest.raises(artifacts.FingerprintMismatchError, match="interval"):
        _search("affd", checkpoint_path=path, fingerprint={"learning_rate": 0.1}, max_steps=200, interval=25)
    assert same.resumed_from == 100 and same.num_steps == 200  # a larger budget continues the run


def test_search_log_fingerprint_refuses_stale_points(tmp_path):
    """The stale-state bug: a log trained with 150 steps per d must not answer a 300-step search."""
    import artifacts
    log = str(tmp_path / "search.json")
    first = idim.doubling_search(monotone_curve(200), 0.9, d0=16, d_max=4096, log_path=log,
                                 fingerprint={"num_steps": 150})
    again = idim.doubling_search(monotone_curve(200), 0.9, d0=16, d_max=4096, log_path=log,
                                 fingerprint={"num_steps": 150})
    assert again.num_trained == 0 and again.d90 == first.d90
    with pytest.raises(artifacts.FingerprintMismatchError, match="num_steps"):
        idim.doubling_search(monotone_curve(200), 0.9, d0=16, d_max=4096, log_path=log, fingerprint={"num_steps": 300})
    with pytest.raises(artifacts.FingerprintMismatchError, match="num_steps"):
        idim.binary_search(monotone_curve(200), 0.9, lo=0, hi=4096, log_path=log, fingerprint={"num_steps": 300})
    # A log written without a fingerprint (the old format) cannot be trusted by a fingerprinted search.
    old = str(tmp_path / "old.json")
    idim.doubling_search(monotone_curve(200), 0.9, d0=16, d_max=4096, log_path=old)
    with pytest.raises(artifacts.FingerprintMismatchError):
        idim.doubling_search(monotone_curve(200), 0.9, d0=16, d_max=4096, log_path=old, fingerprint={"num_steps": 1})


def test_single_run_bad_arguments():
    with pytest.raises(ValueError, match="d_min must be <= the subspace dimension"):
        _search(d_min=512)
    with pytest.raises(ValueError, match="interval must be a positive int"):
        _search(interval=0)
    with pytest.raises(ValueError, match="delta must be a finite number"):
        _search(delta=float("nan"))
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        _search(max_steps=-1)
    with pytest.raises(ValueError, match="mode="):
        _search(mode="autodiff")
