"""How a parameter PyTree becomes a vector in R^D and back ("global" layout).

Every sketch sees the PyTree through one `Layout`: leaves are flattened in `jax.tree_util` order,
each leaf row-major, and concatenated into one vector of length D in the *compute dtype* (float32,
or float64 when the template is float64 and x64 is enabled; bfloat16/float16 leaves are sketched in
float32). Padding to the length a transform needs (a power of two, a multiple of a block
product) is done by each sketch with `pad` / `crop` below, always with zeros after the last leaf, so padded coordinates never receive updates in implicit mode.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of a PyTree of float arrays: structure, shapes, dtypes and D."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[Any, ...]
    compute_dtype: Any

    @property
    def size(self) -> int:
        """D, the number of scalars in the tree."""
        return int(sum(math.prod(s) for s in self.shapes))

    @classmethod
    def from_template(cls, template: PyTree) -> "Layout":
        """Builds the layout of `template` (arrays or `jax.ShapeDtypeStruct`s).

        Raises ValueError for an empty tree or a leaf that is not a floating-point array.
        """
        leaves, treedef = jax.tree_util.tree_flatten(template)
        if not leaves:
            raise ValueError("template has no array leaves: a sketch needs at least one float array")
        shapes, dtypes = [], []
        for path, leaf in zip(_leaf_paths(template), leaves):
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise ValueError(f"template leaf {path} is {type(leaf).__name__}, expected an array or ShapeDtypeStruct")
            dtype = np.dtype(leaf.dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"template leaf {path} has dtype {dtype}; sketches need floating-point leaves "
                    "(float16, bfloat16, float32, float64)"
                )
            shapes.append(tuple(int(d) for d in leaf.shape))
            dtypes.append(dtype)
        compute = jnp.result_type(jnp.float32, *dtypes)
        if not jnp.issubdtype(compute, jnp.floating):  # pragma: no cover - guarded above
            raise ValueError(f"cannot sketch dtypes {dtypes}")
        size = sum(math.prod(s) for s in shapes)
        if size == 0:
            raise ValueError("template has only empty leaves (D = 0)")
        return cls(treedef, tuple(shapes), tuple(dtypes), np.dtype(compute))

    def check(self, tree: PyTree, what: str = "input") -> list[jax.Array]:
        """Returns the leaves of `tree` after checking it has the template's structure and shapes."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"{what} tree structure {treedef} does not match the sketch template {self.treedef}")
        for i, (leaf, shape) in enumerate(zip(leaves, self.shapes)):
            if tuple(jnp.shape(leaf)) != shape:
                raise ValueError(f"{what} leaf {i} has shape {tuple(jnp.shape(leaf))}, the template has {shape}")
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                raise ValueError(f"{what} leaf {i} has dtype {jnp.result_type(leaf)}, expected a float dtype")
        return leaves

    def flatten(self, tree: PyTree) -> jax.Array:
        """PyTree -> vector of length D in the compute dtype."""
        leaves = self.check(tree)
        parts = [jnp.ravel(leaf).astype(self.compute_dtype) for leaf in leaves]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def unflatten(self, flat: jax.Array) -> PyTree:
        """Vector of length D -> PyTree with the template's shapes; leaves keep the compute dtype."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, expected ({self.size},)")
        leaves, offset = [], 0
        for shape in self.shapes:
            count = math.prod(shape)
            leaves.append(flat[offset:offset + count].reshape(shape))
            offset += count
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _leaf_paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) or "<root>" for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def pad(x: jax.Array, n: int) -> jax.Array:
    """Zero-pads the last axis of `x` to length n (n >= x.shape[-1])."""
    extra = n - x.shape[-1]
    if extra < 0:
        raise ValueError(f"cannot pad a vector of length {x.shape[-1]} to the shorter length {n}")
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def crop(x: jax.Array, k: int) -> jax.Array:
    """Keeps the first k coordinates of the last axis."""
    return x[..., :k]


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
