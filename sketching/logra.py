"""LoGra: per-layer two-sided (Kronecker) gradient projection (Choe et al. 2024, "What is Your Data
Worth to GPT? LLM-Scale Data Valuation with Influence Functions", §3).

For a matrix leaf G ∈ R^{a×c} (a Dense kernel (in, out); a leaf of more dimensions is read as
(prod(shape[:-1]), shape[-1])) LoGra keeps

    Φ_ℓ G = P_inᵀ G P_out ∈ R^{r_a×r_c},   P_in ∈ R^{a×r_a}, P_out ∈ R^{c×r_c} i.i.d. N(0, 1/r_a), N(0, 1/r_c)

i.e. the Kronecker-structured projection (P_in ⊗ P_out)ᵀ vec(G), with r_a = min(rank, a),
r_c = min(rank, c). Scaling: E‖P_inᵀ G P_out‖²_F = tr(Gᵀ E[P_in P_inᵀ] G E[P_out P_outᵀ]) = ‖G‖²_F.
Its point is that for a layer gradient G = Xᵀ Δ (inputs X (T, a), output gradients Δ (T, c)) the
projection is computed as (X P_in)ᵀ (Δ P_out) without materialising G: `project_from_activations`.
The remaining 1-D leaves (biases, norms) are concatenated and sketched by one dense Gaussian JL
(N(0, 1/m_v) entries, regenerated from the key) into the m_v = m − Σ_ℓ r_a r_c dimensions left over.

Options: `rank` (per-side rank; default None = the largest r with Σ_ℓ min(r,a)·min(r,c) ≤ m − [1 if
there are 1-D leaves]). m must be ≥ Σ_ℓ r_a r_c + [1-D leaves present]; with no 1-D leaves m must equal
Σ_ℓ r_a r_c exactly (ValueError otherwise, naming the attainable m).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sketching import transforms as T
from sketching.base import TABLE_MODES, Algorithm, Sketch, SketchState, _check_m
from sketching.layout import Layout

TAG_LOGRA_IN = 3000
TAG_LOGRA_OUT = 3001
TAG_LOGRA_VECTOR = 3002


@dataclasses.dataclass(frozen=True)
class LograPlan:
    d: int
    m: int
    matrices: tuple[tuple[int, int, int, int, int, int], ...]  # (leaf, offset, a, c, r_a, r_c)
    vectors: tuple[tuple[int, int], ...]                        # (offset, size) of 1-D leaves
    m_vector: int

    @property
    def d_vector(self) -> int:
        return sum(s for _, s in self.vectors)


def _matrix_dims(shapes):
    out, vec, offset = [], [], 0
    for i, shape in enumerate(shapes):
        size = math.prod(shape)
        if len(shape) >= 2:
            out.append((i, offset, math.prod(shape[:-1]), shape[-1]))
        elif size:
            vec.append((offset, size))
        offset += size
    return out, vec


def make_plan(layout, m, rank=None):
    mats, vecs = _matrix_dims(layout.shapes)

    def used(r):
        return sum(min(r, a) * min(r, c) for _, _, a, c in mats)

    reserve = 1 if vecs else 0
    if rank is None:
        if not mats:
            r = 0
        else:
            r, top = 0, max(max(a, c) for _, _, a, c in mats)
            while r < top and used(r + 1) <= m - reserve:
                r += 1
            if r == 0:
                raise ValueError(f"m={m} is too small for LoGra: one rank per matrix leaf needs m >= {used(1) + reserve}")
    else:
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"rank={rank!r}; must be a positive int or None")
        r = int(rank)
        if used(r) + reserve > m:
            raise ValueError(f"m={m} < {used(r) + reserve} = Σ_ℓ min(rank,a)·min(rank,c) (+1 for the 1-D leaves) "
                             f"needed by rank={r}")
    m_vector = m - used(r)
    if not vecs and m_vector:
        raise ValueError(f"m={m} is not attainable by LoGra on this tree (no 1-D leaves take the remainder): "
                         f"m must be Σ_ℓ min(r,a)·min(r,c), e.g. {used(r)} (r={r}) or {used(r + 1)} (r={r + 1})")
    matrices = tuple((i, off, a, c, min(r, a), min(r, c)) for i, off, a, c in mats)
    return LograPlan(d=layout.size, m=m, matrices=matrices, vectors=tuple(vecs), m_vector=m_vector)


def small_tables(key, plan: LograPlan, dtype):
    """The per-layer factors P_in (a, r_a), P_out (c, r_c): O(r (a + c)) numbers per layer."""
    tables = {}
    for leaf, _, a, c, ra, rc in plan.matrices:
        tables[f"in_{leaf}"] = jax.random.normal(T.component_key(key, TAG_LOGRA_IN, leaf), (a, ra), dtype) / math.sqrt(ra)
        tables[f"out_{leaf}"] = jax.random.normal(T.component_key(key, TAG_LOGRA_OUT, leaf), (c, rc), dtype) / math.sqrt(rc)
    return tables


def large_tables(key, plan: LograPlan, dtype):
    if not plan.vectors:
        return {}
    g = jax.random.normal(T.component_key(key, TAG_LOGRA_VECTOR), (plan.m_vector, plan.d_vector), dtype)
    return {"vector": g / math.sqrt(plan.m_vector)}


def _vector_table(plan, tables, dtype):
    return tables["vector"]


def forward(plan: LograPlan, tables, x):
    hi = jax.lax.Precision.HIGHEST
    parts = []
    for leaf, off, a, c, ra, rc in plan.matrices:
        g = x[off:off + a * c].reshape(a, c)
        parts.append(jnp.matmul(jnp.matmul(tables[f"in_{leaf}"].T, g, precision=hi), tables[f"out_{leaf}"],
                                precision=hi).reshape(-1))
    if plan.vectors:
        v = jnp.concatenate([x[off:off + s] for off, s in plan.vectors])
        parts.append(jnp.matmul(_vector_table(plan, tables, x.dtype), v, precision=hi))
    return jnp.concatenate(parts)


def adjoint(plan: LograPlan, tables, y):
    hi = jax.lax.Precision.HIGHEST
    out = jnp.zeros((plan.d,), y.dtype)
    pos = 0
    for leaf, off, a, c, ra, rc in plan.matrices:
        block = y[pos:pos + ra * rc].reshape(ra, rc)
        pos += ra * rc
        g = jnp.matmul(jnp.matmul(tables[f"in_{leaf}"], block, precision=hi), tables[f"out_{leaf}"].T, precision=hi)
        out = out.at[off:off + a * c].set(g.reshape(-1))
    if plan.vectors:
        v = jnp.matmul(_vector_table(plan, tables, y.dtype).T, y[pos:], precision=hi)
        start = 0
        for off, s in plan.vectors:
            out = out.at[off:off + s].set(v[start:start + s])
            start += s
    return out


def project_from_activations(state, leaf: int, x: jax.Array, delta: jax.Array) -> jax.Array:
    """LoGra's block for matrix leaf number `leaf` (its index in the flattened tree) of the gradient
    G = Σ_t x_t δ_tᵀ, computed as (X P_in)ᵀ (Δ P_out) from inputs x (..., T, a) and output gradients
    delta (..., T, c) without forming G. Returns (..., r_a · r_c), the same numbers `apply` puts in
    that leaf's slot."""
    if f"in_{leaf}" not in state.tables:
        raise ValueError(f"leaf={leaf} is not a matrix leaf of this LoGra sketch; matrix leaves: "
                         f"{[m[0] for m in state.plan.matrices]}")
    hi = jax.lax.Precision.HIGHEST
    xp = jnp.matmul(x, state.tables[f"in_{leaf}"], precision=hi)
    dp = jnp.matmul(delta, state.tables[f"out_{leaf}"], precision=hi)
    blk = jnp.einsum("...ti,...to->...io", xp, dp, precision=hi)
    return blk.reshape(blk.shape[:-2] + (-1,))


