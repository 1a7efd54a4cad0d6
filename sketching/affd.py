"""AFFD: Fastfood without the look-up, signs on the input side (the paper's AFFD, SPEC §2.4).

    Φ x  = √(n/m) · crop_m( M₂ G M₁ B · pad_n(x) )
    Φᵀ w = √(n/m) · crop_D( B M₁ᵀ G M₂ᵀ · pad_n(w) )

B random signs, G a Gaussian diagonal, M₁, M₂ orthogonal mixers ("pre-conditioners", the paper's
Table 4 axis): "hadamard" (M₁ = M₂ = H_n, n = 2^⌈log2 D⌉: two Walsh–Hadamard transforms, the
paper's HN), "hartley" (discrete Hartley transform, n = D, no padding; the FFT option) or
"orthogonal" (independent Kronecker products of Haar matrices; the Q option).
Why it is a sketch (Theorem 3.2, SPEC §3.2): y = M₁Bx is flat w.h.p. for every fixed x; given y the
outputs are jointly Gaussian with covariance (n/m)·S M₂ diag(y²) M₂ᵀ Sᵀ whose trace is ‖x‖².
Nested in m: b, γ (and the mixers) do not depend on m, so Φ_{2m}ᵀ[√2 ω; 0] = Φ_mᵀ ω, which
intrinsic-dimension search uses to double the subspace and continue (SPEC §4.3, test T13).
Options: preconditioner ("hadamard" | "hartley" | "orthogonal"), tables, block.
"""
from __future__ import annotations

import dataclasses
import math

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, pad


@dataclasses.dataclass(frozen=True)
class AFFDPlan:
    d: int
    n: int
    m: int
    mixer: T.Mixer


def make_plan(layout, m, preconditioner="hadamard", block=None):
    if preconditioner not in T.MIXERS:
        raise ValueError(f"preconditioner={preconditioner!r}; allowed values: {list(T.MIXERS)}")
    n = T.Mixer.padded_length(preconditioner, layout.size)
    return AFFDPlan(d=layout.size, n=n, m=m, mixer=T.Mixer(preconditioner, n, T.check_block(block)))


def small_tables(key, plan, dtype):
    return {
        "mixer_1": plan.mixer.tables(T.component_key(key, T.TAG_MIXER_1), dtype),
        "mixer_2": plan.mixer.tables(T.component_key(key, T.TAG_MIXER_2), dtype),
    }


def large_tables(key, plan, dtype):
    return {
        "signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype),
        "gaussian": T.random_normal(T.component_key(key, T.TAG_GAUSSIAN), (plan.n,), dtype),
    }


def forward(plan, tables, x):
    mix = plan.mixer
    y = mix.forward(tables["mixer_1"], tables["signs"] * pad(x, plan.n))
    y = mix.forward(tables["mixer_2"], tables["gaussian"] * y)
    return crop(y, plan.m) * math.sqrt(plan.n / plan.m)


def adjoint(plan, tables, w):
    mix = plan.mixer
    u = mix.transpose(tables["mixer_2"], pad(w, plan.n))
    u = tables["signs"] * mix.transpose(tables["mixer_1"], tables["gaussian"] * u)
    return crop(u, plan.d) * math.sqrt(plan.n / plan.m)


register(Algorithm(
    name="affd",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("preconditioner", "tables", "block"),
    needs_m_at_most_d=True,
    summary="the paper's AFFD: signs, mixer, Gaussian diagonal, mixer, slice (no look-ups)",
))
