"""Issue 9: a sharded index built by two processes with `jax.distributed` on localhost (CPU, gloo
collectives for the barrier) equals the single-process build bit for bit; a build whose processes are
killed (SIGKILL) mid-way resumes and ends identical. Plus in-process tests of the slicing, the merge
and the configuration from the environment."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from attribution import distributed
from attribution.index import GradientIndex, IndexMismatchError, build_index, top_k

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "index_worker.py")
SHARD_STARTS = list(range(0, 70, 8))  # index_worker: N = 70, shard size 8 -> 9 shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKETCHES_", "WORKER_"))}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}, **extra)
    env.pop("XLA_FLAGS", None)
    return env


def launch(path: str, num_processes: int, tmp, tag: str, kill_after: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for p in range(num_processes):
        extra = {"SKETCHES_COORDINATOR": f"127.0.0.1:{port}", "SKETCHES_NUM_PROCESSES": str(num_processes),
                 "SKETCHES_PROCESS_ID": str(p), "WORKER_LOG": str(tmp / f"{tag}-{p}.log")}
        if kill_after and p in kill_after:
            extra["WORKER_KILL_AFTER"] = str(kill_after[p])
        procs.append(subprocess.Popen([sys.executable, WORKER, path], env=worker_env(**extra), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=180) -> list[dict]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def logged(tmp, tag, p) -> list[int]:
    file = tmp / f"{tag}-{p}.log"
    return [int(line) for line in file.read_text().split()] if file.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> GradientIndex:
    path = str(tmp_path_factory.mktemp("single") / "index")
    result = subprocess.run([sys.executable, WORKER, path, "--single"], env=worker_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["computed"] == SHARD_STARTS
    return GradientIndex.open(path)


def assert_identical(index: GradientIndex, reference: GradientIndex) -> None:
    assert index.num_examples == reference.num_examples and index.num_shards == reference.num_shards
    assert [(s["start"], s["stop"], s["sha256"]) for s in index.shards] == \
        [(s["start"], s["stop"], s["sha256"]) for s in reference.shards]  # byte-identical shard files
    np.testing.assert_array_equal(index.example_ids, reference.example_ids)
    a, b = index.load(), reference.load()
    assert a.tobytes() == b.tobytes()
    queries = np.random.default_rng(1).normal(size=(5, index.dim)).astype(np.float32)
    for score in ("dot", "cosine"):
        for block in (None, 5):
            got, want = top_k(index, queries, 7, score=score, block_size=block), top_k(reference, queries, 7, score=score)
            assert got[0].tobytes() == want[0].tobytes() and np.array_equal(got[1], want[1])
    index.verify()


def test_two_processes_build_one_index_identical_to_single_process(tmp_path, reference):
    path = str(tmp_path / "index")
    results = finish(launch(path, 2, tmp_path, "run"))
    assert [(r["process_index"], r["process_count"], r["distributed"], r["global_devices"]) for r in results] == \
        [(0, 2, True, 2), (1, 2, True, 2)]
    # Process 0 computed shards 0-3 (rows 0..31), process 1 shards 4-8, each once.
    assert results[0]["computed"] == SHARD_STARTS[:4] and results[1]["computed"] == SHARD_STARTS[4:]
    index = GradientIndex.open(path)
    assert sorted(os.listdir(path)) == [".lock", "example_ids.npy", "manifest.json", "process-0000-of-0002",
                                        "process-0001-of-0002"]
    assert index.shards[4]["file"] == "process-0001-of-0002/shards/00000.npy"
    assert [p["dir"] for p in index.manifest["processes"]] == ["process-0000-of-0002", "process-0001-of-0002"]
    assert_identical(index, reference)


def test_killed_processes_resume_and_end_identical(tmp_path, reference):
    path = str(tmp_path / "index")
    # Both processes SIGKILL themselves while computing their third shard.
    procs = launch(path, 2, tmp_path, "first", kill_after={0: 2, 1: 2})
    for proc in procs:
        proc.communicate(timeout=180)
        assert proc.returncode != 0
    with pytest.raises(FileNotFoundError):
        GradientIndex.open(path)  # no merged manifest yet
    first = [logged(tmp_path, "first", p) for p in range(2)]
    assert first[0] == SHARD_STARTS[:2] and len(first[1]) <= 2  # each started at most 2 shards, then died
    # Whole shard files only (atomic writes), at most those started: global first rows of the shards on disk.
    on_disk = []
    for p, offset in ((0, 0), (1, 32)):
        folder = os.path.join(path, f"process-000{p}-of-0002", "shards")
        names = sorted(n for n in os.listdir(folder) if not n.startswith(".tmp-")) if os.path.isdir(folder) else []
        on_disk += [offset + 8 * int(name[:-4]) for name in names]
    assert set(on_disk) <= set(first[0] + first[1]) and 0 < len(on_disk) < len(SHARD_STARTS)

    results = finish(launch(path, 2, tmp_path, "second"))
    # The rerun computed exactly the missing shards.
    assert sorted(results[0]["computed"] + results[1]["computed"]) == sorted(set(SHARD_STARTS) - set(on_disk))
    assert_identical(GradientIndex.open(path), reference)


# ------------------------------------------------------------------ in-process (simulated processes)

def test_process_shard_ranges_cover_all_shards_contiguously():
    for shards in (1, 2, 7, 9, 64):
        for procs in (1, 2, 3, 8):
            ranges = [distributed.process_shard_range(shards, procs, p) for p in range(procs)]
            assert ranges[0][0] == 0 and ranges[-1][1] == shards
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="process_id"):
        distributed.process_shard_range(4, 2, 2)


def _features(indices):
    indices = np.asarray(indices, np.float32)
    return np.stack([np.sin(indices * (j + 1)) for j in range(6)], axis=1)


META = {"sketch": "none", "m": 6, "checkpoint": "test"}


@pytest.mark.parametrize("num_processes", [2, 3, 5])
def test_simulated_processes_merge_like_a_single_build(tmp_path, num_processes):
    single = build_index(str(tmp_path / "single"), _features, 23, meta=META, shard_size=4, progress=False)
    path = str(tmp_path / "multi")
    # Processes 1.. first, process 0 (which merges after the barrier) last; no-op barrier.
    for p in list(range(1, num_processes)) + [0]:
        index = distributed.build_index_distributed(path, _features, 23, meta=META, shard_size=4, progress=False,
                                                    process_id=p, num_processes=num_processes,
                                                    barrier_fn=lambda name: None)
        assert (index is None) == (p != 0)  # the merged index does not exist before process 0 ran
    assert index.load().tobytes() == single.load().tobytes()
    assert [s["sha256"] for s in index.shards] == [s["sha256"] for s in single.shards]
    manifest_bytes = open(os.path.join(path, "manifest.json"), "rb").read()
    # A rerun of the finished job recomputes nothing and leaves the manifest as it was.
    calls = []
    again = distributed.build_index_distributed(path, lambda i: calls.append(i) or _features(i), 23, meta=META,
                                                shard_size=4, progress=False, process_id=0,
                                                num_processes=num_processes, barrier_fn=lambda name: None)
    assert calls == [] and open(os.path.join(path, "manifest.json"), "rb").read() == manifest_bytes
    assert again.load().tobytes() == single.load().tobytes()


def test_merge_refuses_missing_slices_and_other_settings(tmp_path):
    path = str(tmp_path / "multi")
    noop = lambda name: None  # noqa: E731
    with pytest.raises(Exception, match="process-0001-of-0002"):
        distributed.build_index_distributed(path, _features, 23, meta=META, shard_size=4, progress=False,
                                            process_id=0, num_processes=2, barrier_fn=noop)
    distributed.build_index_distributed(path, _features, 23, meta=META, shard_size=4, progress=False,
                                        process_id=1, num_processes=2, barrier_fn=noop)
    distributed.build_index_distributed(path, _features, 23, meta=META, shard_size=4, progress=False,
                                        process_id=0, num_processes=2, barrier_fn=noop)
    with pytest.raises(IndexMismatchError, match="meta.checkpoint"):
        distributed.build_index_distributed(path, _features, 23, meta={**META, "checkpoint": "other"}, shard_size=4,
                                            progress=False, process_id=0, num_processes=2, barrier_fn=noop)
    # The single-process builder refuses to write into a merged index.
    with pytest.raises(IndexMismatchError, match="processes"):
        build_index(path, _features, 23, meta=META, shard_size=4, progress=False)


def test_config_from_env_and_overrides():
    env = {"SKETCHES_COORDINATOR": "node0:1234", "SKETCHES_NUM_PROCESSES": "4", "SKETCHES_PROCESS_ID": "2",
           "SKETCHES_LOCAL_DEVICE_IDS": "0,1"}
    cfg = distributed.config_from_env(env)
    assert cfg == distributed.DistributedConfig("node0:1234", 4, 2, (0, 1), False) and cfg.is_distributed
    assert distributed.resolve_config({"process_id": 3, "num_processes": None}, env).process_id == 3
    assert not distributed.config_from_env({}).is_distributed
    assert distributed.config_from_env({"SKETCHES_DISTRIBUTED": "auto"}).auto
    assert not distributed.config_from_env({**env, "SKETCHES_DISTRIBUTED": "off"}).is_distributed
    with pytest.raises(ValueError, match="SKETCHES_DISTRIBUTED"):
        distributed.config_from_env({"SKETCHES_DISTRIBUTED": "maybe"})
    with pytest.raises(ValueError, match="SKETCHES_NUM_PROCESSES"):
        distributed.config_from_env({"SKETCHES_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="unknown fields"):
        distributed.resolve_config({"coordinator": "x"}, {})
    with pytest.raises(ValueError, match="missing"):
        distributed.initialize({"num_processes": 2}, environ={})
    with pytest.raises(ValueError, match="process_id=2"):
        distributed.initialize({"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 2}, environ={})


def test_initialize_single_process_is_a_no_op():
    info = distributed.initialize(environ={})
    assert info["distributed"] is False and info["process_count"] == 1 and info["process_index"] == 0
