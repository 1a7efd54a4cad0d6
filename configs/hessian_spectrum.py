"""Hessian spectra over training with (sketched) Lanczos: the paper's Fig. 2/5/6 studies in miniature
(experiments/hessian_spectrum.py).

    python -m experiments.run --config configs/hessian_spectrum.py:quick --workdir runs/hessian_quick
Presets:
  default  digits MLP trained from scratch + all-MiniLM-L6-v2 fine-tuned on the 4-class text set;
           spectra at 5 checkpoints each, class-count sweeps, SLQ densities   (≈ 25 min on 2 CPU cores)
  quick    the digits MLP only, small budgets                                    (≤ 2 min)
  memory   the memory benchmark only: k = 100 Lanczos iterations on a D ≈ 2.1M transformer LM with
           and without the sketched Krylov basis (peak memory, time; goal: ratio ≈ D/m)
Each study is a finetune_classifier-style section (data, model, train, max_len, seed) plus
`checkpoints` (training steps at which the spectrum is computed), `class_counts` (the outlier-count
vs C sweep: digits keeps classes 0..C−1, the text set is generated with C classes) and optionally
`spectrum` (overrides of the global `spectrum` section for that study).
"""
import ml_collections

from configs import finetune_classifier

PRESETS = ("quick", "memory")
STUDIES = ("digits_mlp", "text_minilm")


def _study(base_preset, checkpoints, class_counts):
    study = finetune_classifier.get_config(base_preset)
    del study.experiment
    study.checkpoints = checkpoints
    study.class_counts = class_counts
    return study


def get_config(arg=None):
    if arg not in (None, "") + PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {list(PRESETS)} or none")
    config = ml_collections.ConfigDict()
    config.experiment = "hessian_spectrum"
    config.seed = 0
    config.studies = STUDIES

    config.digits_mlp = _study("digits", (0, 25, 100, 300, 1000), (2, 4, 6, 8, 10))
    config.digits_mlp.model.hidden = (64, 64)
    config.digits_mlp.train.update(num_steps=1000, learning_rate=1e-3, batch_size=64, checkpoint_every=0,
                                   eval_every=0, log_every=50)

    config.text_minilm = _study(None, (0, 20, 60, 150), (2, 4))
    config.text_minilm.train.update(num_steps=150, warmup_steps=10, checkpoint_every=0, eval_every=0, log_every=10)
    # D = 22.7M: a float32 Krylov basis (41 × D × 4 bytes = 3.7 GB) and smaller budgets on CPU.
    config.text_minilm.spectrum = ml_collections.ConfigDict(dict(
        num_examples=128, batch_size=64, num_iters=40, sketched_iters=40, float64=False, slq_probes=2,
        slq_iters=30, hutchinson_probes=10, accuracy_ms=(1024, 4096)))

    config.spectrum = ml_collections.ConfigDict(dict(
        num_examples=512,        # the fixed HVP subset: the first examples of the training split
        batch_size=128,          # HVPs are averaged over batches of this size
        num_iters=60,            # Lanczos steps with the full (R^D) Krylov basis
        float64=True,            # Krylov vectors and dot products in float64 (HVPs stay in the model dtype)
        sketch="afjl",           # sketched Krylov basis: Lanczos on Φ H Φᵀ; "none" to skip
        sketch_m=4096,
        sketched_iters=60,
        num_ratios=10,           # R(1..n) reported
        alignment_k=0,           # top-k subspace for gradient alignment; 0 → the number of classes C
        slq_probes=4,            # SLQ density at the first and last checkpoint
        slq_iters=40,
        slq_sigma_squared=1e-4,  # relative variance of the Gaussian smoothing (Ghorbani et al.'s convention)
        hutchinson_probes=20,
        accuracy_sketches=("affd", "afjl", "qk"),  # Table 7: top-10 error vs m at the last checkpoint
        accuracy_ms=(256, 512, 1024, 2048),
    ))
    config.memory = ml_collections.ConfigDict(dict(
        enabled=False,
        num_iters=100,
        sketch="afjl",
        sketch_m=4096,
        num_examples=8,
        model=dict(vocab_size=512, num_layers=4, d_model=192, num_heads=4, max_len=32, mlp_ratio=4),
    ))

    if arg == "quick":
        config.studies = ("digits_mlp",)
        config.digits_mlp.model.hidden = (32,)
        config.digits_mlp.checkpoints = (0, 50, 200)
        config.digits_mlp.class_counts = (2, 5, 10)
        config.digits_mlp.train.update(num_steps=200, learning_rate=3e-3)
        config.spectrum.update(num_examples=256, num_iters=30, sketch_m=512, sketched_iters=30, slq_probes=2,
                               slq_iters=20, hutchinson_probes=10, accuracy_ms=(256, 1024))
    if arg == "memory":
        config.studies = ()
        config.memory.enabled = True
    return config
