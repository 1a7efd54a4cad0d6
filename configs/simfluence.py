"""Simfluence (attribution/simfluence.py) on a small classifier of scikit-learn's digits.

    python -m experiments.run --config configs/simfluence.py:quick --workdir runs/simfluence_q  (≤ 2 min, 2 cores)
    python -m experiments.run --config configs/simfluence.py --workdir runs/simfluence
Trains `num_runs` models from the same initialisation with SGD on random curricula over a fixed
subset of `num_train` training examples, records the loss of `num_test` test examples after every
step, fits Simfluence-Linear and -Additive on the first `num_runs - num_heldout` runs and evaluates
them on the held-out runs (MSE, Spearman). See experiments/simfluence.py.
"""
import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "Simfluence-Linear/Additive on digits classifiers trained on random curricula (≈ 10 s)",
    "quick": "fewer runs and steps (≈ 10 s)",
}


def get_config(arg=None):
    if (arg or "") not in PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {[p for p in PRESETS if p]} or none")
    config = ml_collections.ConfigDict()
    config.experiment = "simfluence"
    config.seed = 0
    config.model = ml_collections.ConfigDict(dict(name="logreg"))  # or mlp with hidden=(32,)
    config.num_train = 200
    config.num_test = 32
    config.num_steps = 200
    config.batch_size = 4
    config.learning_rate = 0.05
    config.num_runs = 12
    config.num_heldout = 2
    config.ridge = 1e-3
    config.variants = ("linear", "additive")
    config.plot_examples = 6
    if arg == "quick":
        config.num_train = 64
        config.num_test = 16
        config.num_steps = 100
        config.num_runs = 8
    return config
