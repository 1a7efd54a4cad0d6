"""Lanczos / Arnoldi / HVP operators against dense float64 references (tests 1–11)."""
import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import landscape
import sketching
from landscape.lanczos import direct_residuals, tridiagonal_from_hessenberg


def dense_operator(matrix):
    matrix = jnp.asarray(matrix)
    return lambda v: {"w": matrix @ v["w"]}


def template_of(size, dtype=jnp.float64):
    return {"w": jnp.zeros((size,), dtype)}


def random_symmetric(rng, size, definite):
    a = rng.standard_normal((size, size))
    return a @ a.T / size if definite else (a + a.T) / 2


def rotated_diagonal_operator(diagonal, seed):
    """A = Q diag(λ) Qᵀ with Q = S H / √D (random signs S, Sylvester Hadamard H): dense, delocalised
    eigenvectors (column j of Q) as in network Hessians, at the cost of two dense matvecs."""
    size = diagonal.size
    h = jnp.asarray(scipy.linalg.hadamard(size) / np.sqrt(size))
    signs = jnp.asarray(np.random.default_rng(seed).choice([-1.0, 1.0], size))
    lam = jnp.asarray(diagonal)
    matvec = jax.jit(lambda v: {"w": signs * (h @ (lam * (h @ (signs * v["w"]))))})
    return matvec, lambda j: signs * h[:, j]


def planted_diagonal(rng, size, outliers, negative_fraction=0.0):
    """Bulk uniform on [0, 1] (a `negative_fraction` of it on [−0.5, 0]) plus `outliers` values 20..200."""
    bulk = rng.uniform(0.0, 1.0, size - len(outliers))
    num_negative = int(round(negative_fraction * size))
    bulk[:num_negative] = rng.uniform(-0.5, 0.0, num_negative)
    return np.concatenate([bulk, outliers])


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(12)(x)))


