"""Tiny decoder-only transformer on the planted-facts corpus (experiments/train_lm.py).

    python -m experiments.run --config configs/train_lm.py:quick --workdir runs/train_lm
Presets: default (64 facts, ~1 min on 2 CPU cores), quick (16 facts, ~10 s).
(Longer training memorises the facts harder: their gradients shrink and retrieval degrades.)
"""
import ml_collections


# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "the tiny decoder-only transformer on 64 planted facts (≈ 20 s)",
    "quick": "16 facts (≈ 10 s)",
}


def get_config(arg=None):
    if arg not in (None, "", "quick"):
        raise ValueError(f"preset={arg!r}; allowed values: ['quick'] or none")
    config = ml_collections.ConfigDict()
    config.experiment = "train_lm"
    config.seed = 0
    config.max_len = 48  # context length (tokens) of the model and of every document
    config.data = ml_collections.ConfigDict(dict(
        num_facts=64, docs_per_fact=2, num_distractors=64, num_heldout=16, num_subjects=None,
        filler_min=1, filler_max=2, order="forward", canonical_first=True,
    ))
    config.model = ml_collections.ConfigDict(dict(
        name="transformer", num_layers=2, d_model=64, num_heads=4, mlp_ratio=4, num_classes=0, positional="rope",
    ))
    config.train = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=50, weight_decay=0.0,
        num_steps=600, batch_size=32, checkpoint_every=200, eval_every=200, log_every=25,
    ))
    if arg == "quick":
        config.data.update(num_facts=16, num_distractors=16, num_heldout=4)
        config.train.update(num_steps=250, batch_size=16, checkpoint_every=125, eval_every=125, warmup_steps=20)
    return config
