"""FFD: the Fastfood transform as used for intrinsic dimension, in the sketching direction (SPEC §2.3).

Li et al. (2018) and Aghajanyan et al. (2021) map ω ∈ R^m to parameters with

    P ω = c · crop_D( H G Π H B · pad_n(ω) ),        n = 2^⌈log2 D⌉,

B random signs, H orthonormal Walsh–Hadamard, Π a random permutation ((Πu)_i = u[π_i], a gather),
G a Gaussian diagonal. The sketch is the transpose,

    Φ_FFD x = Pᵀ x = c · crop_m( B H Πᵀ G H · pad_n(x) ),   c = √(n/m) / rms(γ),

so that E‖Φx‖² ≈ ‖x‖². It is included as the baseline the paper shows is *not* a sketch
(Theorem 3.1, SPEC §3.1): x is Hadamard-transformed before any sign flip, so Walsh-aligned inputs
collapse onto one or two coordinates and ‖Φx‖² ~ χ²_r/r for every m. Its permutation is a
look-up of size n (stored with tables="store", as the intrinsic-dimension code does, or regenerated
by a sort inside every call with the default tables="regenerate").
Options: tables, block.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, pad


def small_tables(key, plan, dtype):
    return {}


def large_tables(key, plan, dtype):
    return {
        "signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype),
        "gaussian": T.random_normal(T.component_key(key, T.TAG_GAUSSIAN), (plan.n,), dtype),
        "permutation": jax.random.permutation(T.component_key(key, T.TAG_PERMUTATION), plan.n),
    }


def _scale(plan, gaussian):
    rms = jnp.sqrt(jnp.mean(jnp.square(gaussian)))
    return math.sqrt(plan.n / plan.m) / rms


def forward(plan, tables, x):
    u = tables["gaussian"] * T.fwht(pad(x, plan.n), plan.block)
    u = jnp.zeros_like(u).at[tables["permutation"]].set(u)  # Πᵀ: scatter
    y = tables["signs"] * T.fwht(u, plan.block)
    return crop(y, plan.m) * _scale(plan, tables["gaussian"])


def adjoint(plan, tables, y):
    u = T.fwht(tables["signs"] * pad(y, plan.n), plan.block)
    u = tables["gaussian"] * jnp.take(u, tables["permutation"])  # Π: gather
    return crop(T.fwht(u, plan.block), plan.d) * _scale(plan, tables["gaussian"])


register(Algorithm(
    name="ffd",
    make_plan=T.hadamard_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("tables", "block"),
    needs_m_at_most_d=True,
    summary="Fastfood as used for intrinsic dimension (transposed); NOT a valid sketch (Theorem 3.1)",
))
