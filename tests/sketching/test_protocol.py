"""The sketch protocol: adjoint, linearity, determinism, jit/vmap, dtypes, state size, errors."""
import hashlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sketching

# Every sketch with each of its structural variants.
VARIANTS = [
    ("dense", {}), ("dense", {"distribution": "rademacher", "block_elements": 1000}),
    ("fjl", {}), ("ffd", {}), ("ffd", {"form": "blocked", "block": 4}), ("sjlt", {}), ("sjlt", {"nnz": 3}),
    ("affd", {"block": 4}), ("affd", {"permutations": "none"}), ("affd", {"preconditioner": "hartley"}),
    ("affd", {"preconditioner": "orthogonal", "block": 4, "signs": True}),
    ("afjl", {}), ("afjl", {"block": 4, "diagonal": "rademacher"}), ("afjl", {"preconditioner": "hartley"}),
    ("afjl", {"preconditioner": "orthogonal", "block": 4}), ("afjl", {"reduction": "segsum"}),
    ("afjl", {"reduction": "segsum", "preconditioner": "hartley"}),
    ("qk", {}), ("qk", {"num_factors": 3, "factor_size": 8}),
    ("qk", {"construction": "sandwich"}), ("qk", {"construction": "sandwich", "num_factors": 3, "factor_size": 8}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in VARIANTS]


def odd_tree(dtype=jnp.float32, seed=0):
    """Many leaves with odd shapes (D = 7·13 + 5 + 3·1·4 + 1 + 200 = 309)."""
    k = jax.random.split(jax.random.key(seed), 5)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (7, 13), dtype), "bias": jax.random.normal(k[1], (5,), dtype)},
        "conv": [jax.random.normal(k[2], (3, 1, 4), dtype), jax.random.normal(k[3], (), dtype)],
        "embed": jax.random.normal(k[4], (200,), dtype),
    }


D_ODD = 309


def tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_transpose_is_the_adjoint_float64(name, options, x64):
    """T6: ⟨Φx, w⟩ = ⟨x, Φᵀw⟩ to 1e-12 in float64, and Φ is linear."""
    m = 16
    sketch = sketching.get(name, m, **options)
    x = odd_tree(jnp.float64)
    y = odd_tree(jnp.float64, seed=1)
    state = sketch.init(jax.random.key(3), x)
    w = jax.random.normal(jax.random.key(4), (m,), jnp.float64)
    phi_x = sketch.apply(state, x)
    assert phi_x.shape == (m,) and phi_x.dtype == jnp.float64
    lhs, rhs = jnp.dot(phi_x, w), tree_dot(x, sketch.transpose(state, w))
    assert abs(lhs - rhs) <= 1e-12 * jnp.linalg.norm(phi_x) * jnp.linalg.norm(w) * 10
    combo = jax.tree_util.tree_map(lambda a, b: 2.5 * a - 0.5 * b, x, y)
    np.testing.assert_allclose(sketch.apply(state, combo), 2.5 * phi_x - 0.5 * sketch.apply(state, y), rtol=1e-11, atol=1e-11)
    out = sketch.transpose(state, w)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(x)
    assert [a.shape for a in jax.tree_util.tree_leaves(out)] == [a.shape for a in jax.tree_util.tree_leaves(x)]


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_adjoint_float32_jit_vmap_and_stored_tables(name, options):
    m = 32
    sketch = sketching.get(name, m, **options)
    x = odd_tree()
    state = sketch.init(jax.random.key(0), x)
    w = jax.random.normal(jax.random.key(1), (m,))
    y = jax.jit(sketch.apply)(state, x)
    rel = abs(jnp.dot(y, w) - tree_dot(x, jax.jit(sketch.transpose)(state, w))) / (jnp.linalg.norm(y) * jnp.linalg.norm(w))
    assert rel < 1e-5
    np.testing.assert_allclose(sketch.apply(state, x), y, rtol=2e-5, atol=2e-5)  # eager == jit
    batch = jax.tree_util.tree_map(lambda *a: jnp.stack(a), odd_tree(seed=5), odd_tree(seed=6), odd_tree(seed=7))
    ys = jax.jit(jax.vmap(sketch.apply, in_axes=(None, 0)))(state, batch)
    for i in range(3):
        np.testing.assert_allclose(ys[i], sketch.apply(state, odd_tree(seed=5 + i)), rtol=2e-5, atol=2e-5)
    if name != "dense":  # tables="store" is the same map, with the O(D) tables kept in the state
        stored = sketching.get(name, m, tables="store", **options)
        np.testing.assert_allclose(stored.apply(stored.init(jax.random.key(0), x), x), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_same_key_same_sketch_other_key_other_sketch(name, options):
    sketch = sketching.get(name, 16, **options)
    x = odd_tree()
    a = sketch.apply(sketch.init(jax.random.key(7), x), x)
    b = sketch.apply(sketch.init(jax.random.key(7), x), x)
    c = sketch.apply(sketch.init(jax.random.key(8), x), x)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def _digest_script():
    return textwrap.dedent("""
        import hashlib, jax, jax.numpy as jnp, numpy as np, sketching
        from tests.sketching.test_protocol import odd_tree, VARIANTS
        h = hashlib.sha256()
        for name, options in VARIANTS:
            sketch = sketching.get(name, 16, **options)
            x = odd_tree()
            h.update(np.asarray(jax.jit(sketch.apply)(sketch.init(jax.random.key(11), x), x)).tobytes())
        print(h.hexdigest())
    """)


def test_bit_identical_in_fresh_processes():
    """T8: the same key gives bitwise the same sketch in a fresh process and in this one."""
    fresh = subprocess.run([sys.executable, "-c", _digest_script()], capture_output=True, text=True, check=True)
    h = hashlib.sha256()
    for name, options in VARIANTS:
        sketch = sketching.get(name, 16, **options)
        x = odd_tree()
        h.update(np.asarray(jax.jit(sketch.apply)(sketch.init(jax.random.key(11), x), x)).tobytes())
    assert fresh.stdout.strip() == h.hexdigest()


def test_raw_uint32_keys_work():
    sketch = sketching.get("afjl", 16)
    x = odd_tree()
    y = sketch.apply(sketch.init(jax.random.PRNGKey(0), x), x)
    assert y.shape == (16,) and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("name", sketching.NAMES)
def test_low_precision_leaves_are_sketched_in_float32(name):
    x16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), odd_tree())
    x32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), x16)
    sketch = sketching.get(name, 16)
    y16 = sketch.apply(sketch.init(jax.random.key(0), x16), x16)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, sketch.apply(sketch.init(jax.random.key(0), x32), x32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sketching.NAMES)
