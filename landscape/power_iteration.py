"""The largest eigenvalue of a symmetric operator by power iteration (von Mises 1929).

    v_0 ~ N(0, I),   w_t = A v_t / ‖v_t‖,   v_{t+1} = w_t

converges to the top eigenvector at the rate (λ_2/λ_1)^t. Two estimates of λ_max after t steps:
`estimate="norm"`: ‖A v̂‖ with v̂ the last normalised iterate (a lower bound for PSD A), and
`estimate="rayleigh"`: the Rayleigh quotient v̂ᵀ A v̂ (the signed largest-magnitude eigenvalue).
Cheap (one matvec per step, one compiled `lax.scan`) and enough to set a damping or a LiSSA scale
relative to λ_max; use `landscape.lanczos` for spectra or accurate values.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["top_eigenvalue", "ESTIMATES"]

ESTIMATES = ("norm", "rayleigh")


def top_eigenvalue(matvec: Callable[[jax.Array], jax.Array], dim: int, *, num_iters: int, key: jax.Array,
                   estimate: str = "norm", dtype=jnp.float32) -> float:
    """Power-iteration estimate of λ_max of the flat operator `matvec: (dim,) -> (dim,)` after
    `num_iters` steps from a Gaussian start drawn from `key`. FloatingPointError if the operator
    returns a non-finite vector."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not isinstance(num_iters, int) or isinstance(num_iters, bool) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate={estimate!r}; allowed values: {list(ESTIMATES)}")

    def normalised(v):
        return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)

    def step(v, _):
        return matvec(normalised(v)), None

    v, _ = jax.lax.scan(step, jax.random.normal(key, (dim,), dtype), None, length=num_iters)
    if estimate == "norm":
        value = float(jnp.linalg.norm(v))
    else:
        unit = normalised(v)
        value = float(unit @ matvec(unit))
    if not jnp.isfinite(value):
        raise FloatingPointError(f"power iteration: the operator returned a non-finite vector (estimate {value})")
    return value
