"""One process of the multi-host sharding test (run by test_multihost.py): 2 processes x 2 forced CPU
devices each form one 4-device mesh; each process feeds its own half of the batch
(`shard_batch(..., process_local=True)`) and gets back the sketched rows of its own examples
(`process_local_rows`), which must equal the single-device result; the sharded HVP and Lanczos over the
global mesh must equal the unsharded ones. Prints one JSON line."""
from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from attribution import distributed  # noqa: E402

info = distributed.initialize(initialization_timeout=60)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sketching  # noqa: E402
from landscape import hvp_fn, lanczos  # noqa: E402
from sketching import sharded  # noqa: E402


def loss(params, batch):
    z = jnp.tanh(batch["x"] @ params["w"] + params["b"]) @ params["v"]
    return jnp.mean((z - batch["y"]) ** 2)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main() -> dict:
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k1, (6, 8)) / 2, "b": jnp.full((8,), 0.1), "v": jax.random.normal(k2, (8,))}
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(16, 6)).astype(np.float32), "y": rng.normal(size=16).astype(np.float32)}
    sketch = sketching.get("qk", 16)
    state = sketch.init(jax.random.key(1), params)
    reference = np.asarray(sketching.sketch_per_example_gradients(sketch, state, loss, params, batch))

    mesh = sharded.make_mesh()  # the 4 global devices
    p, half = jax.process_index(), 8
    mine = jax.tree.map(lambda a: a[p * half:(p + 1) * half], batch)
    rows = sharded.sharded_sketch_per_example_gradients(
        sketch, state, loss, params, sharded.shard_batch(mine, mesh, process_local=True), mesh)
    local = sharded.process_local_rows(rows)

    vector = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params)
    h0 = hvp_fn(loss, params, [batch])(vector)
    h1 = hvp_fn(loss, params, [batch], mesh=mesh)(vector)
    r0 = lanczos(hvp_fn(loss, params, [batch]), params, 8, key=jax.random.key(3))
    r1 = lanczos(hvp_fn(loss, params, [batch], mesh=mesh), params, 8, key=jax.random.key(3))
    return {**info, "global_shape": list(rows.shape), "spec": str(rows.sharding.spec),
            "local_rows": int(local.shape[0]), "err_rows": rel(local, reference[p * half:(p + 1) * half]),
            "err_hvp": max(rel(a, b) for a, b in zip(jax.tree.leaves(h1), jax.tree.leaves(h0))),
            "err_lanczos": rel(r1.eigenvalues, r0.eigenvalues)}


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
