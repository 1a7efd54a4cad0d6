"""EK-FAC vs TRAK vs gradient similarity on the tiny LM and planted facts (experiments/influence_llm.py).

    python -m experiments.run --config configs/influence_llm.py:quick --workdir runs/influence_llm_q  (≤ 10 min, 2 cores)
    python -m experiments.run --config configs/influence_llm.py --workdir runs/influence_llm
Tasks `facts_lm` (facts written in the query's order) and `facts_lm_reversed` (written reversed).
summary.json keys: "<task>/<scorer>/<sketch>/<metric>" (TDA-benchmark layout) plus
"<task>/ekfac/none/<diagnostic>" for query batching, TF-IDF filtering and the Grosse et al. findings.
"""
import ml_collections

from configs import train_lm

TASKS = {"facts_lm": "forward", "facts_lm_reversed": "reversed"}


# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "EK-FAC / K-FAC / TRAK / gradient similarity on the planted-facts LM, both word orders, LDS (≈ 25 min)",
    "quick": "smaller corpus and fewer LDS subsets (≈ 1.5 min)",
}


def get_config(arg=None):
    config = train_lm.get_config(arg)  # validates the preset; same data / model / train sections
    config.experiment = "influence_llm"
    config.tasks = tuple(TASKS)
    config.ekfac = ml_collections.ConfigDict(dict(
        layers=(r"(.*/)?mlp_(in|out)",), labels="sampled", num_samples=1, damping_factor=0.1, batch_size=16,
    ))
    config.sketch_dim = 1024               # m for the sketched gradient similarities (qk, afjl, logra)
    config.sketches = ("qk", "afjl", "logra")
    config.trak_dim = 1024                 # TRAK projection dimension (dense Gaussian)
    config.trak_ridge = 0.01               # λ = trak_ridge × tr(ΦᵀΦ)/m added to ΦᵀΦ
    config.query_ranks = (1, 2, 4, 8, 16, 32)
    config.tfidf_n = (2, 5, 10, 20, 40)
    config.recall_ks = (1, 5, 10)
    config.lds_subsets = 8                 # retrainings on random halves for the LDS (0 disables)
    config.lds_fraction = 0.5
    if arg == "quick":
        config.sketch_dim = 512
        config.trak_dim = 512
        config.query_ranks = (1, 2, 4, 8, 16)
        config.tfidf_n = (2, 5, 10, 20)
        config.lds_subsets = 5
    return ml_collections.ConfigDict(config)