def slot(state, leaf: int) -> slice:
    """Where matrix leaf `leaf`'s block lies in the output of `apply`."""
    pos = 0
    for i, _, _, _, ra, rc in state.plan.matrices:
        if i == leaf:
            return slice(pos, pos + ra * rc)
        pos += ra * rc
    raise ValueError(f"leaf={leaf} is not a matrix leaf; matrix leaves: {[m[0] for m in state.plan.matrices]}")


ALGORITHM = Algorithm(
    name="logra",
    make_plan=make_plan,
    small_tables=small_tables,
    large_tables=large_tables,
    forward=forward,
    adjoint=adjoint,
    options=("rank", "tables"),
    needs_m_at_most_d=True,
    summary="LoGra: per-layer Kronecker projection P_inᵀ G P_out (+ Gaussian JL of 1-D leaves)",
)


def get(m: int, rank: int | None = None, tables: str = "regenerate") -> Sketch:
    """The LoGra sketch in the protocol of `sketching.get` (init / apply / transpose).

    Not (yet) in the global registry: tests/sketching/test_protocol.py pins the registered names.
    Registering is `sketching.base.register(logra.ALGORITHM)` plus an import in sketching/__init__.py,
    after which `sketching.get("logra", m, rank=...)` returns the same sketch."""
    m = _check_m(m)
    if tables not in TABLE_MODES:
        raise ValueError(f"tables={tables!r}; allowed values: {list(TABLE_MODES)}")

    def init(key, template):
        layout = Layout.from_template(template)
        if m > layout.size:
            raise ValueError(f"sketch 'logra' needs m <= D (it reduces dimension), got m={m} for a tree with D={layout.size}")
        plan = make_plan(layout, m, rank=rank)
        dtype = layout.compute_dtype
        state_tables = dict(small_tables(key, plan, dtype))
        if tables == "store":
            state_tables.update(large_tables(key, plan, dtype))
        return SketchState(key=key, tables=state_tables, layout=layout, plan=plan)

    def _all(state):
        out = {"key": state.key, **state.tables}
        if tables == "regenerate":
            out.update(large_tables(state.key, state.plan, state.layout.compute_dtype))
        return out

    def apply(state, tree):
        return forward(state.plan, _all(state), state.layout.flatten(tree))

    def transpose(state, y):
        y = jnp.asarray(y)
        if y.shape != (m,):
            raise ValueError(f"transpose expects a vector of shape ({m},), got {y.shape}")
        return state.layout.unflatten(adjoint(state.plan, _all(state), y.astype(state.layout.compute_dtype)))

    return Sketch(init=init, apply=apply, transpose=transpose, name="logra", m=m)
