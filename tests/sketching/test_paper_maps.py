"""The paper's maps, eqs. (6), (7), (8) and the blocked FFD of eq. (12), against dense float64
constructions built from the same random components; the paper's known weaknesses as measured
properties; our variants at least as good on every input family; compiled temporary memory.

Dense references: the random components (signs, Gaussians, per-factor permutations, Haar rows) are
read from a `tables="store"` state, the N×N matrices of the paper's formula are formed with
`np.kron` in float64, and the sketch's matrix (its action on the identity) must match them to 1e-12.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy import stats

import sketching
from sketching import transforms as T


def sketch_matrix(sketch, state, d):
    """The m×D matrix of Φ: columns Φ e_j, in float64."""
    return np.asarray(jax.vmap(lambda e: sketch.apply(state, e))(jnp.eye(d, dtype=jnp.float64))).T


def kron_all(mats):
    return functools.reduce(np.kron, [np.asarray(a, np.float64) for a in mats])


def permuted_hadamard(blocks, perms, axis):
    """⊗_i P_i H_{b_i} (axis="rows") or ⊗_i H_{b_i} P_i (axis="columns"), normalised by √n."""
    factors = []
    for b, p in zip(blocks, perms):
        h = scipy.linalg.hadamard(b).astype(np.float64)
        factors.append(h[np.asarray(p)] if axis == "rows" else h[:, np.asarray(p)])
    return kron_all(factors) / np.sqrt(np.prod(blocks))


def permutation_matrix(p):
    """(P u)_i = u[p_i]."""
    p = np.asarray(p)
    out = np.zeros((p.size, p.size))
    out[np.arange(p.size), p] = 1
    return out


D, N, BLOCK = 200, 256, 4   # n = 256 = 4⁴: four Kronecker factors


def _state(name, m, **options):
    sketch = sketching.get(name, m, tables="store", **options)
    return sketch, sketch.init(jax.random.key(5), jnp.zeros((D,), jnp.float64))


def test_affd_is_equation_6(x64):
    """Φ = R_m √(n/m) H^{π2} G H^{π1} B, H^{π1} = ⊗ P_{1,i}H_i, H^{π2} = ⊗ H_i P_{2,i}."""
    m = 24
    sketch, state = _state("affd", m, block=BLOCK)
    tables = state.tables
    blocks = state.plan.mixer_1.blocks
    assert blocks == (4, 4, 4, 4)
    for perms in (tables["mixer_1"], tables["mixer_2"]):
        assert all(sorted(np.asarray(p).tolist()) == list(range(4)) for p in perms)
    h1 = permuted_hadamard(blocks, tables["mixer_1"], "rows")
    h2 = permuted_hadamard(blocks, tables["mixer_2"], "columns")
    # The Kronecker identity the implementation relies on: ⊗(P_i H_i) = (⊗P_i)(⊗H_i).
    big_p1 = kron_all([permutation_matrix(p) for p in tables["mixer_1"]])
    np.testing.assert_allclose(h1, big_p1 @ scipy.linalg.hadamard(N) / np.sqrt(N), atol=1e-12)
    phi = np.sqrt(N / m) * (h2 @ np.diag(np.asarray(tables["gaussian"])) @ h1 @ np.diag(np.asarray(tables["signs"])))
    np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:m, :D], rtol=1e-12, atol=1e-12)
    # Different factors and the two Hadamards get different permutations (over a few keys).
    perms = [sketching.get("affd", m, block=BLOCK).init(jax.random.key(k), jnp.zeros(D)).tables for k in range(6)]
    rows = {tuple(np.asarray(p).tolist()) for t in perms for p in t["mixer_1"]}
    assert len(rows) > 4


def test_affd_without_permutations_is_our_unpermuted_map(x64):
    m = 16
    sketch, state = _state("affd", m, block=BLOCK, permutations="none")
    h = scipy.linalg.hadamard(N) / np.sqrt(N)
    t = state.tables
    phi = np.sqrt(N / m) * (h @ np.diag(np.asarray(t["gaussian"])) @ h @ np.diag(np.asarray(t["signs"])))
    np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:m, :D], rtol=1e-12, atol=1e-12)


def test_afjl_is_equation_7_any_m(x64):
    """Φ = R_m √(n/m) G H^{π1} B: only the first m Gaussians matter; m need not divide n."""
    for m in (24, 64):
        sketch, state = _state("afjl", m, block=BLOCK)
        t = state.tables
        h1 = permuted_hadamard(state.plan.mixer.blocks, t["mixer"], "rows")
        phi = np.sqrt(N / m) * np.diag(np.asarray(t["diagonal"])) @ (h1 @ np.diag(np.asarray(t["signs"])))[:m]
        np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:, :D], rtol=1e-12, atol=1e-12)


def test_afjl_segsum_is_our_segment_sum(x64):
    m = 16
    sketch, state = _state("afjl", m, block=BLOCK, reduction="segsum")
    t = state.tables
    y = np.diag(np.asarray(t["diagonal"])) @ scipy.linalg.hadamard(N) / np.sqrt(N) @ np.diag(np.asarray(t["signs"]))
    phi = y.reshape(m, N // m, N).sum(axis=1)
    np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:, :D], rtol=1e-12, atol=1e-12)


def test_identity_permutation_slice_is_blockwise_hadamard(x64):
    """PAPER fact: the first m rows of Sylvester H_n are √(m/n)[H_m … H_m], so without the row
    permutation R_m(σ G H B x) = G H_m Σ_b B_b x_b (which fails on Theorem 3.1's input)."""
    m = 16
    h = scipy.linalg.hadamard(N) / np.sqrt(N)
    hm = scipy.linalg.hadamard(m) / np.sqrt(m)
    np.testing.assert_allclose(np.sqrt(N / m) * h[:m], np.tile(hm, (1, N // m)), atol=1e-12)


def test_qk_is_equation_8(x64):
    """Φ = √(n/m) (Q₁ ⊗ … ⊗ Q_K), Q_i the first m_i rows of a Haar matrix, balanced m_i, no signs."""
    for options, blocks, rows in [({"factor_size": 16}, (16, 16), (4, 4)), ({"num_factors": 4}, (4, 4, 4, 4), (2, 2, 2, 2))]:
        m = 16
        sketch, state = _state("qk", m, **options)
        assert state.plan.in_factors == blocks and state.plan.out_factors == rows
        assert set(state.tables) == {"haar_rows"}  # no signs, no Gaussian factors, no chunks
        qs = [np.asarray(q) for q in state.tables["haar_rows"]]
        for q, r, b in zip(qs, rows, blocks):
            assert q.shape == (r, b)
            np.testing.assert_allclose(q @ q.T, np.eye(r), atol=1e-12)  # orthonormal rows
        phi = np.sqrt(N / m) * kron_all(qs)
        np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:, :D], rtol=1e-12, atol=1e-12)


def test_qk_reaches_m_up_to_n_and_beyond_the_old_cap():
    """The paper runs QK at m = 2^17 … 2^26; any number of factors, m up to n."""
    template = jax.ShapeDtypeStruct((1 << 27,), jnp.float32)
    state = jax.eval_shape(sketching.get("qk", 1 << 26).init, jax.random.key(0), template)
    assert state.plan.in_factors == (128, 1024, 1024)      # Listing 1's shapes for N = 2^27
    assert np.prod(state.plan.out_factors) == 1 << 26 and max(state.plan.out_factors) <= 1024
    small = jnp.zeros((512,))
    full = sketching.get("qk", 512, num_factors=2)
    assert full.apply(full.init(jax.random.key(0), small), small).shape == (512,)


def test_haar_rows_have_the_haar_law():
    """Sign fix: without it Q[0, 0] = −|g₀|/‖g‖ < 0 always. With it, E Q_00 = 0, E Q_00² = 1/b."""
    b, r, draws = 16, 4, 400
    qs = jax.vmap(lambda k: T.haar_rows(k, r, b))(jax.random.split(jax.random.key(0), draws))
    q00 = np.asarray(qs[:, 0, 0], np.float64)
    assert abs(q00.mean()) < 4 * q00.std() / np.sqrt(draws)
    assert abs(np.mean(q00**2) - 1 / b) < 4 * np.std(q00**2) / np.sqrt(draws)
    assert 0.35 < np.mean(q00 > 0) < 0.65
    # Each row is uniform on the sphere: the squared entries of row 0 have mean 1/b in every column.
    col_means = np.mean(np.asarray(qs[:, 0, :]) ** 2, axis=0)
    assert np.all(np.abs(col_means - 1 / b) < 0.3 / b)


@pytest.mark.parametrize("name", ["affd", "afjl"])
def test_orthogonal_preconditioner_has_no_signs_like_the_paper(name, x64):
    """preconditioner='orthogonal': Q = ⊗ Haar factors replaces H_N and B is dropped (signs=True keeps it)."""
    m = 16
    sketch, state = _state(name, m, preconditioner="orthogonal", block=BLOCK)
    assert "signs" not in state.tables
    t = state.tables
    q = kron_all(t["mixer_1" if name == "affd" else "mixer"])
    if name == "affd":
        h2 = kron_all(t["mixer_2"])  # Haar factors are not permuted (a permuted Haar factor is Haar)
        phi = np.sqrt(N / m) * (h2 @ np.diag(np.asarray(t["gaussian"])) @ q)[:m]
    else:
        phi = np.sqrt(N / m) * np.diag(np.asarray(t["diagonal"])) @ q[:m]
    np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:, :D], rtol=1e-12, atol=1e-12)
    _, with_signs = _state(name, m, preconditioner="orthogonal", block=BLOCK, signs=True)
    assert with_signs.tables["signs"].shape == (N,)


