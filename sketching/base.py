"""The sketch protocol: `Sketch(init, apply, transpose)` over parameter PyTrees.

    sketch = sketching.get("afjl", m=1024)
    state = sketch.init(jax.random.key(0), params)   # small: key + O(m + √D) tables
    y = sketch.apply(state, grads)                   # Φ x, shape (m,), linear, jit/vmap-able
    x = sketch.transpose(state, y)                   # Φᵀ y, a PyTree shaped like `params`

Every algorithm is written once as an `Algorithm`: a `plan` (static sizes, validated against the
template), random tables split into *small* ones (always kept in the state: O(m + √D) numbers such
as Kronecker factors or sampled indices) and *large* ones (O(D): sign and Gaussian diagonals,
permutations, hashes) that are regenerated from the key inside `apply` unless the option
`tables="store"` asks to keep them (the paper's "randomness storage" design axis), and a `forward`
(R^D -> R^m) / `adjoint` (R^m -> R^D) pair on flat vectors. This module turns that into the pure
`init / apply / transpose` functions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sketching.layout import Layout

PyTree = Any
TABLE_MODES = ("regenerate", "store")


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["key", "tables"], meta_fields=["layout", "plan"]
)
@dataclasses.dataclass(frozen=True)
class SketchState:
    """What `init` returns. `key` and `tables` are arrays (traced under jit); `layout` (the template's
    structure, shapes and dtypes) and `plan` (the sketch's static sizes) are static metadata."""

    key: jax.Array
    tables: Mapping[str, Any]
    layout: Layout
    plan: Any


class Sketch(NamedTuple):
    """A linear random map Φ: R^D -> R^m over PyTrees, scaled so that E‖Φx‖² = ‖x‖²."""

    init: Callable[[jax.Array, PyTree], SketchState]
    apply: Callable[[SketchState, PyTree], jax.Array]
    transpose: Callable[[SketchState, jax.Array], PyTree]
    name: str
    m: int


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One sketch family. All callables are pure; `plan` objects are frozen (hashable) dataclasses.

    make_plan(layout, m, **options) -> plan           validates m and options against D
    small_tables(key, plan, dtype) -> dict            always stored in the state
    large_tables(key, plan, dtype) -> dict            O(D); regenerated unless tables="store"
    forward(plan, tables, x) -> (m,)                  x: flat (D,) in the compute dtype
    adjoint(plan, tables, y) -> (D,)                  the transpose of forward
    (`tables` passed to forward/adjoint holds the small and large tables and "key".)
    """

    name: str
    make_plan: Callable[..., Any]
    small_tables: Callable[[jax.Array, Any, Any], dict]
    large_tables: Callable[[jax.Array, Any, Any], dict]
    forward: Callable[[Any, Mapping, jax.Array], jax.Array]
    adjoint: Callable[[Any, Mapping, jax.Array], jax.Array]
    options: tuple[str, ...]
    needs_m_at_most_d: bool
    summary: str


_REGISTRY: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    if algorithm.name in _REGISTRY:
        raise ValueError(f"sketch {algorithm.name!r} registered twice")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def describe() -> dict[str, str]:
    """Name -> one-line description of every registered sketch."""
    return {name: alg.summary for name, alg in _REGISTRY.items()}


def _check_m(m: Any) -> int:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
        raise ValueError(f"m (the sketch dimension) must be a positive int, got {m!r}")
    if m <= 0:
        raise ValueError(f"m (the sketch dimension) must be >= 1, got {m}")
    return int(m)


def get(name: str, m: int, **options) -> Sketch:
    """The sketch called `name` with target dimension `m`.

    Options are sketch-specific (see `sketching.describe()` and each module's docstring); every
    sketch except `dense` accepts `tables="regenerate"` (default: O(D) random diagonals and indices
    are regenerated from the key inside `apply`, the state stays small) or `tables="store"` (they are
    computed once in `init` and kept in the state; faster, O(D) memory).
    The names "affd", "afjl", "qk" give the paper's maps (Schioppa 2024, eqs. 6, 7, 8) by default;
    this library's own constructions are options: affd(permutations="none"),
    afjl(reduction="segsum"), qk(construction="sandwich"); ffd(form="blocked") is Le et al.'s
    blocked Fastfood (eqs. 3, 12).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown sketch name={name!r}; allowed values: {sorted(_REGISTRY)}")
    algorithm = _REGISTRY[name]
    m = _check_m(m)
    unknown = sorted(set(options) - set(algorithm.options))
    if unknown:
        raise ValueError(f"sketch {name!r} got unknown options {unknown}; allowed options: {list(algorithm.options)}")
    table_mode = options.pop("tables", "regenerate")
    if table_mode not in TABLE_MODES:
        raise ValueError(f"tables={table_mode!r}; allowed values: {list(TABLE_MODES)}")

    def make_plan(layout: Layout):
        if algorithm.needs_m_at_most_d and m > layout.size:
            raise ValueError(
                f"sketch {name!r} needs m <= D (it reduces dimension), got m={m} for a tree with D={layout.size}"
            )
        return algorithm.make_plan(layout, m, **options)

    def init(key: jax.Array, template: PyTree) -> SketchState:
        layout = Layout.from_template(template)
        plan = make_plan(layout)
        dtype = layout.compute_dtype
        tables = dict(algorithm.small_tables(key, plan, dtype))
        if table_mode == "store":
            tables.update(algorithm.large_tables(key, plan, dtype))
        return SketchState(key=key, tables=tables, layout=layout, plan=plan)

    def _all_tables(state: SketchState) -> Mapping:
        """Stored tables, the regenerated large ones (unless stored) and the key itself."""
        tables = {"key": state.key, **state.tables}
        if table_mode == "regenerate":
            tables.update(algorithm.large_tables(state.key, state.plan, state.layout.compute_dtype))
        return tables

    def apply(state: SketchState, tree: PyTree) -> jax.Array:
        flat = state.layout.flatten(tree)
        return algorithm.forward(state.plan, _all_tables(state), flat)

    def transpose(state: SketchState, y: jax.Array) -> PyTree:
        y = jnp.asarray(y)
        if y.shape != (m,):
            raise ValueError(f"transpose expects a vector of shape ({m},), got {y.shape}")
        y = y.astype(state.layout.compute_dtype)
        flat = algorithm.adjoint(state.plan, _all_tables(state), y)
        return state.layout.unflatten(flat)

    return Sketch(init=init, apply=apply, transpose=transpose, name=name, m=m)
