"""Issue 9: sharded per-example sketched gradients, sketch apply and HVP on 8 forced CPU devices equal
the single-device results (the checks run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, see sharded_checks.py), plus single-device unit
tests of the mesh helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sketching import sharded

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 2e-6  # float32, relative to the reference's largest entry


@pytest.fixture(scope="module")
def checks() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


LABELS = ("dense/explicit", "qk/explicit", "afjl/explicit", "afjl/implicit")


def test_eight_devices(checks):
    assert checks["device_count"] == 8


@pytest.mark.parametrize("label", LABELS)
def test_sharded_per_example_sketches_equal_single_device(checks, label):
    for n in (16, 21):  # 21: padded to 24, padding dropped
        assert checks[f"err/{label}/B={n}"] < TOL
        assert checks[f"shape/{label}/B={n}"] == [n, 64]
    # The output stays on the devices that computed it: rows split 8 ways, 2 per device.
    assert checks[f"spec/{label}"] == str(P("data", None))
    assert checks[f"devices/{label}"] == 8
    assert checks[f"shard_rows/{label}"] == [2]
    # Replicated parameters + batch-sharded examples: no collective at all, so no gradient is gathered.
    assert checks[f"collectives/{label}"] == []
    # The sketch applied to batch-sharded per-example gradients.
    assert checks[f"err_apply/{label}"] < TOL
    assert checks[f"spec_apply/{label}"] == str(P("data", None))


def test_fsdp_sharded_params_give_the_same_sketches(checks):
    specs = checks["fsdp_specs"]
    assert specs["w1"] == str(P(None, "model")) and specs["w2"] == str(P("model"))
    assert specs["b2"] == str(P())  # 3 is not divisible by 2: replicated
    for label in LABELS[1:]:
        assert checks[f"err_fsdp/{label}/B=21"] < TOL


def test_sharded_hvp_equals_unsharded(checks):
    assert checks["err/hvp"] < TOL
    assert checks["err/hvp_fsdp"] < TOL
    assert checks["collectives/hvp"] == ["all-reduce"]  # the batch mean, inserted by XLA
    assert checks["err/lanczos_eigenvalues"] < 1e-5


# ------------------------------------------------------------------ single-device unit tests (in-process)

def test_make_mesh_validates():
    mesh = sharded.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == jax.device_count()
    mesh2 = sharded.make_mesh(axes=("data", "model"))
    assert dict(mesh2.shape) == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="num_devices"):
        sharded.make_mesh(jax.device_count() + 1)
    with pytest.raises(ValueError, match="mesh shape"):
        sharded.make_mesh(1, axes=("data", "model"), shape=(2, 2))
    with pytest.raises(ValueError, match="no axis 'model'"):
        sharded.fsdp_shard_params({"w": np.ones(4)}, mesh)


def test_fsdp_spec_picks_the_largest_divisible_dimension():
    assert sharded.fsdp_spec((12, 16), 4) == P(None, "model")
    assert sharded.fsdp_spec((16, 12), 4) == P("model")
    assert sharded.fsdp_spec((12, 12), 4) == P("model")
    assert sharded.fsdp_spec((3, 5), 2) == P()
    assert sharded.fsdp_spec((), 2) == P()
    assert sharded.fsdp_spec((8,), 1) == P()


def test_pad_batch_repeats_the_last_example():
    batch = {"x": np.arange(10.0).reshape(5, 2), "y": np.arange(5)}
    padded, size = sharded.pad_batch(batch, 4)
    assert size == 5 and padded["x"].shape == (8, 2)
    np.testing.assert_array_equal(padded["y"], [0, 1, 2, 3, 4, 4, 4, 4])
    same, size = sharded.pad_batch(batch, 5)
    assert same is batch and size == 5


def test_one_device_mesh_matches_unsharded():
    import jax.numpy as jnp

    import sketching

    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.ones(3)}

    def loss(p, batch):
        return jnp.mean((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2)

    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(5, 4)).astype(np.float32), "y": rng.normal(size=(5, 3)).astype(np.float32)}
    sketch = sketching.get("afjl", 8)
    state = sketch.init(jax.random.key(0), params)
    ref = sketching.sketch_per_example_gradients(sketch, state, loss, params, batch)
    got = sharded.sharded_sketch_per_example_gradients(sketch, state, loss, params, batch, sharded.make_mesh(1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mode"):
        sharded.sharded_sketch_per_example_gradients(sketch, state, loss, params, batch, sharded.make_mesh(1),
                                                     mode="nope")
