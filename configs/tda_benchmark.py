"""Every attribution scorer × every sketch (and m) on digits and planted facts (experiments/tda_benchmark.py).

    python -m experiments.run --config configs/tda_benchmark.py:quick --workdir runs/tda_quick   (≈ 6 min, 2 cores)
    python -m experiments.run --config configs/tda_benchmark.py --workdir runs/tda_benchmark    (≈ 40 min, 2 cores)

summary.json maps "<task>/<scorer>/<sketch>/<metric>" to numbers (`<sketch>` = `none` for exact gradients;
sketched values at the headline m = `sketch_dim`; other m of `sketch_dims` carry the suffix `@m<m>`),
e.g. `digits_logreg/exact_if/none/lds`, `facts_lm/trak/qk/recall@10`, `digits_mlp/dot/afjl/corr_vs_none@m64`,
plus `<task>/index/<sketch>/build_s|size_bytes` and `<task>/layer_selection/<layer>/pearson_<reference>`.
Retraining outcomes (LDS, LOO, brittleness) are cached under the workdir: a rerun resumes.
"""
import ml_collections

from configs import train_lm

TASKS = ("digits_logreg", "digits_mlp", "facts_lm")
SCORERS = ("dot", "cosine", "unit", "tracin", "trak", "arnoldi", "exact_if")
SKETCHES = ("dense", "sjlt", "fjl", "ffd", "affd", "afjl", "qk")


# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "every scorer × sketch × m on digits logreg/MLP and the planted-facts LM, LDS/LOO/brittleness (≈ 40 min)",
    "quick": "smaller tasks and grids (≈ 4 min)",
}


def get_config(arg=None):
    if arg not in (None, "", "quick"):
        raise ValueError(f"preset={arg!r}; allowed values: ['quick'] or none")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "tda_benchmark"
    config.seed = 0
    config.tasks = TASKS
    config.scorers = SCORERS
    config.sketches = SKETCHES            # "none" (exact gradients) is always evaluated as well
    config.sketch_dims = (64, 256, 1024)  # m sweep; values with m >= D of a model are skipped
    config.sketch_dim = 256               # the headline m (must be one of sketch_dims)
    # The LM's m sweep: each sketched exact IF there forms ΦHΦᵀ from m HVPs through the transformer
    # (m = 1024 costs ≈ 7 min per sketch on 2 CPU cores), so the default sweeps only the headline m.
    config.facts_sketch_dims = (256,)
    config.index_shard_size = 512
    # Digits (scikit-learn, 8x8): full-batch Adam with cosine decay on an L2-regularised mean loss, in
    # float64, so retraining is deterministic and converged (gradient norm ~1e-9 on logreg).
    config.digits = ml_collections.ConfigDict(dict(
        num_train=1000, num_queries=100, weight_decay=1e-3, num_steps=3000, learning_rate=0.05,
        mlp_hidden=(32,),
    ))
    config.tracin_checkpoints = 4         # checkpoints along the training trajectory (digits)
    config.trak_models = 3                # TRAK ensemble size (digits: independently initialised models)
    config.trak_ridge = 1e-3              # λ = trak_ridge · tr(ΦᵀΦ)/m
    config.arnoldi_iters = 100            # Krylov steps (capped at m or D)
    config.arnoldi_top = 50               # eigenpairs kept (Schioppa et al. 2022 use the top p)
    # Damping of the exact / sketched influence, λ = value × λ_max(H) (top Ritz value of the Arnoldi run);
    # logistic regression is strongly convex through its weight decay and needs none.
    config.if_damping = ml_collections.ConfigDict(dict(digits_logreg=0.0, digits_mlp=1e-3, facts_lm=1e-2))
    config.cg_iters = 100                 # conjugate-gradient steps when D > 4096 (else a dense solve)
    config.cg_tol = 1e-5                  # stop at ‖r‖ ≤ cg_tol ‖g_z‖
    config.lds_subsets = 50               # R retrainings on random halves (digits)
    config.lds_fraction = 0.5
    config.loo_examples = 100             # training examples left out one at a time (digits)
    config.brittleness_queries = 10       # correctly classified queries whose top-k are removed (digits)
    config.brittleness_ks = (10, 40, 160)
    config.brittleness_scorers = ("dot", "cosine", "trak", "exact_if")
    config.retrain_chunk = 25             # models trained at once (vmapped)
    config.facts = train_lm.get_config("quick" if quick else None)
    config.facts_lds_subsets = 8          # LM retrainings on random halves (0 disables)
    config.layer_selection_m = 8192       # whole-model sketch dimension compared with single layers (2^13)
    config.layer_selection_sketches = ("afjl", "qk")
    if quick:
        config.tasks = ("digits_logreg", "facts_lm")
        config.sketches = ("qk", "afjl")
        config.sketch_dims = (64, 256)
        config.facts_sketch_dims = (64, 256)
        config.digits.update(num_train=600, num_queries=40, num_steps=2000)
        config.lds_subsets = 20
        config.loo_examples = 40
        config.brittleness_queries = 5
        config.brittleness_ks = (10, 40)
        config.brittleness_scorers = ("cosine", "exact_if")
        config.trak_models = 2
        config.tracin_checkpoints = 3
        config.arnoldi_iters = 60
        config.arnoldi_top = 30
        config.facts_lds_subsets = 0
        config.layer_selection_sketches = ("afjl",)
    return config