def test_ffd_blocked_is_le_et_al_and_theorem_3_1_is_exact(x64):
    """Φ x = Σ_b B_b H Π_b G_b H x_b (eq. 12, σ = 1); x = m^{-1/2}·1 on block 0 gives ‖Φx‖² = g_{0,0}²."""
    m = 32
    sketch, state = _state("ffd", m, form="blocked", block=BLOCK)
    t = state.tables
    h = scipy.linalg.hadamard(m) / np.sqrt(m)
    blocks = []
    for b in range(state.plan.num_blocks):
        g = np.diag(np.asarray(t["gaussian"][b]))
        blocks.append(np.diag(np.asarray(t["signs"][b])) @ h @ permutation_matrix(t["permutation"][b]) @ g @ h)
    phi = np.concatenate(blocks, axis=1)
    np.testing.assert_allclose(sketch_matrix(sketch, state, D), phi[:, :D], rtol=1e-12, atol=1e-12)
    for mm in (16, 64):
        sk = sketching.get("ffd", mm, form="blocked", tables="store")
        for key in range(3):
            st = sk.init(jax.random.key(key), jnp.zeros((D,), jnp.float64))
            x = jnp.zeros((D,), jnp.float64).at[:mm].set(mm ** -0.5)
            assert float(jnp.sum(sk.apply(st, x) ** 2)) == pytest.approx(float(st.tables["gaussian"][0, 0]) ** 2, rel=1e-10)
    with pytest.raises(ValueError, match="power of two"):
        sketching.get("ffd", 24, form="blocked").init(jax.random.key(0), jnp.zeros(D))


