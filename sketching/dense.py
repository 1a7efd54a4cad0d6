"""Dense Gaussian / Rademacher JL: the reference sketch and the TRAK-style baseline.

    Φ x = R x / √m,   R ∈ R^{m×D},  R_ij ~ N(0, 1)  (or ±1 with distribution="rademacher", TRAK's)

R is never held whole: it is generated in column blocks R_j ∈ R^{m×c} from `fold_in(key, j)` and
Φx = Σ_j R_j x_j / √m is accumulated by a `lax.scan` over blocks, so memory is O(m·c) while time is
O(m·D) per vector (the cost that grows linearly with m, the paper's Fig. 7 / Table 11).
Options: distribution ("gaussian" | "rademacher"), block_elements (≈ m·c, default 2^20).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register
from sketching.layout import pad

DISTRIBUTIONS = ("gaussian", "rademacher")
MAX_M = 2 ** 31 - 1  # XLA indexes the (m,) output and the (m, c) blocks with int32


@dataclasses.dataclass(frozen=True)
class DensePlan:
    d: int
    m: int
    block: int        # columns per generated block, c
    num_blocks: int
    distribution: str


def make_plan(layout, m, distribution="gaussian", block_elements=1 << 20):
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r}; allowed values: {list(DISTRIBUTIONS)}")
    if not isinstance(block_elements, int) or block_elements < 1:
        raise ValueError(f"block_elements must be a positive int, got {block_elements!r}")
    if m > MAX_M:  # refuse before anything is allocated (the output alone is m numbers)
        raise ValueError(f"m={m} exceeds the largest dense sketch dimension {MAX_M} (int32 indexing); its (m,) "
                         f"output alone would need {m * 4 / 2 ** 30:.3g} GiB in float32 and every projection "
                         "costs m·D multiply-adds. Use a smaller m")
    d = layout.size
    block = max(1, min(d, block_elements // m))
    return DensePlan(d=d, m=m, block=block, num_blocks=-(-d // block), distribution=distribution)


def _block(plan: DensePlan, key, j, dtype):
    """Column block j of R (shape (m, c)), regenerated from the key."""
    k = jax.random.fold_in(T.component_key(key, T.TAG_DENSE_BLOCK), j)
    if plan.distribution == "gaussian":
        return jax.random.normal(k, (plan.m, plan.block), dtype)
    return T.random_signs(k, plan.m * plan.block, dtype).reshape(plan.m, plan.block)


def small_tables(key, plan, dtype):
    return {}


def large_tables(key, plan, dtype):
    return {}


def forward(plan: DensePlan, tables, x):
    key = tables["key"]
    xb = pad(x, plan.num_blocks * plan.block).reshape(plan.num_blocks, plan.block)

    def step(acc, inputs):
        j, xj = inputs
        r = _block(plan, key, j, x.dtype)
        return acc + jnp.dot(r, xj, precision=T.HIGHEST), None

    acc, _ = jax.lax.scan(step, jnp.zeros((plan.m,), x.dtype), (jnp.arange(plan.num_blocks), xb))
    return acc / jnp.sqrt(jnp.asarray(plan.m, x.dtype))


def adjoint(plan: DensePlan, tables, y):
    key = tables["key"]
    def step(_, j):
        r = _block(plan, key, j, y.dtype)
        return None, jnp.dot(r.T, y, precision=T.HIGHEST)

    _, cols = jax.lax.scan(step, None, jnp.arange(plan.num_blocks))
    return cols.reshape(-1)[: plan.d] / jnp.sqrt(jnp.asarray(plan.m, y.dtype))


register(Algorithm(
    name="dense",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("distribution", "block_elements"),
    needs_m_at_most_d=False,
    summary="dense Gaussian/Rademacher JL generated blockwise from the key (reference, TRAK baseline)",
))
