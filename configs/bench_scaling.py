"""Scaling benchmark: throughput of sharded per-example sketched gradients vs device count.

    python -m experiments.run --config configs/bench_scaling.py:quick --workdir runs/scaling_quick
    python -m experiments.run --config configs/bench_scaling.py --workdir runs/scaling
    python -m experiments.run --config configs/bench_scaling.py --workdir runs/scaling_gpu --config.platform=devices

Each device count runs in its own subprocess. platform="cpu": that subprocess gets
XLA_FLAGS=--xla_force_host_platform_device_count=n and JAX_PLATFORMS=cpu (n host "devices" sharing
this machine's cores, so the ratio measures the sharding overhead and the use of idle cores, not
more hardware); platform="devices": the real devices of the default backend (GPUs/TPUs), the first
n of them (counts above the number available are recorded as skipped).

Presets: "" (default) = a 4-layer MLP of width 256 (D ≈ 0.2 M parameters), 512 examples per step,
m = 1024; "quick" = width 128, 256 examples, fewer repeats (≈ 1 minute on 2 CPU cores).
"""
from __future__ import annotations

import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "sharded sketched per-example gradients vs 1/2/4/8 devices, MLP width 256, 512 examples (≈ 50 s)",
    "quick": "the same at width 128, 256 examples, fewer repeats (≈ 20 s)",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or ""
    if preset not in PRESETS:
        raise ValueError(f"configs/bench_scaling.py preset={preset!r}; allowed values: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "bench_scaling"
    config.preset = preset
    config.seed = 0
    config.platform = "cpu"            # "cpu" (forced host devices) | "devices" (the real accelerators)
    config.device_counts = (1, 2, 4, 8)
    config.sketch = "afjl"
    config.sketch_options = ml_collections.ConfigDict({})
    config.m = 1024
    config.mode = "explicit"           # sketching.MODES
    config.chunk_size = 0              # 0: vmap the whole per-device batch; k > 0: jax.lax.map in chunks of k
    # The model: an MLP (tanh) d_in -> width x depth -> classes with a softmax cross-entropy loss.
    config.d_in = 64
    config.width = 256
    config.depth = 4
    config.classes = 10
    config.batch_size = 512            # global examples per step (a multiple of every device count)
    # Timing (experiments.common.timing.median_time): warm-up calls, then up to `repeats` timed calls within
    # `time_budget_s` per device count.
    config.warmup = 2
    config.repeats = 10
    config.time_budget_s = 10.0
    config.timeout_s = 600             # per device count (subprocess)
    if preset == "quick":
        config.width = 128
        config.depth = 3
        config.batch_size = 256
        config.m = 256
        config.repeats = 5
        config.time_budget_s = 3.0
    return config
