"""Attribution methods vs the PBRF ground truth on the digits MLP and the tiny LM (experiments/pbrf_benchmark.py).

    python -m experiments.run --config configs/pbrf_benchmark.py:quick --workdir runs/pbrf_quick
    python -m experiments.run --config configs/pbrf_benchmark.py --workdir runs/pbrf_benchmark

Most of the quick preset's time is the LM: its full-batch PBRF solves (≈ 2.3 min on 2 idle cores), the
retrainings (≈ 1.4 min), the Hessian / Gauss–Newton CG solves and LiSSA through the transformer in float64.

summary.json maps "<task>/<method>/{pearson,spearman,pearson_sem,loo_pearson,loo_spearman,lds,seconds}" to
numbers, plus "<task>/pbrf/{seconds,residual_median,residual_max,loo_pearson,loo_spearman,lds}",
"<task>/retrain/{seconds,loo_change_rms}", "<task>/kfac_shared/seconds", "<task>/damping",
"<task>/lambda_max_gnh". The PBRF solves are stored per training example under <workdir>/<task>/pbrf and the
retrainings per run under <workdir>/<task>/retrain: a rerun resumes.
"""
import ml_collections

from configs import train_lm

TASKS = ("digits_mlp", "facts_lm")
METHODS = ("gnh_if", "exact_if", "lissa", "ekfac", "kfac", "ekfac_heuristic", "trak", "tracin", "grad_dot",
           "grad_cosine", "sketched_cosine", "repr_dot", "repr_cosine", "ngram_cosine")

# One line per preset for `python -m experiments.run --list` (times: the shared 2-core CPU machine, loaded).
PRESETS = {
    "": "every method vs the PBRF, LOO and LDS on the digits MLP and the tiny LM, with costs (not timed; expected > 60 min)",
    "quick": "smaller digits set, 40 / 24 candidates, shorter solves, 24 LDS subsets (≈ 7 min)",
}


def get_config(arg=None):
    if arg not in (None, "", "quick"):
        raise ValueError(f"preset={arg!r}; allowed values: ['quick'] or none")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "pbrf_benchmark"
    config.seed = 0
    config.tasks = TASKS
    config.methods = METHODS
    config.damping = 1e-2            # λ = damping × λ_max(G), shared by the PBRF and every damped method
    config.num_queries = 10          # G23 App. C: 10 test points
    # PBRF solves per task: heavy-ball SGD with lr = lr_factor / (λ_max + λ), ±ε central difference (bias O(ε²)),
    # `chunk_size` examples solved together (2 × chunk_size problems under vmap); batch_size None: the full
    # training set in the Bregman term (mini-batches shared by ±ε are possible, but on the LM mini-batches of 12
    # of 48 documents left a median relative residual of 0.27 after 100 steps, the full batch 0.003)
    config.pbrf = ml_collections.ConfigDict(dict(
        digits_mlp=dict(num_candidates=100, epsilon=1e-3, num_steps=300, optimizer="sgd", lr_factor=1.0, momentum=0.9,
                        batch_size=None, chunk_size=20),
        facts_lm=dict(num_candidates=64, epsilon=1e-3, num_steps=200, optimizer="sgd", lr_factor=1.0, momentum=0.9,
                      batch_size=None, chunk_size=8),
    ))
    # digits MLP: full-batch Adam for a fixed number of steps (not to convergence: the PBRF's use case)
    config.digits = ml_collections.ConfigDict(dict(
        num_train=1000, hidden=(32,), num_steps=300, learning_rate=0.01, weight_decay=1e-3, tracin_checkpoints=4,
    ))
    config.facts = train_lm.get_config("quick" if quick else None)
    config.lissa = ml_collections.ConfigDict(dict(depth=1000, repeats=2, batch_size=64, scale_factor=2.0))
    config.cg_iters = 300
    config.cg_tol = 1e-8
    config.trak_dim = 256
    config.trak_ridge = 1e-3
    config.sketch = "qk"
    config.sketch_dim = 256
    config.power_iters = 60
    config.ekfac_batch = 64
    # Retraining ground truths beside the PBRF, on the same candidates (cached per run in <workdir>/<task>/retrain):
    # leave-one-out of every candidate, and LDS subsets that keep a random `lds_fraction` of the candidates
    # (and every other training example); `lds_subsets` 0 turns LDS off. The LM is retrained with the full
    # run's batch order, the left-out documents weighted 0; `chunk_size` models train together under vmap.
    config.counterfactual = ml_collections.ConfigDict(dict(loo=True, lds_subsets=64, lds_fraction=0.5, chunk_size=16))
    if quick:
        config.digits.update(num_train=400)
        config.pbrf.digits_mlp.update(num_candidates=40, num_steps=200)
        config.pbrf.facts_lm.update(num_candidates=24, num_steps=100)
        config.counterfactual.update(lds_subsets=24, chunk_size=12)
        config.lissa.update(depth=500, repeats=1, batch_size=16)
        config.cg_iters = 100
        config.num_queries = 8
    return config
