"""Influence vs model size on planted facts with paraphrases, decoys and a second language (experiments/influence_scale.py).

    python -m experiments.run --config configs/influence_scale.py:quick --workdir runs/influence_scale_quick   (≈ 7 min, loaded 2 cores)
    python -m experiments.run --config configs/influence_scale.py --workdir runs/influence_scale   (≈ 10 min, loaded 2 cores)

summary.json maps "L<layers>_d<d_model>/<metric>" to numbers (metrics in the experiment's docstring), e.g.
`L2_d64/percentile/paraphrase`, `L1_d16/translation/percentile`, `L2_d32/sparsity/top1pct_share`.
"""
import ml_collections

# One line per preset for `python -m experiments.run --list` (times: the shared 2-core CPU machine, loaded).
PRESETS = {
    "": "4 model sizes (8.6k-0.4M parameters), larger corpus, 800 steps (≈ 2.5 min)",
    "quick": "3 model sizes (8.6k-121k parameters), 24 facts, 500 steps (≈ 1 min)",
}


def get_config(arg=None):
    if arg not in (None, "", "quick"):
        raise ValueError(f"preset={arg!r}; allowed values: ['quick'] or none")
    quick = arg == "quick"
    config = ml_collections.ConfigDict()
    config.experiment = "influence_scale"
    config.seed = 0
    config.corpus = ml_collections.ConfigDict(dict(
        num_facts=32, paraphrases=2, decoys=2, canonical=1, bilingual_fraction=0.5, num_other_language_facts=16,
        num_parallel=64, num_fillers=32,
    ))
    # ≥ 3 sizes spanning ≥ 10× parameters (embeddings included)
    config.sizes = [dict(num_layers=1, d_model=16, num_heads=2), dict(num_layers=2, d_model=32, num_heads=4),
                    dict(num_layers=2, d_model=64, num_heads=4), dict(num_layers=3, d_model=96, num_heads=4)]
    config.max_len = 32
    config.train = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0,
        num_steps=800, batch_size=32, checkpoint_every=400, eval_every=0, log_every=50,
    ))
    config.ekfac = ml_collections.ConfigDict(dict(damping_factor=0.1, batch_size=64, num_samples=1))
    config.top_k = 10
    config.tail_fraction = 0.1
    if quick:
        config.corpus.update(num_facts=24, num_other_language_facts=12, num_parallel=40, num_fillers=24)
        config.sizes = config.sizes[:3]
        config.train.update(num_steps=500, warmup_steps=30, checkpoint_every=250)
    return config
