"""QK, the paper's eq. (8) (Schioppa 2024, Sec. 3, App. C.5; PAPER §2.6), and our sign-sandwich variant.

Paper (construction="paper", the default):

    Φ x  = √(n/m) · (Q₁ ⊗ … ⊗ Q_K) · pad_n(x),     Φᵀ w = √(n/m) · crop_D( (Q₁ᵀ ⊗ … ⊗ Q_Kᵀ) w )

n = 2^⌈log2 D⌉ = ∏ b_i, m = ∏ m_i, and Q_i ∈ R^{m_i×b_i} is the first m_i rows of a Haar matrix
(`transforms.haar_rows`: QR of a b_i×m_i Gaussian with the sign fix, transposed). No signs, no
Gaussian factors, no chunks; x is reshaped row-major to (b₁, …, b_K) and factor i contracts axis i.
Factor sizes b_i follow the paper's Listing 1 (factors of `factor_size`, any remainder first; e.g.
n = 2^27 → (128, 1024, 1024)), or with num_factors=K the most balanced powers of two; the m_i are
the most balanced split of m with m_i ≤ b_i (eq. 16, not the listing's row-major cut), so any m ≤ n
with small prime factors works (m = 2^26 included). E‖Φx‖² = ∏(m_i/b_i)·(n/m)‖x‖² = ‖x‖².
Theorem 3.3 gives δ = 2Σ_i exp(−4C m_i((1+ε)^{1/K}−1)²): weaker than AFFD, and it shows — a spike
or a rank-one x = a⊗c is not mixed before the Kronecker rows, so ‖Φx‖² has relative variance
≈ 2Σ 1/m_i instead of 2/m (measured in tests/sketching/test_paper_maps.py). State: Σ m_i b_i floats.
Default factor_size 1024, the paper's, on every backend: the factor sizes set the map's law (the
m_i), so they are not tuned for speed.

Ours (construction="sandwich"):

    Φ x = (A₁ ⊗ … ⊗ A_k) · Σ_j B′_j (Q₁ ⊗ … ⊗ Q_k) B_j x_j

The zero-padded input is split into C chunks x_j of size c = n₁⋯n_k, each reshaped row-major to
(n₁, …, n_k). Per chunk: random signs B_j, the Kronecker product of Haar-orthogonal Q_i ∈ R^{n_i×n_i}
(shared by all chunks), fresh signs B′_j; the chunk results are summed (E over B′ kills the cross
terms, so the sum stays unbiased) and reduced by the Kronecker Gaussian A_i ∈ R^{m_i×n_i} with
entries N(0, 1/m_i), m = m₁⋯m_k. No gathers, no FWHT: k small matmuls over D numbers and k over c.
Why both sign layers: a Kronecker Gaussian alone has relative variance
≈ 2(1/m₁+1/m₂) on rank-one inputs (distortion ~ m^{-1/4}); B then Q flatten spikes, B′ breaks the
rank-one structure, and then the rate is the dense Gaussian's √(2/m) up to small factors.
Sizes: with D ≥ f^k (f = factor_size) all n_i = f and C = ⌈D/f^k⌉; otherwise one chunk with
n_i ≈ D^{1/k}. m is split into the most balanced m_i ≤ n_i. State: Σ n_i² + Σ m_i n_i floats.
Sandwich defaults: factor_size 256, num_factors 2 (so m ≤ 2^16).

Options: construction ("paper" | "sandwich"), factor_size (largest b_i; default 1024 for "paper",
256 for "sandwich"), num_factors (default: from factor_size for "paper", 2 for "sandwich"), tables.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import crop, next_power_of_two, pad


CONSTRUCTIONS = ("paper", "sandwich")


@dataclasses.dataclass(frozen=True)
class PaperQKPlan:
    d: int
    n: int
    m: int
    in_factors: tuple[int, ...]   # b_i, ∏ b_i = n
    out_factors: tuple[int, ...]  # m_i, ∏ m_i = m
    construction: str = "paper"


@dataclasses.dataclass(frozen=True)
class QKPlan:
    d: int
    m: int
    in_factors: tuple[int, ...]   # n_i
    out_factors: tuple[int, ...]  # m_i
    chunks: int                   # C
    construction: str = "sandwich"

    @property
    def chunk_size(self) -> int:
        return math.prod(self.in_factors)


def _divisors(m: int) -> list[int]:
    small = [i for i in range(1, int(math.isqrt(m)) + 1) if m % i == 0]
    return sorted(set(small + [m // i for i in small]))


def balanced_factors(m: int, caps: tuple[int, ...]) -> tuple[int, ...] | None:
    """m = m₁⋯m_k with m_i ≤ caps[i], as balanced as possible (largest smallest factor); None if impossible."""
    if len(caps) == 1:
        return (m,) if m <= caps[0] else None
    best = None
    for first in _divisors(m):
        if first > caps[0]:
            break
        rest = balanced_factors(m // first, caps[1:])
        if rest is None:
            continue
        candidate = (first,) + rest
        if best is None or (min(candidate), -max(candidate)) > (min(best), -max(best)):
            best = candidate
    return best


def paper_in_factors(n: int, factor_size: int | None, num_factors: int | None) -> tuple[int, ...]:
    """Factor sizes b_i (powers of two, ∏ b_i = n): Listing 1's shapes with factors of at most
    `factor_size` (default 1024), or K = num_factors balanced ones (each at most factor_size if given)."""
    if num_factors is None:
        factor_size = 1024 if factor_size is None else factor_size
        if factor_size & (factor_size - 1):
            raise ValueError(f"qk with construction='paper' needs factor_size to be a power of two, got {factor_size}")
        return tuple(reversed(T.power_of_two_blocks(n, factor_size)))  # remainder first (Listing 1)
    log_n = n.bit_length() - 1
    exponents = [log_n // num_factors + (1 if i < log_n % num_factors else 0) for i in range(num_factors)]
    factors = tuple(1 << e for e in sorted(exponents))
    if factor_size is not None and max(factors) > factor_size:
        raise ValueError(
            f"qk with construction='paper': num_factors={num_factors} needs factors up to {max(factors)} for "
            f"n={n}, above factor_size={factor_size}; raise num_factors or factor_size"
        )
    return factors


def make_plan(layout, m, construction="paper", factor_size=None, num_factors=None):
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction={construction!r}; allowed values: {list(CONSTRUCTIONS)}")
    if num_factors is not None and (isinstance(num_factors, bool) or not isinstance(num_factors, int) or num_factors < 1):
        raise ValueError(f"num_factors must be a positive int, got {num_factors!r}")
    if factor_size is not None and (isinstance(factor_size, bool) or not isinstance(factor_size, int) or factor_size < 2):
        raise ValueError(f"factor_size must be an int >= 2, got {factor_size!r}")
    d = layout.size
    if construction == "paper":
        n = next_power_of_two(d)
        in_factors = paper_in_factors(n, factor_size, num_factors)
        out_factors = balanced_factors(m, in_factors)
        if out_factors is None:
            raise ValueError(
                f"qk cannot split m={m} into factors m_i <= b_i with b={in_factors}; use an m with small prime "
                f"factors (e.g. a power of two) or fewer, larger factors"
            )
        return PaperQKPlan(d=d, n=n, m=m, in_factors=in_factors, out_factors=out_factors)
    factor_size = 256 if factor_size is None else factor_size
    num_factors = 2 if num_factors is None else num_factors
    if d >= factor_size ** num_factors:
        in_factors = (factor_size,) * num_factors
        chunks = -(-d // factor_size ** num_factors)
    else:
        side = math.ceil(d ** (1.0 / num_factors) - 1e-9)
        in_factors = (side,) * (num_factors - 1)
        in_factors += (-(-d // math.prod(in_factors)),)
        chunks = 1
    out_factors = balanced_factors(m, in_factors)
    if out_factors is None:
        raise ValueError(
            f"qk cannot split m={m} into {num_factors} factors m_i <= n_i with n={in_factors}; "
            f"use more num_factors, a larger factor_size, or an m with small factors (e.g. a power of two)"
        )
    return QKPlan(d=d, m=m, in_factors=in_factors, out_factors=out_factors, chunks=chunks)


def small_tables(key, plan, dtype):
    if plan.construction == "paper":
        rows = tuple(
            T.haar_rows(T.component_key(key, T.TAG_KRONECKER, i), mi, bi, dtype)
            for i, (mi, bi) in enumerate(zip(plan.out_factors, plan.in_factors))
        )
        return {"haar_rows": rows}
    qs = tuple(
        T.haar_orthogonal(T.component_key(key, T.TAG_MIXER_1, i), n, dtype)
        for i, n in enumerate(plan.in_factors)
    )
    gaussians = tuple(
        jax.random.normal(T.component_key(key, T.TAG_KRONECKER, i), (mi, ni), dtype) / math.sqrt(mi)
        for i, (mi, ni) in enumerate(zip(plan.out_factors, plan.in_factors))
    )
    return {"orthogonal": qs, "gaussian": gaussians}


def large_tables(key, plan, dtype):
    if plan.construction == "paper":
        return {}
    size = plan.chunks * plan.chunk_size
    return {
        "signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), size, dtype),
        "signs_2": T.random_signs(T.component_key(key, T.TAG_SIGNS_2), size, dtype),
    }


def forward(plan, tables, x):
    if plan.construction == "paper":
        return T.kron_apply(tables["haar_rows"], pad(x, plan.n)) * math.sqrt(plan.n / plan.m)
    shape = (plan.chunks, plan.chunk_size)
    u = (tables["signs"] * pad(x, plan.chunks * plan.chunk_size)).reshape(shape)
    u = T.kron_apply(tables["orthogonal"], u)
    u = tables["signs_2"].reshape(shape) * u
    # The sum over chunks as a matvec: written as `.sum(axis=0)`, XLA's CPU backend fuses it with the
    # rotation into a program ~60× slower under vmap (measured on per-example gradients).
    u = jnp.dot(jnp.ones((plan.chunks,), u.dtype), u, precision=T.HIGHEST)
    return T.kron_apply(tables["gaussian"], u)


def adjoint(plan, tables, w):
    if plan.construction == "paper":
        u = T.kron_apply(tuple(q.T for q in tables["haar_rows"]), w)
        return crop(u, plan.d) * math.sqrt(plan.n / plan.m)
    shape = (plan.chunks, plan.chunk_size)
    u = T.kron_apply(tuple(a.T for a in tables["gaussian"]), w)
    u = tables["signs_2"].reshape(shape) * u[None, :]
    u = T.kron_apply(tuple(q.T for q in tables["orthogonal"]), u)
    return crop(tables["signs"] * u.reshape(-1), plan.d)


register(Algorithm(
    name="qk",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("construction", "factor_size", "num_factors", "tables"),
    needs_m_at_most_d=True,
    summary="the paper's QK, eq. (8): Kronecker product of first-m_i-rows-of-Haar factors (matmuls only); "
            "construction='sandwich' is our signs / Haar rotation / signs / Kronecker Gaussian variant",
))