def test_state_is_small_when_tables_are_regenerated(name):
    """No D×m array, no O(D) array: the state is the key plus O(m + factor²) numbers."""
    d, m = 1 << 20, 1024
    template = {"w": jax.ShapeDtypeStruct((d - 1000,), jnp.float32), "b": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    state = jax.eval_shape(sketching.get(name, m).init, jax.random.key(0), template)
    sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(state.tables)]
    assert all(s < d // 8 for s in sizes), sizes
    assert sum(sizes) <= 2 * 256**2 + 2 * 32 * 256, sizes  # QK: two 256×256 rotations + two 32×256 Gaussians


def test_stored_tables_hold_the_o_d_diagonals():
    template = jax.ShapeDtypeStruct((5000,), jnp.float32)
    state = jax.eval_shape(sketching.get("affd", 64, tables="store").init, jax.random.key(0), template)
    assert state.tables["signs"].shape == (8192,) and state.tables["gaussian"].shape == (8192,)


def test_affd_is_nested_in_m(x64):
    """T13: Φ_{2m}ᵀ [√2 ω; 0] = Φ_mᵀ ω (b, γ and the mixers do not depend on m)."""
    template = jnp.zeros((3000,), jnp.float64)
    for preconditioner in ("hadamard", "hartley", "orthogonal"):
        small, large = sketching.get("affd", 64, preconditioner=preconditioner), sketching.get("affd", 128, preconditioner=preconditioner)
        omega = jax.random.normal(jax.random.key(0), (64,), jnp.float64)
        a = small.transpose(small.init(jax.random.key(5), template), omega)
        b = large.transpose(large.init(jax.random.key(5), template), jnp.concatenate([np.sqrt(2) * omega, jnp.zeros(64)]))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ errors at the boundary

@pytest.mark.parametrize("m", [0, -3, 2.5, "8", True])
def test_bad_m(m):
    with pytest.raises(ValueError, match="m"):
        sketching.get("afjl", m)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed values.*afjl"):
        sketching.get("fastfood", 16)


def test_unknown_option():
    with pytest.raises(ValueError, match="unknown options.*'nnz'"):
        sketching.get("afjl", 16, nnz=2)


@pytest.mark.parametrize("option,value", [("preconditioner", "fft"), ("tables", "cache"), ("block", 3)])
def test_bad_option_values(option, value):
    with pytest.raises(ValueError, match=option):
        sketching.get("affd", 16, **{option: value}).init(jax.random.key(0), odd_tree())


@pytest.mark.parametrize("name", ["fjl", "ffd", "affd", "afjl", "qk"])
def test_m_larger_than_d(name):
    with pytest.raises(ValueError, match="m <= D"):
        sketching.get(name, 512).init(jax.random.key(0), odd_tree())


@pytest.mark.parametrize("name", ["dense", "sjlt"])
def test_m_larger_than_d_allowed_where_valid(name):
    sketch = sketching.get(name, 512)
    assert sketch.apply(sketch.init(jax.random.key(0), odd_tree()), odd_tree()).shape == (512,)


def test_afjl_segsum_needs_power_of_two_m_with_hadamard():
    with pytest.raises(ValueError, match="power of two"):
        sketching.get("afjl", 48, reduction="segsum").init(jax.random.key(0), odd_tree())
    for options in ({"reduction": "segsum", "preconditioner": "hartley"}, {}, {"preconditioner": "hartley"}):
        sketch = sketching.get("afjl", 48, **options)  # the paper's slice takes any m <= D
        assert sketch.apply(sketch.init(jax.random.key(0), odd_tree()), odd_tree()).shape == (48,)


def test_qk_unsplittable_m():
    with pytest.raises(ValueError, match="cannot split m=251"):
        sketching.get("qk", 251, construction="sandwich").init(jax.random.key(0), odd_tree())  # prime > n_i
    with pytest.raises(ValueError, match="cannot split m=251"):
        sketching.get("qk", 251, num_factors=2).init(jax.random.key(0), odd_tree())  # b = (16, 32)
    sketch = sketching.get("qk", 251)  # one factor b = 512 (n <= factor_size): a Haar-row projection
    assert sketch.apply(sketch.init(jax.random.key(0), odd_tree()), odd_tree()).shape == (251,)


@pytest.mark.parametrize("name,option,value", [
    ("affd", "permutations", "full"), ("affd", "signs", "yes"), ("afjl", "reduction", "sum"),
    ("afjl", "signs", 1), ("qk", "construction", "lotfi"), ("qk", "num_factors", 0), ("ffd", "form", "stacked"),
])
def test_bad_new_option_values(name, option, value):
    with pytest.raises(ValueError, match=option):
        sketching.get(name, 16, **{option: value}).init(jax.random.key(0), odd_tree())


def test_non_float_leaves_rejected():
    with pytest.raises(ValueError, match=r"\['step'\].*int32"):
        sketching.get("afjl", 16).init(jax.random.key(0), {"w": jnp.zeros(100), "step": jnp.zeros((), jnp.int32)})


def test_mismatched_tree_rejected():
    sketch = sketching.get("afjl", 16)
    state = sketch.init(jax.random.key(0), odd_tree())
    with pytest.raises(ValueError, match="structure"):
        sketch.apply(state, {"other": jnp.zeros(309)})
    bad = odd_tree()
    bad["embed"] = jnp.zeros(201)
    with pytest.raises(ValueError, match="shape"):
        sketch.apply(state, bad)
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        sketch.transpose(state, jnp.zeros(17))


def test_describe_lists_every_sketch():
    assert set(sketching.describe()) == set(sketching.NAMES) == {"dense", "fjl", "ffd", "affd", "afjl", "qk", "sjlt"}
