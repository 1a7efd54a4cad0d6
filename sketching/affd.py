"""AFFD, the paper's eq. (6) (Schioppa 2024, Sec. 3; PAPER §2.3), and our unpermuted variant.

    Φ x  = √(n/m) · R_m( H^{π2} G H^{π1} B · pad_n(x) )
    Φᵀ w = √(n/m) · crop_D( B (H^{π1})ᵀ G (H^{π2})ᵀ · pad_n(w) )

n = 2^⌈log2 D⌉, B random signs, G an n-vector of i.i.d. N(0, 1), R_m the first m coordinates.
H^{π1} = ⊗_i P_{1,i} H_{b_i} is the Kronecker Walsh–Hadamard whose factors have independently
permuted *rows*, H^{π2} = ⊗_i H_{b_i} P_{2,i} the one with permuted *columns* (b_i: the factor
sizes, at most `block`). Since G is i.i.d., P₂ G P₁ has the law of P G with the Kronecker
permutation P = P₂P₁: it takes the place of Fastfood's full permutation Π at the cost of Σ b_i
stored integers and no look-up of size n. Nothing of size n×n is formed.
Why it is a sketch (Theorem 3.2): y = H^{π1}Bx is flat w.h.p. for every fixed x; given y the outputs
are jointly Gaussian with covariance (n/m)·R H^{π2} diag(y²) (H^{π2})ᵀ Rᵀ, whose trace is ‖x‖²
exactly because every column of R H has squared norm m/n. E‖Φx‖² = ‖x‖².
Nested in m: B, G, the permutations and the mixers do not depend on m, so Φ_{2m}ᵀ[√2 ω; 0] = Φ_mᵀ ω
(intrinsic-dimension search doubles the subspace and continues).

Options:
  preconditioner: "hadamard" (the paper's H_N, default), "hartley" (discrete Hartley transform,
      n = D, no padding; stands in for the paper's unspecified FFT; no permutations, it is not a
      Kronecker product) or "orthogonal" (independent Kronecker products of Haar factors of at most
      `block` rows, the paper's Q; applied *without* B by default, as the paper does).
  permutations: "kronecker" (default, eq. 6) or "none" (ours: both Hadamards plain Sylvester, i.e.
      P = I; Theorem 3.2's proof allows any column permutation, so it is still a proven sketch and
      costs no permutation tables).
  signs: None (default: B for "hadamard"/"hartley", no B for "orthogonal", as in the paper),
      True or False to force the diagonal B on or off (ours: B before Q is the project's former Q).
  block: largest Kronecker factor (default 64 on CPU, 1024 on accelerators, see
      `transforms.default_block`); tables: "regenerate" | "store".
"""
from __future__ import annotations

import dataclasses
import math

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, pad

PERMUTATIONS = ("kronecker", "none")


@dataclasses.dataclass(frozen=True)
class AFFDPlan:
    d: int
    n: int
    m: int
    mixer_1: T.Mixer
    mixer_2: T.Mixer
    signs: bool


def check_signs(signs, preconditioner: str) -> bool:
    """The `signs` option: None means the paper's choice (no B before the orthogonal Q)."""
    if signs is None:
        return preconditioner != "orthogonal"
    if not isinstance(signs, bool):
        raise ValueError(f"signs={signs!r}; allowed values: [None, True, False]")
    return signs


def make_plan(layout, m, preconditioner="hadamard", block=None, permutations="kronecker", signs=None):
    if preconditioner not in T.MIXERS:
        raise ValueError(f"preconditioner={preconditioner!r}; allowed values: {list(T.MIXERS)}")
    if permutations not in PERMUTATIONS:
        raise ValueError(f"permutations={permutations!r}; allowed values: {list(PERMUTATIONS)}")
    use_signs = check_signs(signs, preconditioner)
    n = T.Mixer.padded_length(preconditioner, layout.size)
    block = T.check_block(block)
    permuted = permutations == "kronecker"
    return AFFDPlan(
        d=layout.size, n=n, m=m,
        mixer_1=T.Mixer(preconditioner, n, block, "rows" if permuted else "none"),
        mixer_2=T.Mixer(preconditioner, n, block, "columns" if permuted else "none"),
        signs=use_signs,
    )


def small_tables(key, plan, dtype):
    return {
        "mixer_1": plan.mixer_1.tables(T.component_key(key, T.TAG_MIXER_1), dtype),
        "mixer_2": plan.mixer_2.tables(T.component_key(key, T.TAG_MIXER_2), dtype),
    }


def large_tables(key, plan, dtype):
    tables = {"gaussian": T.random_normal(T.component_key(key, T.TAG_GAUSSIAN), (plan.n,), dtype)}
    if plan.signs:
        tables["signs"] = T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.n, dtype)
    return tables


def forward(plan, tables, x):
    u = pad(x, plan.n)
    if plan.signs:
        u = tables["signs"] * u
    y = plan.mixer_1.forward(tables["mixer_1"], u)
    y = plan.mixer_2.forward(tables["mixer_2"], tables["gaussian"] * y)
    return crop(y, plan.m) * math.sqrt(plan.n / plan.m)


def adjoint(plan, tables, w):
    u = plan.mixer_2.transpose(tables["mixer_2"], pad(w, plan.n))
    u = plan.mixer_1.transpose(tables["mixer_1"], tables["gaussian"] * u)
    if plan.signs:
        u = tables["signs"] * u
    return crop(u, plan.d) * math.sqrt(plan.n / plan.m)


register(Algorithm(
    name="affd",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("preconditioner", "tables", "block", "permutations", "signs"),
    needs_m_at_most_d=True,
    summary="the paper's AFFD, eq. (6): signs, row-permuted Kronecker Hadamard, Gaussian diagonal, "
            "column-permuted Kronecker Hadamard, first m coordinates (no look-ups); "
            "permutations='none' is our unpermuted variant",
))
