"""Intrinsic dimension (d90) by subspace training through each sketch (experiments/intrinsic_dimension.py).

    python -m experiments.run --config configs/intrinsic_dimension.py:planted --workdir runs/id_planted
    python -m experiments.run --config configs/intrinsic_dimension.py:quick --workdir runs/id_quick
Three searches side by side (config.searches): "doubling" and "binary" train a fresh subspace per
candidate d; "single_run" is the paper's search inside one training run (config.single_run: d_min,
d_max = D_max, interval = c steps, delta = δ, max_steps, verify = the D*/2 run).
Presets: see PRESETS (times measured on 2 loaded CPU cores).
"""
import ml_collections

from configs import finetune_classifier

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores).
PRESETS = {
    "": "planted + digits MLP + CNN, doubling search for all five sketches (≈ 4 min)",
    "quick": "planted k = 16, dense/affd/qk, doubling + binary + single-run searches (≈ 1.5 min)",
    "planted": "planted k = 64, five sketches, doubling + single-run searches (≈ 15 min on loaded cores)",
    "digits": "digits MLP and CNN, affd and qk, doubling + single-run searches (≈ 16 min on loaded cores)",
    "minilm": "all-MiniLM-L6-v2 on the generated 4-class text set, qk, single-run search + D*/2 verification (≈ 4.5 min)",
    "minilm_doubling": "MiniLM, qk, the multi-run doubling search beside the single run (≈ 7 min)",
}


def get_config(arg=None):
    if (arg or "") not in PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {[p for p in PRESETS if p]} or none")
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
    config.single_run = ml_collections.ConfigDict(dict(
        d_min=16,                # the paper's D_min: the first trained d
        d_max=4096,              # D_max: the fixed sketch dimension (capped at D, moved to an accepted m)
        interval=100,            # c: optimiser steps between evaluations / doubling decisions
        delta=0.01,              # δ: d doubles when the metric improved by less than this over c steps
        learning_rate=3e-2,      # Adam on z
        max_steps=5000,          # budget of the whole search (status "budget" when D* is not reached)
        verify=True,             # train D*/2 alone for as many steps: should stay below τ90
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
        config.searches = ("doubling", "single_run")
        config.search.update(d0=16, d_max=1024, full_learning_rate=3e-2, learning_rate=1e-1, num_steps=200)
        config.single_run.update(d_min=4, d_max=256, interval=50, delta=0.01, learning_rate=1e-1, max_steps=4000)
    if arg == "quick":
        config.sketches = ("dense", "affd", "qk")
        config.searches = ("doubling", "binary", "single_run")
        config.planted.update(num_params=1024, planted_dim=16)
        config.search.update(d0=4, num_steps=150, timing_d=64, timing_steps=5)
        config.single_run.update(d_min=2, d_max=256)
    if arg == "digits":
        config.tasks = ("digits_mlp", "digits_cnn")
        config.sketches = ("affd", "qk")
        config.searches = ("doubling", "single_run")
    if arg in ("minilm", "minilm_doubling"):
        config.tasks = ("text_minilm",)
        config.sketches = ("qk",)
        config.searches = ("single_run",) if arg == "minilm" else ("doubling", "single_run")
        config.search.update(d0=4, d_max=1 << 14, num_steps=60, learning_rate=3e-1, full_learning_rate=1e-4,
                             timing_d=1 << 14, timing_steps=3)
        config.single_run.update(d_min=4, d_max=1 << 14, interval=20, delta=0.02, learning_rate=3e-1,
                                 max_steps=400)
        config.text_minilm.update(max_len=20)
        config.text_minilm.data.update(num_train=256, num_test=128)
        config.text_minilm.train.update(batch_size=16)
    return config
