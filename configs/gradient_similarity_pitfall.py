"""The gradient-similarity pitfall: one trailing "." changes the whole-gradient cosine.

    python -m experiments.run --config configs/gradient_similarity_pitfall.py:quick --workdir runs/gsp_q  (≤ 3 min, 2 cores)
    python -m experiments.run --config configs/gradient_similarity_pitfall.py --workdir runs/gsp

Seed scenario (T5-small, a Q&A thread): cos(∇ℓ("I like to eat" → "pizza"), ∇ℓ("I like to eat" → "pizza."))
= 0.46. No pretrained seq model can be loaded offline here, so experiments/gradient_similarity_pitfall.py
trains the tiny transformer LM on generated (input, target) pairs whose targets end with or without
"." and measures the same quantity, its per-token / per-layer decompositions, and the retrieval of the
near-duplicate training example under dot / cosine / unit / per-token / content-only / no-embedding
scores, EK-FAC and exact (GGN, damped) influence. summary.json keys: `pair/...`, `pairs/...`,
`ranking/<remedy>/<metric>` for the fully trained model (`train.num_steps`), the same keys prefixed
`early/` for a second model trained only `train.early_steps` steps (a half-trained checkpoint: an ending is
expected, but which one is not yet memorised per pair).
"""
import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "the trailing-'.' gradient-similarity pitfall on the tiny LM: decompositions and remedies (≈ 1.5 min)",
    "quick": "a smaller model and corpus (≈ 50 s)",
}


def get_config(arg=None):
    if (arg or "") not in PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: ['quick'] or none")
    config = ml_collections.ConfigDict()
    config.experiment = "gradient_similarity_pitfall"
    config.seed = 0
    config.max_len = 12  # bos + prompt (≤ 5 words) + answer (≤ 2 words) + "." + eos
    config.data = ml_collections.ConfigDict(dict(
        num_subjects=4,          # prompts = subjects × 5 categories ("i like to eat", "we want to drink", ...)
        answers_per_prompt=8,    # training pairs per prompt (each (prompt, answer) occurs once)
        dot_fraction=0.5,        # probability that a training target ends with " ."
    ))
    # The seed pair (always in the corpus, written with the "." in training).
    config.pair = ml_collections.ConfigDict(dict(prompt="i like to eat", answer="pizza"))
    config.model = ml_collections.ConfigDict(dict(num_layers=2, d_model=64, num_heads=4, mlp_ratio=4))
    config.train = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.0,
        num_steps=500, batch_size=32,
        early_steps=40,   # a second, shorter run (0 = off): an ending is expected, which one not yet memorised
    ))
    config.num_queries = 24      # queries = training pairs with the ending flipped (the seed pair first)
    config.chunk = 32            # examples per per-token-gradient batch
    config.ekfac = ml_collections.ConfigDict(dict(
        layers=(r"(.*/)?mlp_(in|out)",), labels="sampled", num_samples=4, damping_factor=0.1,
    ))
    config.exact_if = ml_collections.ConfigDict(dict(
        enabled=True, damping_rel=0.01,  # λ = damping_rel × λ_max(GGN of the training loss)
        tol=1e-4, max_iters=300, power_iters=30,
    ))
    if arg == "quick":
        config.data.update(num_subjects=2, answers_per_prompt=6)
        config.train.update(num_steps=300, batch_size=16, warmup_steps=20, early_steps=40)
        config.num_queries = 12
        config.exact_if.update(max_iters=150, power_iters=20)
    return config
