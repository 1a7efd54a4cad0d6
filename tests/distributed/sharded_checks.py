"""Sharded vs single-device results on 8 forced CPU devices (run as a script by test_sharded.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/distributed/sharded_checks.py

The device count is fixed when JAX starts, so these checks run in their own process (pytest's has
one device). Prints one JSON object: max absolute errors vs the single-device functions (scaled by
the reference's max), output shardings and the collectives found in compiled programs.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sketching  # noqa: E402
from landscape import hvp_fn, lanczos  # noqa: E402
from sketching import sharded  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def init(key, din=12, hidden=16, dout=3):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (din, hidden)) / np.sqrt(din), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, dout)) / 4.0, "b2": jnp.full((dout,), 0.1)}


def loss(params, batch):
    z = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, batch["y"][:, None], -1)[:, 0])


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 12)).astype(np.float32), "y": rng.integers(0, 3, size=n).astype(np.int32)}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_rel_err(a, b) -> float:
    return max(rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def collectives(compiled_text: str) -> list[str]:
    return [c for c in COLLECTIVES if c in compiled_text]


def main() -> dict:
    out: dict = {"device_count": jax.device_count()}
    params = init(jax.random.key(0))
    mesh = sharded.make_mesh()
    fsdp_mesh = sharded.make_mesh(axes=("data", "model"), shape=(4, 2))
    fsdp_params = sharded.fsdp_shard_params(params, fsdp_mesh)
    out["fsdp_specs"] = {k: str(v.sharding.spec) for k, v in fsdp_params.items()}

    cases = [("dense", {}, "explicit"), ("qk", {}, "explicit"), ("afjl", {}, "explicit"), ("afjl", {}, "implicit")]
    for name, options, mode in cases:
        sketch = sketching.get(name, 64, **options)
        state = sketch.init(jax.random.key(1), params)
        label = f"{name}/{mode}"
        for n in (16, 21):  # divisible by 8, and padded
            batch = data(n)
            ref = sketching.sketch_per_example_gradients(sketch, state, loss, params, batch, mode=mode)
            got = sharded.sharded_sketch_per_example_gradients(sketch, state, loss, params, batch, mesh, mode=mode)
            out[f"err/{label}/B={n}"] = rel_err(got, ref)
            out[f"shape/{label}/B={n}"] = list(got.shape)
            if n == 16:
                out[f"spec/{label}"] = str(got.sharding.spec)
                out[f"devices/{label}"] = len(got.sharding.device_set)
                out[f"shard_rows/{label}"] = sorted({s.data.shape[0] for s in got.addressable_shards})
                st, p, b = sharded._on_mesh(state, mesh), sharded.replicate(params, mesh), sharded.shard_batch(batch, mesh)
                text = sharded.compiled_sharded_fn(sketch, loss, mesh, st, p, b, mode=mode).lower(st, p, b).compile().as_text()
                out[f"collectives/{label}"] = collectives(text)
            if n == 21 and name != "dense":  # FSDP-sharded parameters on a (4 data) x (2 model) mesh
                got = sharded.sharded_sketch_per_example_gradients(sketch, state, loss, fsdp_params, batch, fsdp_mesh,
                                                                   mode=mode)
                out[f"err_fsdp/{label}/B={n}"] = rel_err(got, ref)
        # The sketch applied to per-example gradients that are already batch-sharded on the mesh.
        grads = sharded.shard_batch(sketching.per_example_gradients(loss, params, data(16)), mesh)
        ref = jax.vmap(lambda g: sketch.apply(state, g))(jax.device_get(grads))
        got = sharded.sharded_apply(sketch, state, grads, mesh)
        out[f"err_apply/{label}"] = rel_err(got, ref)
        out[f"spec_apply/{label}"] = str(got.sharding.spec)

    # Sharded HVP: batches of 16 (sharded), 13 (8 sharded + 5 replicated) and 5 (< 8: replicated).
    batches = [data(16, 1), data(13, 2), data(5, 3)]
    vector = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
    ref = hvp_fn(loss, params, batches)(vector)
    got = hvp_fn(loss, params, batches, mesh=mesh)(vector)
    out["err/hvp"] = tree_rel_err(got, ref)
    out["err/hvp_fsdp"] = tree_rel_err(hvp_fn(loss, fsdp_params, batches, mesh=fsdp_mesh)(vector), ref)
    p, b = sharded.replicate(params, mesh), sharded.shard_batch(batches[0], mesh)
    text = jax.jit(lambda p, b, v: sketching.hvp(loss, p, b, v)).lower(p, b, p).compile().as_text()
    out["collectives/hvp"] = collectives(text)
    r0 = lanczos(hvp_fn(loss, params, batches), params, 12, key=jax.random.key(3))
    r1 = lanczos(hvp_fn(loss, params, batches, mesh=mesh), params, 12, key=jax.random.key(3))
    out["err/lanczos_eigenvalues"] = rel_err(r1.eigenvalues, r0.eigenvalues)
    return out


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
