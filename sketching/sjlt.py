"""SJLT / CountSketch: sparse JL with s non-zeros per column (GraSS-style baseline).

    (Φ x)_k = (1/√s) Σ_{t<s} Σ_{i : h_t(i) = k} σ_t(i) x_i

h_t: [D] -> [m] uniform hashes, σ_t random signs, s = `nnz` (1 gives CountSketch). Unbiased:
E‖Φx‖² = ‖x‖². Computed with a segment sum (a scatter, i.e. a look-up); the transpose is a gather.
Options: nnz (default 1), tables.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from sketching import transforms as T
from sketching.base import Algorithm, register


@dataclasses.dataclass(frozen=True)
class SJLTPlan:
    d: int
    m: int
    nnz: int


MAX_M = 2 ** 31 - 1  # hash values are drawn as int32 in [0, m)


def make_plan(layout, m, nnz=1):
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 1:
        raise ValueError(f"nnz (non-zeros per column) must be a positive int, got {nnz!r}")
    if m > MAX_M:  # refuse before the hash tables are drawn (randint in int32 would overflow)
        raise ValueError(f"m={m} exceeds the largest sjlt sketch dimension {MAX_M} (hash values are int32); "
                         f"its (m,) output alone would need {m * 4 / 2 ** 30:.3g} GiB in float32. Use a smaller m")
    if nnz > m:
        raise ValueError(f"nnz={nnz} (non-zeros per column) must be <= m={m}: a column cannot hold more "
                         "distinct non-zeros than the sketch has rows")
    return SJLTPlan(d=layout.size, m=m, nnz=nnz)


def small_tables(key, plan, dtype):
    return {}


def large_tables(key, plan, dtype):
    return {
        "hash": jax.random.randint(T.component_key(key, T.TAG_HASH), (plan.nnz, plan.d), 0, plan.m),
        "signs": T.random_signs(T.component_key(key, T.TAG_SIGNS), plan.nnz * plan.d, dtype).reshape(plan.nnz, plan.d),
    }


def forward(plan, tables, x):
    values = (tables["signs"] * x[None, :]).reshape(-1)
    out = jax.ops.segment_sum(values, tables["hash"].reshape(-1), num_segments=plan.m)
    return out / math.sqrt(plan.nnz)


def adjoint(plan, tables, w):
    return (tables["signs"] * jnp.take(w, tables["hash"])).sum(axis=0) / math.sqrt(plan.nnz)


register(Algorithm(
    name="sjlt",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("nnz", "tables"),
    needs_m_at_most_d=False,
    summary="sparse JL / CountSketch: hashed signed segment sums (a scatter)",
))
