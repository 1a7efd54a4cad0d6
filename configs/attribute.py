"""Attribution on your own model and JSONL data (experiments/attribute.py).

    python -m experiments.run --config configs/attribute.py --workdir runs/a \\
        --config.model.path=MODEL_DIR --config.data.train=train.jsonl \\
        --config.data.queries=queries.jsonl --config.method=ekfac

    # the shipped example (files written by configs/attribution_example.py into runs/example):
    python -m experiments.run --config configs/attribution_example.py --workdir runs/example
    python -m experiments.run --config configs/attribute.py:example --workdir runs/attribute_example

Methods: ekfac, kfac, trak, tracin, sketch_dot, sketch_cosine, logra (experiments/attribute.py).
"""
import ml_collections

PRESETS = {
    "": "your model folder and JSONL files, given with --config.model.path / --config.data.* "
        "(≈ 1 min for the example's 64 sequences; grows linearly with their number)",
    "example": "EK-FAC on the shipped example files in runs/example (≈ 10 s)",
}
EXAMPLE_DIR = "runs/example"


def get_config(arg=None):
    if arg not in (None, "", "example"):
        raise ValueError(f"preset={arg!r}; allowed values: ['example'] or none")
    config = ml_collections.ConfigDict()
    config.experiment = "attribute"
    config.seed = 0
    # kind "hf": a transformers folder (task "lm" or "classification"); "project": a train_lm workdir.
    config.model = ml_collections.ConfigDict(dict(kind="hf", path="", task="lm", tokenizer=""))
    # max_len 0: the longest record (capped at the model's context); longer ones are truncated and counted.
    config.data = ml_collections.ConfigDict(dict(train="", queries="", max_len=0))
    config.method = "ekfac"
    config.layers = "mlp"  # "mlp", "all", or a regular expression over module paths (full match)
    config.batch_size = 16
    config.top_k = 10
    config.sketch = ml_collections.ConfigDict(dict(name="afjl", m=1024, mode="explicit", seed=0))
    config.ekfac = ml_collections.ConfigDict(dict(labels="sampled", num_samples=1, damping_factor=0.1))
    config.trak = ml_collections.ConfigDict(dict(ridge=0.01))  # λ = ridge · tr(ΦᵀΦ)/m (trak and logra)
    # TracIn: comma-separated checkpoint folders and the learning rate at each.
    config.tracin = ml_collections.ConfigDict(dict(checkpoints="", learning_rates=""))
    config.tfidf_candidates = 0  # N > 0: score each query against its N best BM25 sequences only
    config.query_rank = 0        # k > 0: rank-k query batching (ekfac / kfac)
    config.scores_max_mb = 512.0  # scores.npy (Q × N float32) is written when it is at most this size
    if arg == "example":
        config.model.path = f"{EXAMPLE_DIR}/model"
        config.data.train = f"{EXAMPLE_DIR}/data/train.jsonl"
        config.data.queries = f"{EXAMPLE_DIR}/data/queries.jsonl"
    return config
