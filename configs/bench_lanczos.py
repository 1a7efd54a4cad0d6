"""Krylov benchmark: `landscape.lanczos` / `slq` / `hutchinson` against matfree on the same HVP.

    python -m experiments.run --config configs/bench_lanczos.py:quick --workdir runs/bench_lanczos_quick
    python -m experiments.run --config configs/bench_lanczos.py --workdir runs/bench_lanczos

matfree is an optional extra (`pip install -e .[bench]`); without it only our timings are recorded
and every matfree entry is marked as skipped. See experiments/bench_lanczos.py for what is measured.

Presets: "" (default) = D ≈ 10^3, 10^4, 10^5, 10^6 (one-hidden-layer MLPs on the digits), 60 Lanczos
steps, SLQ 10 probes × 30 steps, Hutchinson 20 probes (D ≤ 10^5 take ≈ 10 min on 2 loaded CPU cores,
D = 10^6 more than 20 min more: its SLQ runs 300 HVPs per call and library);
"quick" = D ≈ 10^3, 10^4, 10^5 with fewer repeats (≤ 5 min).
"""
from __future__ import annotations

import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 loaded CPU cores).
PRESETS = {
    "": "ours vs matfree (Lanczos, SLQ, Hutchinson) on a digits-MLP HVP at D ≈ 10^3 … 10^6 (> 30 min; D = 10^6 dominates)",
    "quick": "the same at D ≈ 10^3 … 10^5 with fewer probes and repeats (≈ 1 min)",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or ""
    if preset not in PRESETS:
        raise ValueError(f"configs/bench_lanczos.py preset={preset!r}; allowed values: {[p for p in PRESETS if p]} or none")
    config = ml_collections.ConfigDict()
    config.experiment = "bench_lanczos"
    config.preset = preset
    config.seed = 0
    config.target_dims = (1_000, 10_000, 100_000, 1_000_000)  # D ≈ 75·hidden + 10 (64-hidden-10 MLP)
    config.num_examples = 256        # the fixed batch of digits the HVP averages over
    config.num_iters = 60            # Lanczos steps (both libraries, full re-orthogonalisation, float64)
    config.slq_probes = 10
    config.slq_iters = 30
    config.hutchinson_probes = 20
    config.methods = ("lanczos", "slq", "hutchinson")
    config.warmup = 2                # untimed calls, the first (compiling) one included
    config.repeats = 3               # at least this many timed calls; the median is reported
    config.min_timed_s = 0.5         # ... and more until the timed calls add up to this
    config.time_budget_s = 60.0      # per (method, library, D): no further timed call once spent
    config.matfree = True            # False: time ours only (also automatic when matfree is missing)
    if preset == "quick":
        config.target_dims = (1_000, 10_000, 100_000)
        config.slq_probes = 8
        config.hutchinson_probes = 10
        config.repeats = 2
        config.time_budget_s = 20.0
    return config
