"""Multi-host runs with JAX's distributed runtime, and the distributed index build.

Initialisation. `initialize(config)` calls `jax.distributed.initialize(coordinator_address,
num_processes, process_id)` once per process, before any other JAX call, from (in this order of
precedence) the explicit `config` fields or the environment:

    SKETCHES_COORDINATOR      host:port of process 0's coordination service, e.g. node0:12355
    SKETCHES_NUM_PROCESSES    number of processes (one per host, or one per GPU)
    SKETCHES_PROCESS_ID       this process's id in [0, num_processes)
    SKETCHES_LOCAL_DEVICE_IDS optional, comma-separated local device ids this process uses
    SKETCHES_DISTRIBUTED=auto let JAX detect the cluster (SLURM, Open MPI, TPU pods, GKE):
                              `jax.distributed.initialize()` without arguments
                         =off single process whatever else is set (=on or unset: use the above)

Nothing set (or num_processes = 1 without a coordinator) means a single process: nothing is called.
No cluster code of our own: the coordination service, barriers and collectives are JAX's (gloo for
CPU collectives, NCCL on GPUs, ICI/DCN on TPUs).

Distributed index build. `build_index_distributed(path, features_fn, N, ...)` cuts the N examples
into the same shards as `attribution.index.build_index` (rows [kS, (k+1)S)) and gives process p of
P the contiguous shards [⌊pK/P⌋, ⌊(p+1)K/P⌋) of the K shards. Each process builds an ordinary,
resumable index of its slice with `build_index` at

    PATH/process-PPPP-of-QQQQ/        manifest.json, example_ids.npy, shards/*.npy  (rows of its slice)

then all processes meet at a barrier (`jax.experimental.multihost_utils.sync_global_devices`), and
process 0 writes, atomically, one merged manifest `PATH/manifest.json` (and the global
`PATH/example_ids.npy`): an ordinary index manifest whose shard entries carry relative paths
(`process-0001-of-0002/shards/00000.npy`) and global row ranges, plus a `processes` list. So
`GradientIndex.open(PATH)`, `iter_blocks`, `load`, `verify` and `top_k` (which streams the shards in
global order and keeps the k best (score, row) pairs, ties by lower row: the per-shard results are
merged exactly as for a single-process index) work unchanged. Since the shard boundaries are those of
a single-process build, and each shard's features are computed by the same jitted function on the
same batch shape, the shard files are byte-identical to a single-process build's (same sha256), and so
are `load()` and `top_k` (the tests check this bit for bit).

Resuming: a process killed mid-way (even by SIGKILL) leaves whole shard files only (atomic writes);
rerunning the same job computes only the missing shards of each slice and then merges. Rerunning
with another number of processes builds new per-process folders (the old ones are ignored; delete
them to save space).
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from attribution import index as _index
from attribution.index import GradientIndex, IndexIncompleteError, IndexMismatchError

__all__ = [
    "ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "ENV_LOCAL_DEVICE_IDS", "ENV_MODE",
    "DistributedConfig", "config_from_env", "initialize", "process_shard_range", "process_dir",
    "barrier", "build_index_distributed",
]

ENV_COORDINATOR = "SKETCHES_COORDINATOR"
ENV_NUM_PROCESSES = "SKETCHES_NUM_PROCESSES"
ENV_PROCESS_ID = "SKETCHES_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SKETCHES_LOCAL_DEVICE_IDS"
ENV_MODE = "SKETCHES_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """What `jax.distributed.initialize` needs; None fields are left to JAX (or mean single-process)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    auto: bool = False  # jax.distributed.initialize() with cluster auto-detection

    @property
    def is_distributed(self) -> bool:
        if self.auto:
            return True
        return self.coordinator_address is not None or (self.num_processes or 1) > 1


