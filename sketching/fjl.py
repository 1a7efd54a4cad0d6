"""FJL: the fast Johnson–Lindenstrauss transform / subsampled randomized Hadamard.

    Φ x = √(n/m) · S · H_n · B · pad_n(x),     n = 2^⌈log2 D⌉

B: random signs (regenerated from the key), H_n: orthonormal Walsh–Hadamard, S: m coordinates drawn
uniformly *with* replacement (`randint`; a permutation of size n is never built). S is a gather —
the look-up the paper's AFJL removes. Transpose: Φᵀw = √(n/m) · crop_D(B H_n Sᵀ w), Sᵀ a scatter-add.
Options: tables ("regenerate" | "store"), block (largest Hadamard factor).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, pad


def small_tables(key, plan, dtype):
    return {"indices": jax.random.randint(T.component_key(key, T.TAG_INDICES), (plan.m,), 0, plan.n)}


def large_tables(key, plan, dtype):
    return {"signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype)}


def forward(plan, tables, x):
    y = T.fwht(tables["signs"] * pad(x, plan.n), plan.block)
    return jnp.take(y, tables["indices"]) * math.sqrt(plan.n / plan.m)


def adjoint(plan, tables, y):
    z = jnp.zeros((plan.n,), y.dtype).at[tables["indices"]].add(y)
    return crop(tables["signs"] * T.fwht(z, plan.block), plan.d) * math.sqrt(plan.n / plan.m)


register(Algorithm(
    name="fjl",
    make_plan=T.hadamard_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("tables", "block"),
    needs_m_at_most_d=True,
    summary="fast JL: sign flips, Walsh-Hadamard, uniform subsampling (a gather)",
))
