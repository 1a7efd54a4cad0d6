"""The shipped attribution example: planted-facts JSONL files and a tiny GPT-2 Flax checkpoint.

    python -m experiments.run --config configs/attribution_example.py --workdir runs/example

writes, under the workdir, `data/train.jsonl` ({"id", "text"}), `data/queries.jsonl` ({"id",
"prompt", "completion"}) and `data/planted.json` (which documents state each query's fact),
`model/` (a `FlaxGPT2LMHeadModel` saved with `save_pretrained`, plus its word-level tokenizer) and
`checkpoints/step_*/` (the same model earlier in training, for TracIn). Then
`configs/attribute.py:example` attributes the queries to the training documents from those files.
"""
import ml_collections

PRESETS = {
    "": "write planted-facts JSONL files and train a tiny GPT-2 (Flax) on them (≈ 10 s)",
    "quick": "fewer facts and steps (≈ 10 s)",
}


def get_config(arg=None):
    if arg not in (None, "", "quick"):
        raise ValueError(f"preset={arg!r}; allowed values: ['quick'] or none")
    config = ml_collections.ConfigDict()
    config.experiment = "attribution_example"
    config.seed = 0
    config.max_len = 48  # the model's context (n_positions); every document fits
    config.data = ml_collections.ConfigDict(dict(num_facts=32, docs_per_fact=2, num_distractors=32, num_heldout=0))
    config.model = ml_collections.ConfigDict(dict(n_layer=2, n_embd=64, n_head=4))
    config.train = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.0,
        num_steps=400, batch_size=16, checkpoint_every=100, eval_every=100, log_every=25,
    ))
    config.tracin_checkpoints = 3  # earlier checkpoints saved as model folders (evenly spaced steps)
    if arg == "quick":
        config.data.update(num_facts=12, num_distractors=12)
        config.train.update(num_steps=200, checkpoint_every=50, eval_every=50, warmup_steps=20)
    return config
