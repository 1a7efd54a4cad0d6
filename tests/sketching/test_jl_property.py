"""The JL (sketching) property (the paper's eq. 1) on the adversarial input suite.

Reference: a dense Gaussian sketch Φ = G/√m is rotation invariant, so for *every* unit x,
‖Φx‖² ~ χ²_m/m exactly; we compare quantiles of each sketch's distortion |‖Φx‖² − 1| on the
adversarial suite to that exact law (and check our `dense` sketch follows it). Constants are fixed
keys, so the tests are deterministic; tolerances come from the theory quoted next to them.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import sketching
from tests.sketching.inputs import adversarial_suite

D = 4096
DRAWS = 400


@functools.lru_cache(maxsize=None)
def _ratio_fn(name, m, draws, options):
    """One compiled function per (sketch, m): x ↦ ‖Φ_k x‖²/‖x‖² for `draws` keys."""
    sketch = sketching.get(name, m, **dict(options))

    def one(key, x):
        return jnp.sum(sketch.apply(sketch.init(key, x), x) ** 2) / jnp.sum(x**2)

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def norm_ratios(name, m, x, draws=DRAWS, seed=0, **options):
    """‖Φx‖²/‖x‖² over `draws` independent keys."""
    keys = jax.random.split(jax.random.key(seed), draws)
    fn = _ratio_fn(name, m, draws, tuple(sorted(options.items())))
    return np.asarray(fn(keys, jnp.asarray(x)), np.float64)


def dense_q90(m):
    """90% quantile of |χ²_m/m − 1|, the dense Gaussian distortion (exact, any input)."""
    # P(|Z-1| <= t) = F((1+t)m) - F((1-t)m) = 0.9, solved by bisection.
    lo, hi = 0.0, 2.0
    for _ in range(60):
        t = (lo + hi) / 2
        p = stats.chi2.cdf((1 + t) * m, m) - stats.chi2.cdf(max(0.0, 1 - t) * m, m)
        lo, hi = (t, hi) if p < 0.9 else (lo, t)
    return hi


# Allowed q90 distortion relative to the dense Gaussian, per sketch, with the theory behind it
# (measured maxima over the suite, two key sets, m ∈ {64, 256}, are in brackets):
#  fjl, sjlt: dense-like on every input (SRHT / CountSketch) [1.07].
#  affd (the paper's eq. 6, per-factor permutations; our unpermuted P = I variant is measured in
#        test_paper_maps.py): dense-like
#        except on contiguous blocks, whose HBx energy is Walsh-correlated so the output Gaussians
#        are correlated: a constant factor, not growing with m (Theorem 3.2's log(n/δ) slack) [1.52].
#  afjl_segsum (ours): one Hadamard leaves the strided input {i ≡ 0 mod m} constant on segments with
#        χ²₁-like segment energies: relative std √3·√(2/m) (measured 0.16 at m=256 ≈ 1.8×) [1.81].
#  qk_sandwich (ours): Var = 2(1/m₁+1/m₂+1/m₁m₂)Σσ⁴ + 2/(m₁m₂) with Σσ⁴ ≈ 1/n₁+1/n₂ after the
#        sign/rotation sandwich; at D = 4096 (n_i = 64, m_i = 16) that is ≈ 1.4× on spread inputs
#        and up to 2× on spikes [2.06].
#  afjl_rademacher: our segment-sum AFJL with a ±1 diagonal; per-segment variance ≤ the Gaussian one.
# The paper's AFJL (eq. 7) and QK (eq. 8) are NOT dense-like on this suite (Kronecker-stride inputs,
# spikes, rank-one inputs): tests/sketching/test_paper_maps.py measures how far they are.
TOLERANCE = {"fjl": 1.3, "sjlt": 1.3, "affd": 1.7, "afjl_segsum": 2.0,
             "afjl_rademacher": 2.0, "qk_sandwich": 2.3}
VARIANTS = {
    "affd_unpermuted": ("affd", {"permutations": "none"}),
    "afjl_segsum": ("afjl", {"reduction": "segsum"}),
    "afjl_rademacher": ("afjl", {"reduction": "segsum", "diagonal": "rademacher"}),
    "qk_sandwich": ("qk", {"construction": "sandwich"}),
}


def variant_ratios(variant, m, x, **kwargs):
    """norm_ratios for a sketch name or a named variant (sketch + options) of VARIANTS."""
    name, options = VARIANTS.get(variant, (variant, {}))
    return norm_ratios(name, m, x, **kwargs, **options)


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_unbiased_and_dense_like_concentration(name):
    for m in (64, 256):
        q_dense = dense_q90(m)
        for label, x in adversarial_suite(D, m).items():
            r = variant_ratios(name, m, x)
            se = max(r.std(), 1e-3) / np.sqrt(len(r))
            assert abs(r.mean() - 1) < 4 * se + 1e-6, (name, m, label, r.mean())
            q90 = np.quantile(np.abs(r - 1), 0.9)
            assert q90 <= TOLERANCE[name] * q_dense, (name, m, label, q90 / q_dense)


# From m=64 to m=1024 the dense q90 shrinks 4×. QK at D=4096 has n_i = 64 and m_i = 32 at m=1024,
# where Theorem 3.3's (1/m_i)(1/n_i) term is no longer small: ≈2.5× (measured 2.47× on a spike).
SHRINK = {"fjl": 2.5, "sjlt": 2.5, "affd": 2.5, "affd_unpermuted": 2.5, "afjl_segsum": 2.5, "afjl_rademacher": 2.5,
          "qk_sandwich": 2.0}


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_distortion_shrinks_like_one_over_sqrt_m(name):
    """16× more rows must shrink the q90 distortion by SHRINK[name] (dense: 4×)."""
    for label, x in adversarial_suite(D, 64).items():
        q_small = np.quantile(np.abs(variant_ratios(name, 64, x) - 1), 0.9)
        q_large = np.quantile(np.abs(variant_ratios(name, 1024, x) - 1), 0.9)
        if q_small < 0.02:  # exactly isometric on this input (e.g. a spike under fjl / sjlt)
            assert q_large < 0.02, (name, label)
            continue
        assert q_large <= q_small / SHRINK[name], (name, label, q_small, q_large)


def test_dense_sketch_follows_chi_square():
    m = 64
    x = adversarial_suite(1024, m)["block"]
    r = norm_ratios("dense", m, x, draws=300)
    assert stats.kstest(r * m, stats.chi2(m).cdf).pvalue > 0.01
    r_rad = norm_ratios("dense", m, x, draws=300, distribution="rademacher")
    assert abs(r_rad.mean() - 1) < 4 * r_rad.std() / np.sqrt(300)
    assert np.quantile(np.abs(r_rad - 1), 0.9) <= 1.3 * dense_q90(m)


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_inner_products_like_dense(name):
    """⟨Φx, Φy⟩ − ⟨x, y⟩ for unit x, y: dense Gaussian error has variance (1 + ⟨x,y⟩²)/m."""
    m = 256
    suite = adversarial_suite(D, m)
    pairs = [("gaussian", "block"), ("constant", "rank_one"), ("one_hot", "sparse"), ("half", "mod_m")]
    sketch_name, options = VARIANTS.get(name, (name, {}))
    sketch = sketching.get(sketch_name, m, **options)
    for a, b in pairs:
        x, y = jnp.asarray(suite[a]), jnp.asarray(suite[b])

        def one(key):
            state = sketch.init(key, x)
            return jnp.dot(sketch.apply(state, x), sketch.apply(state, y))

        keys = jax.random.split(jax.random.key(1), DRAWS)
        err = np.asarray(jax.jit(jax.vmap(one))(keys)) - float(jnp.dot(x, y))
        assert abs(err.mean()) < 4 * err.std() / np.sqrt(DRAWS) + 1e-6, (name, a, b)
        dense_std = np.sqrt((1 + float(jnp.dot(x, y)) ** 2) / m)
        # 1.645 σ is the q90 of |N(0, σ²)|; the same per-sketch tolerance as for norms.
        assert np.quantile(np.abs(err), 0.9) <= TOLERANCE[name] * 1.645 * dense_std, (name, a, b)


# ------------------------------------------------------------------ Theorem 3.1 (FFD is not a sketch)

def theorem_3_1_input(d):
    """x* = 1_[0,M)/√M with M the largest power of two ≤ D."""
    big_m = 1 << (d.bit_length() - 1)
    x = np.zeros(d, np.float32)
    x[:big_m] = 1 / np.sqrt(big_m)
    return x, (1 << (d - 1).bit_length()) // big_m


@pytest.mark.parametrize("d", [4096, 3000])  # r = n/M = 1 and r = 2
def test_theorem_3_1_fastfood_distortion_does_not_shrink(d):
    x, r = theorem_3_1_input(d)
    expected_fraction = {1: 0.74, 2: 0.62}[r]  # P(|χ²_r/r − 1| > 1/2)
    stds = []
    for m in (64, 1024):
        ratios = norm_ratios("ffd", m, x)
        fraction = np.mean(np.abs(ratios - 1) > 0.5)
        assert fraction > expected_fraction - 0.15, (d, m, fraction)
        stds.append(ratios.std())
    assert stds[1] > 0.7 * stds[0]  # 16× more rows, no concentration
    assert stds[1] > 0.8  # χ²_r/r has std √(2/r) ≥ 1


# The paper's QK is left out: x* is a constant block, i.e. rank-one along the Kronecker factors, its
# known weak input (tests/sketching/test_paper_maps.py).
@pytest.mark.parametrize("name", ["affd", "afjl", "afjl_segsum", "qk_sandwich"])
@pytest.mark.parametrize("d", [4096, 3000])
def test_theorem_3_1_input_is_fine_for_the_papers_sketches(name, d):
    x, _ = theorem_3_1_input(d)
    stds = [variant_ratios(name, m, x).std() for m in (64, 1024)]
    assert stds[1] < stds[0] / 2.5
    assert np.mean(np.abs(variant_ratios(name, 1024, x) - 1) > 0.5) == 0


def test_fastfood_defect_is_invisible_on_gaussian_inputs():
    x = adversarial_suite(D, 256)["gaussian"]
    r = norm_ratios("ffd", 256, x)
    assert np.quantile(np.abs(r - 1), 0.9) <= 1.35 * dense_q90(256)