def tiny_problem(num_examples=32):
    """A 2-layer MLP with D = 4·12 + 12 + 12·3 + 3 = 99 parameters and a cross-entropy loss (float64)."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (num_examples, 4), jnp.float64)
    y = jnp.arange(num_examples) % 3
    model = TinyMLP()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(1), x[:1])["params"])

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch["x"])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1))

    return loss_fn, params, {"x": x, "y": y}


def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


# ----------------------------------------------------------------------------------------------
# Operators (tests 1–3)
# ----------------------------------------------------------------------------------------------

def test_hvp_fn_matches_dense_hessian_and_batching(x64):
    loss_fn, params, batch = tiny_problem()
    hessian = dense_hessian(loss_fn, params, batch)
    flat_v = jax.random.normal(jax.random.key(2), (hessian.shape[0],), jnp.float64)
    _, unravel = ravel_pytree(params)
    full = landscape.hvp_fn(loss_fn, params, [batch])
    # Uneven batches (20 + 12) weighted by size equal the full-batch operator.
    split = [jax.tree_util.tree_map(lambda a: a[:20], batch), jax.tree_util.tree_map(lambda a: a[20:], batch)]
    batched = landscape.hvp_fn(loss_fn, params, split)
    reference = hessian @ flat_v
    scale = np.linalg.norm(hessian, 2) * np.linalg.norm(flat_v)
    got_full = ravel_pytree(full(unravel(flat_v)))[0]
    got_batched = ravel_pytree(batched(unravel(flat_v)))[0]
    assert np.max(np.abs(got_full - reference)) <= 1e-10 * scale
    assert np.max(np.abs(got_batched - got_full)) <= 1e-12 * scale
    u = jax.random.normal(jax.random.key(3), flat_v.shape, jnp.float64)
    hu = ravel_pytree(full(unravel(u)))[0]
    assert abs(float(u @ got_full - flat_v @ hu)) <= 1e-10 * np.linalg.norm(hessian, 2) * np.linalg.norm(u) * np.linalg.norm(flat_v)
    gradient = ravel_pytree(landscape.mean_gradient(loss_fn, params, split))[0]
    np.testing.assert_allclose(gradient, ravel_pytree(jax.grad(loss_fn)(params, batch))[0], atol=1e-14)


def test_hvp_fn_rejects_bad_batches(x64):
    loss_fn, params, batch = tiny_problem()
    with pytest.raises(ValueError, match="non-empty sequence"):
        landscape.hvp_fn(loss_fn, params, batch)  # a dict, not a list of batches
    with pytest.raises(ValueError, match="non-empty sequence"):
        landscape.hvp_fn(loss_fn, params, [])


# ----------------------------------------------------------------------------------------------
# Lanczos and Arnoldi (tests 4–11)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("definite", [True, False])
def test_full_dimension_lanczos_reproduces_the_spectrum(x64, definite):
    rng = np.random.default_rng(0)
    a = random_symmetric(rng, 48, definite)
    result = landscape.lanczos(dense_operator(a), template_of(48), 48, jax.random.key(0))
    exact = np.sort(np.linalg.eigvalsh(a))[::-1]
    assert result.num_iters == 48 and not result.breakdown
    np.testing.assert_allclose(result.eigenvalues, exact, atol=1e-8 * np.linalg.norm(a, 2))
    # eigenvectors as a PyTree with a leading axis, unit norm, A y = θ y.
    vectors = result.eigenvectors["w"]
    assert vectors.shape == (48, 48)
    np.testing.assert_allclose(vectors @ a @ vectors.T, np.diag(result.eigenvalues), atol=1e-8 * np.linalg.norm(a, 2))


def test_orthogonality_three_term_relation_and_residual_certificate(x64):
    rng = np.random.default_rng(1)
    size, steps = 2000, 100
    a = np.diag(planted_diagonal(rng, size, np.linspace(20, 200, 10)))
    norm = np.abs(a).max()
    result = landscape.lanczos(dense_operator(a), template_of(size), steps, jax.random.key(1))
    v = np.asarray(result.basis[:steps])
    assert np.max(np.abs(v @ v.T - np.eye(steps))) <= 1e-10
    t = result.tridiagonal
    e_last = np.zeros(steps)
    e_last[-1] = 1.0
    v_next = np.asarray(result.basis[steps])
    relation = a @ v.T - v.T @ t - result.betas[-1] * np.outer(v_next, e_last)
    assert np.linalg.norm(relation) <= 1e-10 * norm
    top = result.ritz_vectors(np.arange(10))
    direct = np.linalg.norm(np.asarray(top) @ a - result.eigenvalues[:10, None] * np.asarray(top), axis=1)
    np.testing.assert_allclose(direct, result.residual_norms[:10], rtol=1e-6, atol=1e-10 * norm)
    assert np.all(result.residual_norms[:10] < 1e-6 * norm)  # the outliers are converged


def test_without_reorthogonalisation_orthogonality_is_lost_and_ghosts_appear(x64):
    """Documents why re-orthogonalisation is needed: plain Lanczos loses orthogonality once the outliers converge."""
    rng = np.random.default_rng(1)
    size, steps = 2000, 100
    a = np.diag(planted_diagonal(rng, size, np.linspace(20, 200, 10)))
    plain = landscape.lanczos(dense_operator(a), template_of(size), steps, jax.random.key(1), reorthogonalize=False)
    v = np.asarray(plain.basis[:steps])
    assert np.max(np.abs(v @ v.T - np.eye(steps))) >= 1e-2
    top = plain.eigenvalues[:20]
    ghosts = np.sum(np.abs(top[:, None] - np.linspace(20, 200, 10)[None, :]) < 1e-6, axis=0)
    assert ghosts.max() >= 2  # at least one outlier appears twice


def test_planted_spectrum_outliers_recovered(x64):
    rng = np.random.default_rng(2)
    outliers = np.linspace(20, 200, 10)
    diagonal = planted_diagonal(rng, 5000, outliers)
    result = landscape.lanczos(dense_operator(np.diag(diagonal)), template_of(5000), 60, jax.random.key(2))
    np.testing.assert_allclose(result.top(10), outliers[::-1], rtol=1e-6)
    assert landscape.gap_outlier_count(result.eigenvalues) == 10
    # Dense rotated version Q diag Qᵀ on a smaller D: same recovery.
    q, _ = np.linalg.qr(rng.standard_normal((400, 400)))
    diagonal = planted_diagonal(rng, 400, outliers)
    rotated = landscape.lanczos(dense_operator(q @ np.diag(diagonal) @ q.T), template_of(400), 60, jax.random.key(3))
    np.testing.assert_allclose(rotated.top(10), outliers[::-1], rtol=1e-6)
    np.testing.assert_allclose(rotated.bottom(1), diagonal.min(), atol=2e-2)


def test_breakdown_on_few_distinct_eigenvalues_and_bad_sizes(x64):
    values = np.repeat([1.0, 2.0, 3.0, 5.0, 8.0], 40)
    result = landscape.lanczos(dense_operator(np.diag(values)), template_of(200), 30, jax.random.key(4))
    assert result.breakdown and result.num_iters == 5
    np.testing.assert_allclose(result.eigenvalues, [8.0, 5.0, 3.0, 2.0, 1.0], rtol=1e-10)
    assert np.all(np.isfinite(result.hessenberg)) and np.all(np.isfinite(np.asarray(result.basis)))
    with pytest.raises(ValueError, match="exceeds the number of parameters D = 200"):
        landscape.lanczos(dense_operator(np.diag(values)), template_of(200), 201, jax.random.key(4))
    with pytest.raises(ValueError, match="num_iters must be a positive int"):
        landscape.lanczos(dense_operator(np.diag(values)), template_of(200), 0, jax.random.key(4))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
        result.top(6)


def test_non_symmetric_operator_is_detected(x64):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((60, 60))
    with pytest.raises(ValueError, match="not symmetric"):
        landscape.lanczos(dense_operator(a), template_of(60), 20, jax.random.key(5))
    # Arnoldi accepts it: the Hessenberg relation A V_k = V_{k+1} H holds.
    result = landscape.arnoldi(dense_operator(a), template_of(60), 20, jax.random.key(5))
    v = np.asarray(result.basis)
    assert np.linalg.norm(a @ v[:20].T - v.T @ result.hessenberg) <= 1e-10 * np.linalg.norm(a, 2)


def test_arnoldi_on_symmetric_reproduces_lanczos(x64):
    rng = np.random.default_rng(6)
    a = random_symmetric(rng, 80, definite=False)
    start = {"w": jnp.asarray(rng.standard_normal(80))}
    lanczos_result = landscape.lanczos(dense_operator(a), template_of(80), 30, jax.random.key(0), start=start)
    arnoldi_result = landscape.arnoldi(dense_operator(a), template_of(80), 30, jax.random.key(0), start=start)
    square = arnoldi_result.hessenberg[:30, :30]
    band = np.triu(np.tril(square, 1), -1)
    np.testing.assert_allclose(0.5 * (band + band.T), lanczos_result.tridiagonal, atol=1e-10 * np.linalg.norm(a, 2))
    np.testing.assert_allclose(arnoldi_result.eigenvalues, lanczos_result.eigenvalues, atol=1e-10 * np.linalg.norm(a, 2))
    assert np.allclose(tridiagonal_from_hessenberg(arnoldi_result.hessenberg, 30), lanczos_result.tridiagonal)


def test_network_hessian_top_and_bottom_eigenvalues(x64):
    """A real (tiny) network: Lanczos extremes equal eigh of the dense Hessian to 1e-6 relative."""
    loss_fn, params, batch = tiny_problem()
    hessian = np.asarray(dense_hessian(loss_fn, params, batch))
    exact = np.sort(np.linalg.eigvalsh(hessian))[::-1]
    result = landscape.lanczos(landscape.hvp_fn(loss_fn, params, [batch]), params, 60, jax.random.key(7))
    scale = np.abs(exact).max()
    np.testing.assert_allclose(result.top(3), exact[:3], rtol=1e-6)
    np.testing.assert_allclose(result.bottom(2), exact[::-1][:2], atol=1e-6 * scale)
    assert landscape.rneg(result.eigenvalues) == pytest.approx(max(-exact[-1], 0) / exact[0], rel=1e-6)


def test_float32_matvec_with_float64_scalars(x64):
    """float32 HVPs + float64 Krylov arithmetic vs all-float64 (observed ≈ 1e-7)."""
    rng = np.random.default_rng(8)
    a = random_symmetric(rng, 300, definite=False)
    full = landscape.lanczos(dense_operator(a), template_of(300), 80, jax.random.key(8))
    a32 = jnp.asarray(a, jnp.float32)
    mixed = landscape.lanczos(lambda v: {"w": a32 @ v["w"]}, template_of(300, jnp.float32), 80, jax.random.key(8))
    assert mixed.basis.dtype == jnp.float64
    np.testing.assert_allclose(mixed.top(2), full.top(2), rtol=1e-5)
    np.testing.assert_allclose(mixed.bottom(2), full.bottom(2), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sketched Krylov basis
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dense", "afjl", "qk"])
def test_sketched_basis_top_eigenvalues(x64, name):
    """Lanczos on Φ A Φᵀ (basis in R^m): the top eigenvalues of a planted spectrum (delocalised
    eigenvectors) within the shift |tr A − λ|/m plus three fluctuations 3‖A‖_F/√m of the sketched operator's JL analysis
    (≈ 20% for λ = 200, 30% for λ = 120 at m = 1024, D = 4096; 10 outliers 20..200, bulk uniform on [0, 1]);
    the mean error of the top 5 stays below 10%."""
    rng = np.random.default_rng(9)
    size, m = 4096, 1024
    outliers = np.linspace(20, 200, 10)
    diagonal = planted_diagonal(rng, size, outliers)
    matvec, eigenvector = rotated_diagonal_operator(diagonal, seed=9)
    sketch = sketching.get(name, m)
    result = landscape.lanczos(matvec, template_of(size), 40, jax.random.key(10), sketch=sketch)
    assert result.sketched and result.basis.shape == (41, m)
    errors = landscape.relative_errors(result.eigenvalues, outliers, 5)
    top = np.sort(outliers)[::-1][:5]
    bound = (np.abs(diagonal.sum() - top) / m + 3 * np.linalg.norm(diagonal) / np.sqrt(m)) / top
    assert np.all(errors < bound), (errors, bound)
    assert errors.mean() < 0.10, errors
    # Eigenvectors come back in sketch space, orthonormal.
    u = np.asarray(result.eigenvectors[:10])
    np.testing.assert_allclose(u @ u.T, np.eye(10), atol=1e-8)
    # A gradient along the top eigenvector is (nearly) fully aligned with the sketched top-10 space.
    g = {"w": eigenvector(size - 1)}
    assert landscape.gradient_alignment(result, g, 10) > 0.9


def test_gradient_alignment_and_overlap_exact(x64):
    rng = np.random.default_rng(11)
    diagonal = planted_diagonal(rng, 500, np.linspace(20, 200, 10))
    result = landscape.lanczos(dense_operator(np.diag(diagonal)), template_of(500), 40, jax.random.key(11))
    inside = np.zeros(500)
    inside[-10:] = rng.standard_normal(10)  # in the span of the 10 outlier eigenvectors
    assert landscape.gradient_alignment(result, {"w": jnp.asarray(inside)}, 10) == pytest.approx(1.0, abs=1e-8)
    outside = np.zeros(500)
    outside[:5] = 1.0
    assert landscape.gradient_alignment(result, {"w": jnp.asarray(outside)}, 10) == pytest.approx(0.0, abs=1e-8)
    other = landscape.lanczos(dense_operator(np.diag(diagonal)), template_of(500), 40, jax.random.key(12))
    assert landscape.subspace_overlap(result, other, 10) == pytest.approx(1.0, abs=1e-8)


def test_metrics_on_hand_values():
    values = np.array([10.0, 5.0, 2.5, 1.0, 0.1, -0.5, -2.0])
    assert landscape.rneg(values) == pytest.approx(0.2)
    np.testing.assert_allclose(landscape.r_ratios(values, 6)[:5], [1.0, 0.5, 0.25, 0.1, 0.01])
    assert np.isnan(landscape.r_ratios(values, 6)[5])
    assert landscape.outlier_count(values) == 3  # R > 20%: 10, 5, 2.5
    assert landscape.rneg(np.array([3.0, 1.0, 0.0])) == 0.0
    with pytest.raises(ValueError, match="λ⁺_1 > 0"):
        landscape.rneg(np.array([-1.0, -2.0]))
    with pytest.raises(ValueError, match="threshold must be in"):
        landscape.outlier_count(values, threshold=1.5)


# ----------------------------------------------------------------------------------------------
# The compiled Krylov loop: reference equality, no recompiles, memory bound, non-finite operators
# ----------------------------------------------------------------------------------------------

def numpy_arnoldi(a, start, steps):
    """The reference recurrence in NumPy float64 (the host loop the compiled driver replaced): two
    classical Gram–Schmidt passes per step, H (steps+1, steps), V (steps+1, n)."""
    n = a.shape[0]
    v = np.zeros((steps + 1, n))
    h = np.zeros((steps + 1, steps))
    v[0] = start / np.linalg.norm(start)
    for j in range(steps):
        w = a @ v[j]
        h1 = v @ w
        w = w - h1 @ v
        h2 = v @ w
        w = w - h2 @ v
        h[: j + 1, j] = (h1 + h2)[: j + 1]
        h[j + 1, j] = np.linalg.norm(w)
        v[j + 1] = w / h[j + 1, j]
    return h, v


def test_compiled_loop_equals_the_reference_recurrence_and_dense_eigh(x64):
    rng = np.random.default_rng(20)
    a = random_symmetric(rng, 300, definite=False)
    start = rng.standard_normal(300)
    h_ref, v_ref = numpy_arnoldi(a, start, 40)
    result = landscape.arnoldi(dense_operator(a), template_of(300), 40, jax.random.key(0), start={"w": jnp.asarray(start)})
    scale = np.linalg.norm(a, 2)
    np.testing.assert_allclose(result.hessenberg, h_ref, atol=1e-11 * scale)
    np.testing.assert_allclose(np.asarray(result.basis), v_ref, atol=1e-9)
    chunked = landscape.arnoldi(dense_operator(a), template_of(300), 40, jax.random.key(0),
                                start={"w": jnp.asarray(start)}, progress=True)  # chunked program, same numbers
    np.testing.assert_allclose(chunked.hessenberg, result.hessenberg, atol=1e-13 * scale)
    # Full dimension: the compiled Lanczos reproduces dense float64 eigh.
    small = random_symmetric(rng, 40, definite=False)
    full = landscape.lanczos(dense_operator(small), template_of(40), 40, jax.random.key(1))
    np.testing.assert_allclose(full.eigenvalues, np.sort(np.linalg.eigvalsh(small))[::-1], atol=1e-9 * np.linalg.norm(small, 2))
    # Sketched: equals the reference recurrence on the materialised m × m matrix Φ A Φᵀ.
    sketch = sketching.get("afjl", 32)
    state = sketch.init(jax.random.key(2), template_of(300))
    phi = np.stack([np.asarray(sketch.apply(state, {"w": jnp.asarray(e)})) for e in np.eye(300)], axis=1)
    u0 = rng.standard_normal(32)
    sketched = landscape.lanczos(dense_operator(a), template_of(300), 20, jax.random.key(3), sketch=(sketch, state),
                                 start=jnp.asarray(u0))
    h_sk, _ = numpy_arnoldi(phi @ a @ phi.T, u0, 20)
    np.testing.assert_allclose(sketched.tridiagonal, tridiagonal_from_hessenberg(h_sk, 20), atol=1e-10 * scale * 10)


def test_no_recompile_for_new_num_iters_or_new_parameters(x64):
    import importlib
    lanczos_module = importlib.import_module("landscape.lanczos")
    loss_fn, params, batch = tiny_problem()
    landscape.lanczos(landscape.hvp_fn(loss_fn, params, [batch]), params, 50, jax.random.key(0))
    before = lanczos_module._krylov_from_start._cache_size()
    other = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    result = landscape.lanczos(landscape.hvp_fn(loss_fn, other, [batch]), other, 55, jax.random.key(1))
    landscape.lanczos(landscape.hvp_fn(loss_fn, params, [batch]), params, 60, jax.random.key(2))
    assert lanczos_module._krylov_from_start._cache_size() == before  # 51..64 rows: one bucket, params are arguments
    exact = np.sort(np.linalg.eigvalsh(np.asarray(dense_hessian(loss_fn, other, batch))))[::-1]
    np.testing.assert_allclose(result.top(3), exact[:3], rtol=1e-6)


def test_sketched_krylov_memory_is_k_m_plus_order_d(x64):
    """XLA's memory analysis of the compiled k-step loop: the arguments (aliased to the outputs) are the
    k·m basis and the k² Hessenberg matrix; the scratch is O(D) (a few D-vectors for Φᵀu and the
    matvec), independent of k; nothing of size k·D exists. Unsketched, no copy of the k·D basis."""
    import importlib
    lanczos_module = importlib.import_module("landscape.lanczos")
    from sketching.layout import Layout
    size, m, k = 2 ** 16, 256, 300
    diagonal = jnp.linspace(0.0, 1.0, size)
    template = template_of(size)
    layout = Layout.from_template(template)
    rows = lanczos_module.basis_rows(k)
    assert rows == k + 1  # long runs: exactly k + 1 rows
    for sketch in (sketching.get("afjl", m), None):
        state = sketch.init(jax.random.key(0), template) if sketch else None
        n = m if sketch else size
        problem, dynamic = lanczos_module.make_problem(lambda v: {"w": diagonal * v["w"]}, layout, sketch, state)
        carry = lanczos_module._initial_state_jit(jnp.ones((n,)), rows)
        compiled = lanczos_module._krylov_steps.lower(problem, dynamic, *carry, jnp.int32(k), jnp.int32(k)).compile()
        analysis = compiled.memory_analysis()
        krylov_bytes = (rows * n + rows * (rows - 1)) * 8
        assert analysis.argument_size_in_bytes <= krylov_bytes + 2 * size * 8 + 4096
        assert analysis.alias_size_in_bytes >= rows * n * 8  # basis updated in place (donated)
        assert analysis.temp_size_in_bytes <= 8 * size * 8  # O(D) scratch, no basis copy
        if sketch is not None:
            total = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
            assert total <= krylov_bytes + 10 * size * 8
            assert total < 0.05 * k * size * 8  # far below a k·D basis


def test_non_finite_operator_raises_a_clear_error(x64):
    a = jnp.asarray(random_symmetric(np.random.default_rng(21), 50, definite=True))
    with pytest.raises(FloatingPointError, match=r"non-finite vector \(NaN or Inf\) at Krylov iteration"):
        landscape.lanczos(lambda v: {"w": a @ v["w"] * jnp.nan}, template_of(50), 10, jax.random.key(0))
    # A loss with log(0) at the parameters: the HVP is Inf/NaN.
    params = {"w": jnp.asarray([0.0, 1.0, 2.0])}
    loss = lambda p, batch: jnp.sum(jnp.log(p["w"]) * batch["x"][0])  # noqa: E731
    operator = landscape.hvp_fn(loss, params, [{"x": jnp.ones((1, 3))}])
    with pytest.raises(FloatingPointError, match="at Krylov iteration 0"):
        landscape.lanczos(operator, params, 2, jax.random.key(0))
    with pytest.raises(FloatingPointError, match="non-finite"):
        landscape.lanczos(operator, params, 2, jax.random.key(0), sketch=sketching.get("dense", 2))
    with pytest.raises(FloatingPointError, match="non-finite"):
        landscape.slq(operator, params, 2, 2, jax.random.key(0))
    with pytest.raises(FloatingPointError, match="Hutchinson probe 0"):
        landscape.hutchinson(operator, params, 2, jax.random.key(0))


def test_top_k_certificates_and_no_ghosts_at_large_k(x64):
    """k = 300 steps on a planted spectrum with a sketched basis: every outlier appears exactly once
    among the Ritz values (no ghost copies), and the certificates β_k|s_k| match the directly computed
    residuals ‖A y − θ y‖ of the sketched operator."""
    rng = np.random.default_rng(22)
    size, m, k = 2048, 512, 300
    outliers = np.linspace(20, 200, 10)
    matvec, _ = rotated_diagonal_operator(planted_diagonal(rng, size, outliers), seed=22)
    sketch = sketching.get("dense", m)
    result = landscape.lanczos(matvec, template_of(size), k, jax.random.key(4), sketch=sketch)
    v = np.asarray(result.basis[:k])
    assert np.max(np.abs(v @ v.T - np.eye(k))) <= 1e-10
    top = result.top(10)
    assert np.all(np.diff(top) < -1e-3)  # ten distinct values
    copies = np.sum(np.abs(result.eigenvalues[:, None] - top[None, :]) < 1e-6 * top[None, :], axis=0)
    assert np.all(copies == 1)
    y = np.asarray(result.ritz_vectors(np.arange(10)))
    apply = jax.jit(lambda u: sketch.apply(result.sketch_state, matvec({"w": sketch.transpose(result.sketch_state, u)["w"]})))
    direct = np.linalg.norm(np.stack([np.asarray(apply(jnp.asarray(row))) for row in y]) - top[:, None] * y, axis=1)
    np.testing.assert_allclose(direct, result.residual_norms[:10], atol=1e-8 * top[0])
    assert np.all(result.residual_norms[:10] <= 1e-8 * top[0])
    np.testing.assert_allclose(direct_residuals(result, matvec, np.arange(10)), direct, rtol=1e-6, atol=1e-12 * top[0])
