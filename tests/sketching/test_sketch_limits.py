"""Sketch sizes that cannot work are refused with a clear error before anything is allocated."""
import jax
import jax.numpy as jnp
import pytest

import sketching

PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.ones(2)}


@pytest.mark.parametrize("name", ["dense", "sjlt"])
@pytest.mark.parametrize("m", [2 ** 31, 10 ** 12])
def test_huge_m_is_refused_before_allocating(name, m):
    sketch = sketching.get(name, m)
    with pytest.raises(ValueError, match=rf"m={m} exceeds the largest {name} sketch dimension 2147483647.*GiB"):
        sketch.init(jax.random.key(0), PARAMS)


def test_sjlt_nnz_above_m_is_refused():
    with pytest.raises(ValueError, match=r"nnz=5 .* must be <= m=4"):
        sketching.get("sjlt", 4, nnz=5).init(jax.random.key(0), PARAMS)
    with pytest.raises(ValueError, match="nnz"):
        sketching.get("sjlt", 4, nnz=True).init(jax.random.key(0), PARAMS)
    state = sketching.get("sjlt", 4, nnz=4).init(jax.random.key(0), PARAMS)  # nnz = m is allowed
    assert state.plan.nnz == 4
