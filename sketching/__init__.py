"""Sketches of gradients and Hessian-vector products over parameter PyTrees.

    import sketching
    sketch = sketching.get("afjl", m=1024)          # any of sketching.NAMES
    state = sketch.init(jax.random.key(0), params)
    y = sketch.apply(state, grads)                  # (m,), E‖y‖² = ‖grads‖²
    g = sketch.transpose(state, y)                  # PyTree like params

Sketches (Schioppa, NeurIPS 2024, and baselines): dense, fjl, ffd, affd, afjl, qk, sjlt.
`sketching.sharded`: the same per-example sketching data-parallel (and FSDP) over a device mesh.
Imports nothing else from this project.
"""
from sketching import affd, afjl, dense, ffd, fjl, qk, sjlt  # noqa: F401  (registration)
from sketching.base import Sketch, SketchState, describe, get, names
from sketching.gradients import (
    MODES,
    hvp,
    flatten_per_example,
    per_example_gradients,
    sketch_gradient,
    sketch_hvp,
    sketch_per_example_gradients,
    sketched_hessian_operator,
)
from sketching.layout import Layout
from sketching import sharded  # noqa: E402  (multi-device)

NAMES = names()

__all__ = [
    "NAMES", "MODES", "Sketch", "SketchState", "Layout", "get", "describe",
    "sketch_gradient", "sketch_per_example_gradients", "per_example_gradients", "flatten_per_example",
    "hvp", "sketch_hvp", "sketched_hessian_operator",
]
