"""AFJL: fast JL without the look-up (the paper's AFJL, SPEC §2.5).

    Φ x  = SegSum_m( γ ⊙ M B · pad_n(x) ),   SegSum_m(v)_k = Σ_{l < n/m} v_{k·n/m + l}
    Φᵀ w = crop_D( B Mᵀ ( γ ⊙ repeat(w, n/m) ) )

B random signs, γ a Gaussian diagonal, M one orthogonal mixer (one Walsh–Hadamard transform by
default). The reduction is a reshape and a sum — no gather, no scatter — and its transpose is a
broadcast. E‖Φx‖² = ‖x‖² exactly; given y = MBx (flat w.h.p.) the outputs are independent
Gaussians with variances the segment energies, so m ≳ ε⁻² log(1/δ) log(n/δ) suffices (SPEC §3.4).
Slicing instead of summing (slice_m(HBx)) is *not* a sketch (SPEC §2.9 item 7).
Needs m | n: with the Hadamard/orthogonal mixer n = 2^⌈log2 D⌉ and m must be a power of two; with
"hartley" n = ⌈D/m⌉·m and any m works.
Options: preconditioner ("hadamard" | "hartley" | "orthogonal"), tables, block, diagonal
("gaussian", the default and the construction above, or "rademacher": γ_i = ±1. Each output is then
a random-sign sum over its segment, whose variance 2(Σ y²)² − 2Σ y⁴ is never larger than the
Gaussian's 2(Σ y²)², and signs are ~40× cheaper to regenerate than Gaussians on CPU.)
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, pad


@dataclasses.dataclass(frozen=True)
class AFJLPlan:
    d: int
    n: int
    m: int
    mixer: T.Mixer
    diagonal: str


DIAGONALS = ("gaussian", "rademacher")


def make_plan(layout, m, preconditioner="hadamard", block=None, diagonal="gaussian"):
    if diagonal not in DIAGONALS:
        raise ValueError(f"diagonal={diagonal!r}; allowed values: {list(DIAGONALS)}")
    if preconditioner not in T.MIXERS:
        raise ValueError(f"preconditioner={preconditioner!r}; allowed values: {list(T.MIXERS)}")
    d = layout.size
    if preconditioner == "hartley":
        n = -(-d // m) * m
    else:
        n = T.Mixer.padded_length(preconditioner, d)
        if n % m:
            raise ValueError(
                f"afjl with preconditioner={preconditioner!r} needs m to divide the padded length n={n}: "
                f"m must be a power of two, got m={m} (or use preconditioner='hartley' for any m)"
            )
    return AFJLPlan(d=d, n=n, m=m, mixer=T.Mixer(preconditioner, n, T.check_block(block)), diagonal=diagonal)


def small_tables(key, plan, dtype):
    return {"mixer": plan.mixer.tables(T.component_key(key, T.TAG_MIXER_1), dtype)}


def large_tables(key, plan, dtype):
    diagonal_key = T.component_key(key, T.TAG_GAUSSIAN)
    if plan.diagonal == "gaussian":
        diagonal = T.random_normal(diagonal_key, (plan.n,), dtype)
    else:
        diagonal = T.random_signs(diagonal_key, plan.n, dtype)
    return {"signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype), "diagonal": diagonal}


def forward(plan, tables, x):
    y = tables["diagonal"] * plan.mixer.forward(tables["mixer"], tables["signs"] * pad(x, plan.n))
    return y.reshape(plan.m, plan.n // plan.m).sum(axis=1)


def adjoint(plan, tables, w):
    spread = jnp.broadcast_to(w[:, None], (plan.m, plan.n // plan.m)).reshape(-1)
    u = plan.mixer.transpose(tables["mixer"], tables["diagonal"] * spread)
    return crop(tables["signs"] * u, plan.d)


register(Algorithm(
    name="afjl",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("preconditioner", "tables", "block", "diagonal"),
    needs_m_at_most_d=True,
    summary="the paper's AFJL: signs, one mixer, Gaussian diagonal, segment sums (no look-ups)",
))