# ------------------------------------------------------------------ weaknesses, measured

DW, MW, DRAWS = 4096, 256, 300   # PAPER §7's check: N = 64², D = 256


def families(d=DW, seed=0):
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(d))
    xs = {"gaussian": rng.standard_normal(d)}
    spike = np.zeros(d)
    spike[d // 3] = 1
    xs["spike"] = spike
    stride = np.zeros(d)
    stride[::side] = rng.standard_normal(side)   # supported on every 64th coordinate (a Kronecker factor's stride)
    xs["stride"] = stride
    xs["rank_one"] = np.kron(rng.standard_normal(side), rng.standard_normal(side))
    return {k: (v / np.linalg.norm(v)).astype(np.float32) for k, v in xs.items()}


PAPER_MAPS = {
    "affd": ("affd", {"block": 64}),
    "afjl": ("afjl", {"block": 64}),
    "qk": ("qk", {"factor_size": 64}),                       # balanced 16 × 16, as in PAPER §7
}
OUR_VARIANTS = {
    "affd": ("affd", {"block": 64, "permutations": "none"}),
    "afjl": ("afjl", {"block": 64, "reduction": "segsum"}),
    "qk": ("qk", {"construction": "sandwich", "factor_size": 64}),
}


@functools.lru_cache(maxsize=None)
def ratios(name, options, family):
    sketch = sketching.get(name, MW, **dict(options))
    x = jnp.asarray(families()[family])

    def one(key):
        return jnp.sum(sketch.apply(sketch.init(key, x), x) ** 2)

    keys = jax.random.split(jax.random.key(42), DRAWS)
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def q90(r):
    return float(np.quantile(np.abs(r - 1), 0.9))


def dense_q90():
    """q90 of |χ²_m/m − 1| (exact law of a dense Gaussian sketch on any unit input)."""
    grid = np.linspace(0, 1, 20001)
    p = stats.chi2.cdf((1 + grid) * MW, MW) - stats.chi2.cdf((1 - grid) * MW, MW)
    return float(grid[np.searchsorted(p, 0.9)])


def _key(entry):
    name, options = entry
    return name, tuple(sorted(options.items()))


@pytest.mark.parametrize("which", ["affd", "afjl", "qk"])
@pytest.mark.parametrize("family", ["gaussian", "spike", "stride", "rank_one"])
def test_all_maps_are_unbiased(which, family):
    for entry in (PAPER_MAPS[which], OUR_VARIANTS[which]):
        r = ratios(*_key(entry), family)
        assert abs(r.mean() - 1) < 4 * r.std() / np.sqrt(DRAWS) + 1e-6, (entry, family, r.mean())


def test_paper_affd_concentrates_like_dense():
    for family in families():
        assert q90(ratios(*_key(PAPER_MAPS["affd"]), family)) <= 1.4 * dense_q90(), family


def test_paper_afjl_fails_on_inputs_along_a_kronecker_factor_stride():
    """PAPER §7: std 0.58 on every-64th-coordinate inputs (dense: 0.088); ours (segsum) 0.15."""
    paper = ratios(*_key(PAPER_MAPS["afjl"]), "stride")
    assert q90(paper) > 4 * dense_q90() and paper.std() > 0.35
    ours = ratios(*_key(OUR_VARIANTS["afjl"]), "stride")
    assert q90(ours) < 2 * dense_q90()


@pytest.mark.parametrize("family", ["spike", "rank_one"])
def test_paper_qk_fails_on_spikes_and_rank_one_inputs(family):
    """PAPER §7: std ≈ 0.40–0.42 (relative variance ≈ 2(1/16 + 1/16)); ours (sandwich) stays dense-like."""
    paper = ratios(*_key(PAPER_MAPS["qk"]), family)
    assert 0.3 < paper.std() < 0.55 and q90(paper) > 3 * dense_q90()
    assert q90(ratios(*_key(OUR_VARIANTS["qk"]), family)) < 2.5 * dense_q90()


# Measured exception: on spread (Gaussian) inputs the paper's QK, whose factors are orthonormal Haar
# rows, beats our sandwich, whose last layer is a Kronecker *Gaussian* (q90 0.144 vs 0.203 at
# N = 4096, m = 256: ours is 1.4× worse there, while 2–3× better on spikes, strides and rank-one).
AT_MOST = {("qk", "gaussian"): 1.6}


@pytest.mark.parametrize("which", ["affd", "afjl", "qk"])
def test_our_variants_are_at_least_as_good_on_every_family(which):
    """q90 distortion of our variant ≤ the paper map's (+15% for 300-draw noise) on every family,
    except the measured QK / Gaussian case above."""
    for family in families():
        paper = q90(ratios(*_key(PAPER_MAPS[which]), family))
        ours = q90(ratios(*_key(OUR_VARIANTS[which]), family))
        assert ours <= AT_MOST.get((which, family), 1.15) * paper + 0.01, (which, family, ours, paper)


# ------------------------------------------------------------------ compiled temporary memory

MEMORY_CASES = [
    ("affd", {}), ("affd", {"permutations": "none"}), ("affd", {"preconditioner": "orthogonal"}),
    ("afjl", {}), ("afjl", {"reduction": "segsum"}),
    ("qk", {}), ("qk", {"construction": "sandwich"}),
    ("ffd", {}), ("ffd", {"form": "blocked"}),
]


def compiled_temp_d_floats(name, options, d=1 << 22, m=4096):
    x = jax.ShapeDtypeStruct((d,), jnp.float32)
    sketch = sketching.get(name, m, **options)
    state = jax.eval_shape(sketch.init, jax.random.key(0), x)
    compiled = jax.jit(sketch.apply).lower(state, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (4 * d)


@pytest.mark.parametrize("name,options", MEMORY_CASES, ids=[f"{n}-{o}" for n, o in MEMORY_CASES])
def test_compiled_temporary_memory_is_a_few_d_floats(name, options):
    """D = 2^22, m = 4096: a D×m matrix would be 4096 D floats; allowed: 6 D floats, except ffd,
    whose regenerated permutations are sorts (random keys + indices, measured 11.1 D floats for the
    single-block form, 8.1 for the blocked one)."""
    limit = {"ffd": 12}.get(name, 6)
    assert compiled_temp_d_floats(name, options) <= limit
