"""FFD: the Fastfood transform as used for intrinsic dimension, in the sketching direction.

Li et al. (2018) and Aghajanyan et al. (2021) map ω ∈ R^m to parameters with

    P ω = c · crop_D( H G Π H B · pad_n(ω) ),        n = 2^⌈log2 D⌉,

B random signs, H orthonormal Walsh–Hadamard, Π a random permutation ((Πu)_i = u[π_i], a gather),
G a Gaussian diagonal. The sketch is the transpose,

    Φ_FFD x = Pᵀ x = c · crop_m( B H Πᵀ G H · pad_n(x) ),   c = √(n/m) / rms(γ),

so that E‖Φx‖² ≈ ‖x‖². It is included as the baseline the paper shows is *not* a sketch
(Theorem 3.1): x is Hadamard-transformed before any sign flip, so Walsh-aligned inputs
collapse onto one or two coordinates and ‖Φx‖² ~ χ²_r/r for every m. Its permutation is a
look-up of size n (stored with tables="store", as the intrinsic-dimension code does, or regenerated
by a sort inside every call with the default tables="regenerate").

form="blocked": Le et al.'s Fastfood as the paper defines FFD (eqs. 3, 4) used in its transposed,
blocked form (eq. 12, App. C.4): x is zero-padded to a multiple of m (m a power of two) and cut
into blocks x_b of size m, and

    Φ_blocked x = Σ_b B_b H_m Π_b G_b H_m x_b,        Φᵀ w = concat_b( H_m G_b Π_bᵀ H_m B_b w ),

with independent signs B_b, Gaussian diagonals G_b and permutations Π_b per block (σ = 1 makes it
unbiased). Theorem 3.1's counterexample is then exactly the paper's: x = m^{-1/2}·1 on block 0 has
H_m x₀ = e₁ and ‖Φx‖² = g_{0,1}², a χ²₁ for every m. Its tables are O(D) (signs, Gaussians and one
permutation per block, regenerated from the key by default).
Options: form ("single", Li et al.'s single block, default | "blocked"), tables, block.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, pad


import dataclasses

FORMS = ("single", "blocked")


@dataclasses.dataclass(frozen=True)
class BlockedPlan:
    """Le et al.'s blocked form: D padded to num_blocks·m, one m×m Fastfood block per chunk."""

    d: int
    m: int
    num_blocks: int
    block: int
    form: str = "blocked"


def make_plan(layout, m, form="single", block=None):
    if form not in FORMS:
        raise ValueError(f"form={form!r}; allowed values: {list(FORMS)}")
    if form == "single":
        return T.hadamard_plan(layout, m, block)
    if m & (m - 1):
        raise ValueError(f"ffd with form='blocked' needs m to be a power of two (its blocks are H_m), got m={m}")
    return BlockedPlan(d=layout.size, m=m, num_blocks=-(-layout.size // m), block=T.check_block(block))


def _blocked(plan) -> bool:
    return isinstance(plan, BlockedPlan)


def small_tables(key, plan, dtype):
    return {}


def large_tables(key, plan, dtype):
    if _blocked(plan):
        shape = (plan.num_blocks, plan.m)
        rows = jnp.broadcast_to(jnp.arange(plan.m, dtype=jnp.int32), shape)
        return {
            "signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.num_blocks * plan.m, dtype).reshape(shape),
            "gaussian": T.random_normal(T.component_key(key, T.TAG_GAUSSIAN), shape, dtype),
            "permutation": jax.random.permutation(T.component_key(key, T.TAG_PERMUTATION), rows, axis=1, independent=True),
        }
    return {
        "signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype),
        "gaussian": T.random_normal(T.component_key(key, T.TAG_GAUSSIAN), (plan.n,), dtype),
        "permutation": jax.random.permutation(T.component_key(key, T.TAG_PERMUTATION), plan.n),
    }


def _scale(plan, gaussian):
    rms = jnp.sqrt(jnp.mean(jnp.square(gaussian)))
    return math.sqrt(plan.n / plan.m) / rms


def _blocked_forward(plan, tables, x):
    u = pad(x, plan.num_blocks * plan.m).reshape(plan.num_blocks, plan.m)
    u = tables["gaussian"] * T.fwht(u, plan.block)
    u = jnp.take_along_axis(u, tables["permutation"], axis=1)  # Π_b: gather
    u = tables["signs"] * T.fwht(u, plan.block)
    return jnp.dot(jnp.ones((plan.num_blocks,), u.dtype), u, precision=T.HIGHEST)


def _blocked_adjoint(plan, tables, w):
    v = T.fwht(tables["signs"] * w[None, :], plan.block)
    rows = jnp.arange(plan.num_blocks)[:, None]
    v = jnp.zeros_like(v).at[rows, tables["permutation"]].set(v)  # Π_bᵀ: scatter
    return crop(T.fwht(tables["gaussian"] * v, plan.block).reshape(-1), plan.d)


def forward(plan, tables, x):
    if _blocked(plan):
        return _blocked_forward(plan, tables, x)
    u = tables["gaussian"] * T.fwht(pad(x, plan.n), plan.block)
    u = jnp.zeros_like(u).at[tables["permutation"]].set(u)  # Πᵀ: scatter
    y = tables["signs"] * T.fwht(u, plan.block)
    return crop(y, plan.m) * _scale(plan, tables["gaussian"])


def adjoint(plan, tables, y):
    if _blocked(plan):
        return _blocked_adjoint(plan, tables, y)
    u = T.fwht(tables["signs"] * pad(y, plan.n), plan.block)
    u = tables["gaussian"] * jnp.take(u, tables["permutation"])  # Π: gather
    return crop(T.fwht(u, plan.block), plan.d) * _scale(plan, tables["gaussian"])


register(Algorithm(
    name="ffd",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("tables", "block", "form"),
    needs_m_at_most_d=True,
    summary="Fastfood as used for intrinsic dimension (transposed; form='blocked': Le et al.'s blocked "
            "form, eq. 12); NOT a valid sketch (Theorem 3.1)",
))