def _int_field(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an integer") from None


def _device_ids(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be comma-separated integers") from None


def config_from_env(environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """The DistributedConfig described by the SKETCHES_* environment variables (module docstring)."""
    env = os.environ if environ is None else environ
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "0", "off", "1", "on"):
        raise ValueError(f"{ENV_MODE}={env.get(ENV_MODE)!r}; allowed values: auto, on, off (or unset)")
    if mode in ("0", "off"):
        return DistributedConfig()  # forced single-process, whatever else is set
    return DistributedConfig(
        coordinator_address=env.get(ENV_COORDINATOR) or None,
        num_processes=_int_field(ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES)),
        process_id=_int_field(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID)),
        local_device_ids=_device_ids(ENV_LOCAL_DEVICE_IDS, env.get(ENV_LOCAL_DEVICE_IDS)),
        auto=mode == "auto",
    )


def resolve_config(config: Any = None, environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """Explicit fields (a DistributedConfig, a dict or an ml_collections ConfigDict with any of the
    DistributedConfig field names; None values ignored) over the environment's."""
    base = config_from_env(environ)
    if config is None:
        return base
    if isinstance(config, DistributedConfig):
        given = dataclasses.asdict(config)
    else:
        given = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    names = {f.name for f in dataclasses.fields(DistributedConfig)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"distributed config has unknown fields {unknown}; allowed fields: {sorted(names)}")
    updates = {k: v for k, v in given.items() if v is not None and not (k == "auto" and v is False)}
    if "num_processes" in updates:
        updates["num_processes"] = _int_field("num_processes", updates["num_processes"])
    if "process_id" in updates:
        updates["process_id"] = _int_field("process_id", updates["process_id"])
    if "local_device_ids" in updates:
        updates["local_device_ids"] = _device_ids("local_device_ids", updates["local_device_ids"])
    return dataclasses.replace(base, **updates)


def _validate(cfg: DistributedConfig) -> None:
    if cfg.auto:
        return
    if cfg.num_processes is not None and cfg.num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {cfg.num_processes}")
    missing = [name for name in ("coordinator_address", "num_processes", "process_id") if getattr(cfg, name) is None]
    if missing:
        raise ValueError(
            f"a multi-process run needs coordinator_address, num_processes and process_id; missing {missing} "
            f"(set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}, or {ENV_MODE}=auto on SLURM/TPU)")
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ValueError(f"process_id={cfg.process_id} must lie in [0, num_processes={cfg.num_processes})")


def initialize(config: Any = None, environ: Mapping[str, str] | None = None, **kwargs) -> dict:
    """Starts JAX's distributed runtime when configured (see the module docstring); idempotent.

    Call it first thing in every process, before any other JAX computation. `kwargs` are passed to
    `jax.distributed.initialize` (e.g. initialization_timeout). Returns {"distributed": bool,
    "process_index", "process_count", "local_devices", "global_devices"}.
    """
    cfg = resolve_config(config, environ)
    if cfg.is_distributed and not jax.distributed.is_initialized():
        _validate(cfg)
        if cfg.auto:
            jax.distributed.initialize(**kwargs)
        else:
            jax.distributed.initialize(
                coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                process_id=cfg.process_id, local_device_ids=cfg.local_device_ids, **kwargs)
    return {
        "distributed": bool(jax.distributed.is_initialized()),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
    }


def barrier(name: str) -> None:
    """All processes wait here (a no-op in a single process): `sync_global_devices`, i.e. a tiny
    all-reduce over every device of every process through JAX's collectives."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_shard_range(num_shards: int, num_processes: int, process_id: int) -> tuple[int, int]:
    """[first, stop) of the shards process `process_id` builds: ⌊pK/P⌋ .. ⌊(p+1)K/P⌋ (contiguous,
    sizes differing by at most one; empty for some processes when K < P)."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    return num_shards * process_id // num_processes, num_shards * (process_id + 1) // num_processes


def process_dir(process_id: int, num_processes: int) -> str:
    return f"process-{process_id:04d}-of-{num_processes:04d}"


def build_index_distributed(
    path: str,
    features_fn: Callable[[np.ndarray], np.ndarray],
    num_examples: int,
    *,
    meta: dict,
    shard_size: int = 1024,
    example_ids: Sequence | np.ndarray | None = None,
    dtype: str = "float32",
    progress: bool = True,
    process_id: int | None = None,
    num_processes: int | None = None,
    barrier_fn: Callable[[str], None] | None = None,
) -> GradientIndex | None:
    """`attribution.index.build_index` with the work split over processes (module docstring).

    Every process calls it with the same arguments; `features_fn(indices)` gets *global* example
    indices (only those of this process's slice). process_id / num_processes default to
    `jax.process_index()` / `jax.process_count()`; `barrier_fn(name)` defaults to `barrier` (tests
    may simulate processes in one Python process with a no-op barrier, process 0 last). Returns the
    merged GradientIndex (in every process, after the merge; None in a process other than 0 that a
    custom barrier_fn let through before the merged manifest existed).
    """
    p = jax.process_index() if process_id is None else int(process_id)
    num = jax.process_count() if num_processes is None else int(num_processes)
    sync = barrier if barrier_fn is None else barrier_fn
    wanted, ids_bytes = _index._wanted_manifest(num_examples, meta, shard_size, dtype, example_ids)
    ids = np.load(io.BytesIO(ids_bytes), allow_pickle=False)
    ranges = _index._shard_ranges(wanted["num_examples"], wanted["shard_size"])
    layout = [(q, *process_shard_range(len(ranges), num, q)) for q in range(num)]
    processes = [{"dir": process_dir(q, num), "first_shard": a, "num_shards": b - a,
                  "start": ranges[a][0], "stop": ranges[b - 1][1]} for q, a, b in layout if b > a]
    wanted = {**wanted, "processes": processes}

    os.makedirs(path, exist_ok=True)
    existing = _index._read_manifest(path)
    if existing is not None:  # refuse other settings before any work (every process checks)
        diff = {k: v for k, v in _index._mismatches(existing, wanted).items() if k != "processes"}
        if diff:
            raise IndexMismatchError(os.path.abspath(path), diff)

    mine = next((entry for entry in processes if entry["dir"] == process_dir(p, num)), None)
    if mine is not None:
        start, stop = mine["start"], mine["stop"]
        _index.build_index(
            os.path.join(path, mine["dir"]), lambda local: features_fn(np.asarray(local) + start), stop - start,
            meta=wanted["meta"], shard_size=wanted["shard_size"], example_ids=ids[start:stop], dtype=dtype,
            progress=progress)
    sync("gradsketch-index-built")
    if p == 0:
        _merge(path, wanted, ids_bytes)
    sync("gradsketch-index-merged")
    if p != 0 and barrier_fn is not None and _index._read_manifest(path) is None:
        return None  # a simulated process let through before process 0 merged
    return GradientIndex.open(path)


def _merge(path: str, wanted: dict, ids_bytes: bytes) -> None:
    """Process 0: the merged manifest over the per-process indexes (which must all be complete)."""
    shards = []
    for entry in wanted["processes"]:
        sub = os.path.join(path, entry["dir"])
        try:
            part = GradientIndex.open(sub)
        except FileNotFoundError:
            raise IndexIncompleteError(f"{sub} is missing: process {entry['dir']} did not build its slice") from None
        if part.num_examples != entry["stop"] - entry["start"] or part.num_shards != entry["num_shards"]:
            raise IndexMismatchError(sub, {"num_examples": (part.num_examples, entry["stop"] - entry["start"])})
        for shard in part.shards:
            shards.append({"file": f"{entry['dir']}/{shard['file']}", "start": shard["start"] + entry["start"],
                           "stop": shard["stop"] + entry["start"], "sha256": shard["sha256"]})
    with _index._build_lock(path):
        _index._remove_temporaries(path)
        ids_file = os.path.join(path, _index.EXAMPLE_IDS)
        if not (os.path.exists(ids_file) and _index._read_bytes(ids_file) == ids_bytes):
            _index.atomic_write_bytes(ids_file, ids_bytes)
        existing = _index._read_manifest(path)
        created = (existing or {}).get("created_utc") or _index._now()
        merged = {**wanted, "complete": True, "shards": shards, "created_utc": created}
        if existing is not None and {k: v for k, v in existing.items() if k != "completed_utc"} == merged:
            return  # already merged (a rerun of a finished job)
        _index._write_manifest(path, {**merged, "completed_utc": _index._now()})

