"""`make demo`: tiny LM on planted facts, then fact retrieval with sketched per-example gradients.

    python -m experiments.run --config configs/demo.py --workdir runs/demo         (≤ 5 min, 2 CPU cores)
    python -m experiments.run --config configs/demo.py:quick --workdir runs/demo_q (≤ 1 min; smoke test)
See experiments/demo.py for what is measured; summary.json has query_accuracy, recall@10/<sketch>,
mrr/<sketch> and sketch_overhead/<sketch> for every sketch in `sketches` (and recall/MRR of `exact`).
"""
import ml_collections

from configs import train_lm


# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "train the tiny LM on planted facts, retrieve each fact's documents by sketched gradient cosine (≈ 1.5 min)",
    "quick": "16 planted facts, fewer timing repeats (≈ 40 s)",
}


def get_config(arg=None):
    config = train_lm.get_config(arg)  # validates the preset name; same data / model / train sections
    config.experiment = "demo"
    config.sketches = ("qk", "afjl")
    config.sketch_dim = 4096  # m; afjl needs a power of two. Cosines here are ~0.03, so m must be large
    config.sketch_mode = "explicit"  # or "implicit" (sketching.MODES)
    config.preconditioner = "adam"  # Adam second-moment correction (TrackStar) or "none"
    config.exact_reference = True  # also rank with the unsketched gradients
    config.recall_ks = (1, 5, 10, 20)
    config.timing_warmup = 1
    config.timing_repeats = 5
    config.timing_budget_s = 10.0
    if arg == "quick":
        config.timing_repeats = 3
        config.timing_budget_s = 2.0
    return ml_collections.ConfigDict(config)
