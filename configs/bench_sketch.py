"""Sketch benchmark (the paper's Figs. 3–4 / Tables 3–4 axes).

Wall time, compiled memory and peak RSS of the jitted `sketch.apply` for every sketch over a grid
of D (parameters) and m (sketch dimension), with ratio tables vs `dense`, `afjl` vs `fjl` and
`affd` vs `ffd`. See experiments/bench_sketch.py for what is measured and how.

    python -m experiments.run --config configs/bench_sketch.py:quick --workdir runs/bench_quick
    python -m experiments.run --config configs/bench_sketch.py --workdir runs/bench_sketch
    python -m experiments.run --config configs/bench_sketch.py:quick --workdir runs/b \
        --config.sketches="('afjl','fjl','dense')" --config.log2_D="(16,18)" --config.m_values="(256,)"

Presets: "" (default) = the paper-scale grid D = 2^16 … 2^24, m ∈ {256, 1024, 4096} (long on CPU:
dense alone costs O(mD) per call; single calls predicted above `max_call_s` are skipped and
recorded as such); "quick" = D ∈ {2^16, 2^18, 2^20}, m ∈ {256, 1024}, all sketches, ≤ 2 minutes on
2 CPU cores including jax import and compilation.
"""
from __future__ import annotations

import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "wall time and memory of every sketch, D = 2^16 … 2^24, m ∈ {256, 1024, 4096} (≈ 60 min; dense is O(mD))",
    "quick": "D ∈ {2^16, 2^18, 2^20}, m ∈ {256, 1024}, every sketch (≈ 50 s)",
}


def sketch_options() -> ml_collections.ConfigDict:
    """Options passed to `sketching.get(name, m, **options)`, keyed by sketch name (library defaults).

    `tables="regenerate"` (O(D) random diagonals regenerated inside apply, the paper's implicit
    randomness) vs `"store"`; `preconditioner` is the paper's Table 4 axis (hadamard | hartley |
    orthogonal). Sketches absent from `config.sketches` ignore their entry.
    """
    return ml_collections.ConfigDict({
        "affd": {"tables": "regenerate", "preconditioner": "hadamard"},
        "afjl": {"tables": "regenerate", "preconditioner": "hadamard", "diagonal": "gaussian"},
        "dense": {"distribution": "gaussian", "block_elements": 1 << 20},
        "ffd": {"tables": "regenerate"},
        "fjl": {"tables": "regenerate"},
        "qk": {"tables": "regenerate", "construction": "paper"},
        "sjlt": {"tables": "regenerate", "nnz": 1},
    })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or ""
    if preset not in PRESETS:
        raise ValueError(f"configs/bench_sketch.py preset={preset!r}; allowed values: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "bench_sketch"
    config.preset = preset
    config.seed = 0
    config.dtype = "float32"                   # dtype of the parameter template and input tree
    config.sketches = ("affd", "afjl", "dense", "ffd", "fjl", "qk", "sjlt")
    config.sketch_options = sketch_options()
    config.log2_D = tuple(range(16, 25))       # D = 2^16 … 2^24 (the paper-scale grid)
    config.m_values = (256, 1024, 4096)
    # Timing protocol: `warmup` untimed calls, then up to `repeats` timed ones, but no new
    # call once a configuration has used `time_budget_s` (at least one warm-up and one timed call).
    config.warmup = 3
    config.repeats = 20
    config.time_budget_s = 2.0
    # A configuration whose single call is predicted (from the same sketch's largest measured
    # configuration, time ∝ D·m for dense, ∝ D·log2 D otherwise) to exceed this is skipped and
    # recorded as skipped with the prediction; <= 0 disables skipping. The goal's (D, m) below is
    # always measured (dense there takes ~15-50 s per call on 2 CPU cores).
    config.max_call_s = 30.0
    # The headline: the best sketch >= `goal_speedup` times faster than dense at D = 2^goal_log2_D,
    # m = goal_m (`goal_m` is also the m of `best_speedup_vs_dense`). None: derived from the grid,
    # D = 2^22 (else the largest D of log2_D) and m = 1024 (else the largest m <= 1024, else the smallest).
    config.goal_log2_D = None
    config.goal_m = None
    config.goal_speedup = 100.0

    if preset == "quick":
        config.log2_D = (16, 18, 20)
        config.m_values = (256, 1024)
        config.warmup = 2
        config.repeats = 10
        config.time_budget_s = 0.4
        config.max_call_s = 10.0
    return config
