"""One process of the distributed index build test (run as a script by test_distributed_index.py).

    python tests/distributed/index_worker.py PATH [--single]

The SKETCHES_* environment variables (attribution.distributed) make it one of several processes;
--single builds the same index with the ordinary single-process `build_index` (the reference).
WORKER_KILL_AFTER=n: the process SIGKILLs itself while computing its (n+1)-th shard (a crash mid-build).
Each computed shard appends its first global row to WORKER_LOG (one file per process), so the test
can check that a resumed build computes only the missing shards. Prints one JSON line at the end.
"""
from __future__ import annotations

import json
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from attribution import distributed  # noqa: E402

info = distributed.initialize(initialization_timeout=60)  # first: before any JAX computation

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sketching  # noqa: E402
from attribution.index import build_index, params_hash, sketched_features_fn  # noqa: E402

N, D_IN, HIDDEN, CLASSES, M, SHARD = 70, 10, 12, 3, 32, 8  # 9 shards (the last of 6 rows)


def model():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN), "b1": jnp.zeros(HIDDEN),
              "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN), "b2": jnp.zeros(CLASSES)}
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(N, D_IN)).astype(np.float32), "y": rng.integers(0, CLASSES, N).astype(np.int32)}
    return params, data


def per_example_loss(params, batch):
    z = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]
    return jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, batch["y"][:, None], -1)[:, 0]


def main(path: str, single: bool) -> None:
    params, data = model()
    sketch = sketching.get("afjl", M)
    state = sketch.init(jax.random.key(7), params)
    features = sketched_features_fn(sketch, state, per_example_loss, params, data)
    kill_after = int(os.environ.get("WORKER_KILL_AFTER", "-1"))
    log = os.environ.get("WORKER_LOG")
    calls = []

    def logged(indices):
        if len(calls) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(int(indices[0]))
        if log:
            with open(log, "a") as f:
                f.write(f"{int(indices[0])}\n")
        return features(indices)

    meta = {"sketch": "afjl", "m": M, "sketch_seed": 7, "checkpoint": params_hash(params)}
    ids = [f"ex{i}" for i in range(N)]
    if single:
        index = build_index(path, logged, N, meta=meta, shard_size=SHARD, example_ids=ids, progress=False)
    else:
        index = distributed.build_index_distributed(path, logged, N, meta=meta, shard_size=SHARD, example_ids=ids,
                                                    progress=False)
    print(json.dumps({**info, "computed": calls, "num_shards": index.num_shards}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], "--single" in sys.argv[2:])
