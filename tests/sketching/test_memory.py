"""Compiled memory of `apply` at D = 2^22, m = 4096: a few D floats, never D×m."""
import jax
import jax.numpy as jnp
import pytest

import sketching
from experiments.common.timing import compiled_memory

D, M = 1 << 22, 4096


@pytest.mark.parametrize("name", ["fjl", "afjl", "qk", "sjlt"])
def test_apply_needs_a_few_d_floats_of_temporary_memory(name):
    x = jax.ShapeDtypeStruct((D,), jnp.float32)
    sketch = sketching.get(name, M)
    state = sketch.init(jax.random.key(0), x)
    memory = compiled_memory(sketch.apply, state, x)
    d_floats = memory["temp_bytes"] / (4 * D)
    assert d_floats <= 6, f"{name}: {d_floats:.2f} D floats of temporaries (a D×m matrix would be {M})"
    assert memory["argument_bytes"] <= 1.1 * 4 * D  # the input plus a small state
