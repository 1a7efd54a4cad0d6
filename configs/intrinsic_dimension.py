"""Intrinsic dimension (d90) by subspace training through each sketch (experiments/intrinsic_dimension.py).

    python -m experiments.run --config configs/intrinsic_dimension.py:planted --workdir runs/id_planted
Presets:
  planted  the planted-dimension regression (D = 4096, k = 64) with the doubling and the binary
           search for dense, ffd, affd, afjl, qk                                (≤ 3 min on 2 CPU cores)
  quick    planted with k = 16 and fewer sketches (a smoke run, ≤ 1 min)
  digits   MLP and CNN on scikit-learn's digits (compare with Li et al.'s MNIST FC ≈ 750, LeNet ≈ 290)
  minilm   all-MiniLM-L6-v2 subspace fine-tuning on the generated 4-class text set (slow on CPU)
  default  planted + digits_mlp + digits_cnn
"""
import ml_collections

from configs import finetune_classifier

PRESETS = ("planted", "quick", "digits", "minilm")


def get_config(arg=None):
    if arg not in (None, "") + PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {list(PRESETS)} or none")
    config = ml_collections.ConfigDict()
    config.experiment = "intrinsic_dimension"
    config.seed = 0
    config.tasks = ("planted", "digits_mlp", "digits_cnn")
    config.sketches = ("dense", "ffd", "affd", "afjl", "qk")
    config.searches = ("doubling",)
    config.search = ml_collections.ConfigDict(dict(
        target_fraction=0.9,     # d90: 90% of the full-training metric
        d0=16,                   # the doubling search starts here
        d_max=4096,              # and gives up above this (or D)
        seeds=(0,),              # sketch seeds per d (the median is compared with the target)
        num_steps=300,           # Adam steps per trained d, and for the full-space baseline
        learning_rate=3e-2,      # Adam on z
        full_learning_rate=3e-3,  # Adam on θ (the baseline)
        timing_d=256,            # wall time per step measured for every sketch at this d
        timing_steps=20,
    ))
    config.planted = ml_collections.ConfigDict(dict(
        num_params=4096, planted_dim=64, num_train=512, num_test=512, noise=0.01,
    ))
    config.digits_mlp = finetune_classifier.get_config("digits")
    config.digits_mlp.model.hidden = (64,)
    config.digits_cnn = finetune_classifier.get_config("digits")
    config.digits_cnn.model = ml_collections.ConfigDict(dict(name="cnn", features=(8, 16)))
    config.text_minilm = finetune_classifier.get_config(None)
    for section in (config.digits_mlp, config.digits_cnn, config.text_minilm):
        del section.experiment

    if arg in ("planted", "quick"):
        config.tasks = ("planted",)
        config.searches = ("doubling", "binary")
        config.search.update(d0=16, d_max=1024, full_learning_rate=3e-2, learning_rate=1e-1, num_steps=200)
    if arg == "quick":
        config.sketches = ("dense", "affd", "qk")
        config.planted.update(num_params=1024, planted_dim=16)
        config.search.update(d0=4, num_steps=150, timing_d=64, timing_steps=5)
    if arg == "digits":
        config.tasks = ("digits_mlp", "digits_cnn")
    if arg == "minilm":
        config.tasks = ("text_minilm",)
        config.sketches = ("affd", "afjl", "qk")
        config.search.update(d0=64, d_max=1 << 16, num_steps=100, learning_rate=1e-2, full_learning_rate=5e-5)
        config.text_minilm.update(max_len=20)
        config.text_minilm.data.update(num_train=256, num_test=128)
        config.text_minilm.train.update(batch_size=16)
    return config
