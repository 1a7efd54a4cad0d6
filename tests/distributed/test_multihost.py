"""Issue 9: sharded per-example sketching and the sharded HVP across two `jax.distributed` processes
on localhost (2 forced CPU devices each: one 4-device global mesh, gloo collectives)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.distributed.test_distributed_index import HERE, ROOT, finish, free_port, worker_env


def test_two_hosts_share_one_mesh():
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multihost_worker.py")], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=worker_env(SKETCHES_COORDINATOR=f"127.0.0.1:{port}", SKETCHES_NUM_PROCESSES="2",
                       SKETCHES_PROCESS_ID=str(p))) for p in range(2)]
    results = finish(procs)
    for p, r in enumerate(results):
        assert (r["process_index"], r["process_count"], r["local_devices"], r["global_devices"]) == (p, 2, 2, 4)
        assert r["global_shape"] == [16, 16] and r["spec"] == "P('data', None)"
        assert r["local_rows"] == 8           # each process holds the rows of its own examples only
        assert r["err_rows"] < 2e-6
        assert r["err_hvp"] < 2e-6
        assert r["err_lanczos"] < 1e-5
