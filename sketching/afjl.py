"""AFJL, the paper's eq. (7) (Schioppa 2024, Sec. 3; PAPER §2.4), and our segment-sum variant.

Paper (reduction="slice", the default):

    Φ x  = √(n/m) · G_m ⊙ R_m( H^{π1} B · pad_n(x) )
    Φᵀ w = √(n/m) · crop_D( B (H^{π1})ᵀ pad_n(G_m ⊙ w) )

n = 2^⌈log2 D⌉, B random signs, H^{π1} = ⊗_i P_i H_{b_i} the Kronecker Walsh–Hadamard whose factors
have independently permuted rows, R_m the first m coordinates and G_m m i.i.d. N(0, 1) (R_m G_v =
G_m R_m: only the first m Gaussians of the paper's G_v matter). It is AFFD without H^{π2}; the row
permutation is what makes R_m pick a random (Kronecker-structured) set of m Hadamard rows — without
it the first m rows of H_n are √(m/n)[H_m … H_m] and the map fails on Theorem 3.1's input. Any
m ≤ n works. Unbiased: every column of R_m H has squared norm m/n. The paper proves no theorem for
AFJL, and it concentrates worse than AFFD on inputs aligned with a Kronecker factor (e.g. supported
on every b-th coordinate; tests/sketching/test_paper_maps.py measures it).
Cost: only the m rows that R_m keeps are computed (`transforms.Mixer.forward_rows`: the leading
Kronecker factors reduce to single rows, applied first as weighted sums of slabs), O(n + m Σ b_i)
instead of the full transform's O(n Σ b_i); at D = 22.6 M, m = 4096 one vector takes 0.12 s instead
of 0.64 s on 2 CPU cores.

Ours (reduction="segsum"): Φ x = SegSum_m( γ ⊙ M B · pad_n(x) ), SegSum_m(v)_k = Σ_{l<n/m} v_{k·n/m+l},
with an n-vector γ and an unpermuted mixer M; Φᵀw = crop_D(B Mᵀ(γ ⊙ repeat(w, n/m))). Summing a
whole segment instead of keeping one coordinate makes each output a Gaussian with the segment's
energy as variance, which concentrates like a dense Gaussian on the stride inputs where the slice
does not. E‖Φx‖² = ‖x‖² exactly for any orthogonal M. Needs m | n (a power of two with
"hadamard"/"orthogonal"; with "hartley" n = ⌈D/m⌉·m and any m works).

Options:
  reduction: "slice" (the paper's, default) | "segsum" (ours).
  preconditioner: "hadamard" (default) | "hartley" (discrete Hartley transform, n = D; stands in for
      the paper's unspecified FFT. Hartley rows do not all have the same energy in the first m
      coordinates, so with "slice" the kept window of m rows starts at a random cyclic offset k₀,
      which makes the map exactly unbiased) | "orthogonal" (Kronecker Haar, the paper's Q, applied
      without B by default).
  signs: None (default: B except before "orthogonal", as in the paper) | True | False.
  diagonal: "gaussian" (the paper's G, default) | "rademacher" (ours, ±1; cheaper to regenerate,
      never a larger variance).
  block: largest Kronecker factor (default 64 on CPU, 1024 on accelerators); tables.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.affd import check_signs
from sketching.base import Algorithm, register
from sketching.layout import crop, pad

DIAGONALS = ("gaussian", "rademacher")
REDUCTIONS = ("slice", "segsum")


@dataclasses.dataclass(frozen=True)
class AFJLPlan:
    d: int
    n: int
    m: int
    mixer: T.Mixer
    diagonal: str
    reduction: str
    signs: bool


def make_plan(layout, m, preconditioner="hadamard", block=None, diagonal="gaussian", reduction="slice", signs=None):
    if diagonal not in DIAGONALS:
        raise ValueError(f"diagonal={diagonal!r}; allowed values: {list(DIAGONALS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed values: {list(REDUCTIONS)}")
    if preconditioner not in T.MIXERS:
        raise ValueError(f"preconditioner={preconditioner!r}; allowed values: {list(T.MIXERS)}")
    use_signs = check_signs(signs, preconditioner)
    d = layout.size
    if reduction == "segsum" and preconditioner == "hartley":
        n = -(-d // m) * m
    else:
        n = T.Mixer.padded_length(preconditioner, d)
        if reduction == "segsum" and n % m:
            raise ValueError(
                f"afjl with reduction='segsum' and preconditioner={preconditioner!r} needs m to divide the padded "
                f"length n={n}: m must be a power of two, got m={m} (or use preconditioner='hartley' for any m)"
            )
        if m > n:  # pragma: no cover - m <= D <= n is checked by get()
            raise ValueError(f"afjl needs m <= n={n}, got m={m}")
    permute = "rows" if reduction == "slice" else "none"
    mixer = T.Mixer(preconditioner, n, T.check_block(block), permute)
    return AFJLPlan(d=d, n=n, m=m, mixer=mixer, diagonal=diagonal, reduction=reduction, signs=use_signs)


def _offset_needed(plan) -> bool:
    return plan.reduction == "slice" and plan.mixer.kind == "hartley"


def small_tables(key, plan, dtype):
    tables = {"mixer": plan.mixer.tables(T.component_key(key, T.TAG_MIXER_1), dtype)}
    if _offset_needed(plan):
        tables["offset"] = jax.random.randint(T.component_key(key, T.TAG_INDICES), (), 0, plan.n)
    return tables


def large_tables(key, plan, dtype):
    length = plan.m if plan.reduction == "slice" else plan.n
    diagonal_key = T.component_key(key, T.TAG_GAUSSIAN)
    if plan.diagonal == "gaussian":
        diagonal = T.random_normal(diagonal_key, (length,), dtype)
    else:
        diagonal = T.random_signs(diagonal_key, length, dtype)
    tables = {"diagonal": diagonal}
    if plan.signs:
        tables["signs"] = T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype)
    return tables


def forward(plan, tables, x):
    u = pad(x, plan.n)
    if plan.signs:
        u = tables["signs"] * u
    if plan.reduction == "segsum":
        y = plan.mixer.forward(tables["mixer"], u)
        return (tables["diagonal"] * y).reshape(plan.m, plan.n // plan.m).sum(axis=1)
    if _offset_needed(plan):
        y = jnp.roll(plan.mixer.forward(tables["mixer"], u), -tables["offset"])[..., :plan.m]
    else:  # only the m kept rows of the Kronecker mixer are applied
        y = plan.mixer.forward_rows(tables["mixer"], u, plan.m)
    return tables["diagonal"] * y * math.sqrt(plan.n / plan.m)


def adjoint(plan, tables, w):
    if plan.reduction == "segsum":
        spread = jnp.broadcast_to(w[:, None], (plan.m, plan.n // plan.m)).reshape(-1)
        v = tables["diagonal"] * spread
    elif _offset_needed(plan):
        v = jnp.roll(pad(tables["diagonal"] * w, plan.n) * math.sqrt(plan.n / plan.m), tables["offset"])
    else:
        u = plan.mixer.transpose_rows(tables["mixer"], tables["diagonal"] * w * math.sqrt(plan.n / plan.m), plan.m)
        if plan.signs:
            u = tables["signs"] * u
        return crop(u, plan.d)
    u = plan.mixer.transpose(tables["mixer"], v)
    if plan.signs:
        u = tables["signs"] * u
    return crop(u, plan.d)


register(Algorithm(
    name="afjl",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("preconditioner", "tables", "block", "diagonal", "reduction", "signs"),
    needs_m_at_most_d=True,
    summary="the paper's AFJL, eq. (7): signs, row-permuted Kronecker Hadamard, first m coordinates, "
            "Gaussian diagonal (no look-ups); reduction='segsum' is our segment-sum variant",
))
