"""Hessian spectra over training with (sketched) Lanczos: the paper's Fig. 2/5/6 studies in miniature
(experiments/hessian_spectrum.py).

    python -m experiments.run --config configs/hessian_spectrum.py:quick --workdir runs/hessian_quick
    python -m experiments.run --config configs/hessian_spectrum.py:paper_quick --workdir runs/hessian_paper_quick
Presets (see PRESETS for the expected CPU times):
  default      digits MLP trained from scratch + all-MiniLM-L6-v2 fine-tuned on the 4-class text set;
               spectra at 5 checkpoints each, class-count sweeps, SLQ densities
  quick        the digits MLP only, small budgets
  paper        the paper's protocol (Sec. 5.5): SGD with batch 32 at a constant rate, spectra at steps
               {0, 10, 50, 100, 150, 200, 250, 500, then every 1k}, Arnoldi for k = 1000 steps on the
               sketched operator Φ H Φᵀ (AFFD, m = 4096) beside a full-basis k = 1000 Lanczos (both fit
               for the digits MLP, D = 8,970), RNEG, R(n), outliers, gradient–outlier alignment per step
  paper_quick  the same schedule up to step 500 on a smaller MLP (D = 2,410), k = 300
  memory       the memory benchmark only: k = 100 Lanczos iterations on a D ≈ 2.1M transformer LM with
               and without the sketched Krylov basis (peak memory, time; goal: ratio ≈ D/m)
  k1000        the memory benchmark at the paper's Krylov size: k = 1000 sketched steps (AFFD, m = 4096)
               on the same LM (memory k·m + O(D)), the full basis at k = 100 for comparison
Each study is a classifier-task section (data, model, train, max_len, seed) plus `checkpoints`
(training steps at which the spectrum is computed), `class_counts` (the outlier-count vs C sweep:
digits keeps classes 0..C−1, the text set is generated with C classes) and optionally `spectrum`
(overrides of the global `spectrum` section for that study).
"""
import ml_collections

from configs import finetune_classifier

# One line per preset for `python -m experiments.run --list` (times: 2 loaded CPU cores).
PRESETS = {
    "": "digits MLP + MiniLM spectra over training, class sweeps, SLQ (≈ 25 min)",
    "quick": "the digits MLP only, small budgets (≈ 30 s)",
    "paper": "the paper's schedule with SGD, k = 1000 sketched Arnoldi + full Lanczos, digits MLP (≈ 2.5 min)",
    "paper_quick": "the paper's schedule to step 500, k = 300, smaller MLP (≈ 30 s)",
    "memory": "k = 100 Lanczos on a 2.1M-parameter LM, full vs sketched basis (≈ 50 s)",
    "k1000": "k = 1000 sketched Arnoldi (AFFD, m = 4096) on the 2.1M-parameter LM, full basis at k = 100 (≈ 1.5 min)",
    "minilm_k1000": "k = 1000 sketched Arnoldi (QK, m = 4096) on all-MiniLM-L6-v2 + head (D = 22.6M), full basis at k = 40 (≈ 11 min)",
}
STUDIES = ("digits_mlp", "text_minilm")


def _study(base_preset, checkpoints, class_counts):
    study = finetune_classifier.get_config(base_preset)
    del study.experiment
    study.checkpoints = checkpoints
    study.class_counts = class_counts
    return study


def get_config(arg=None):
    if (arg or "") not in PRESETS:
        raise ValueError(f"preset={arg!r}; allowed values: {[p for p in PRESETS if p]} or none")
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
        model_name="transformer",  # "transformer": the LM of `model` (random weights); "minilm": all-MiniLM-L6-v2 + head
        max_len=20,              # tokens per text for model_name="minilm"
        num_iters=100,           # sketched Krylov steps
        full_num_iters=100,      # full-basis steps (k·D numbers; 0: no full-basis run)
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
    if arg in ("paper", "paper_quick"):
        _paper_schedule(config, quick=arg == "paper_quick")
    if arg in ("memory", "k1000", "minilm_k1000"):
        config.studies = ()
        config.memory.enabled = True
    if arg == "k1000":
        config.memory.update(num_iters=1000, full_num_iters=100, sketch="affd", sketch_m=4096)
    if arg == "minilm_k1000":
        # Measured on 2 CPU cores (D = 22.6M, 32 texts × 20 tokens): one HVP 0.69 s; QK Φ / Φᵀ 0.22 s each,
        # AFFD 1.2 / 1.3 s. k = 1000 steps fit 30 min with QK (measured 0.56 s a step), not with AFFD (≈ 3 s).
        # The full basis holds k·D float64 numbers: 41 vectors are 7.4 GB.
        config.memory.update(model_name="minilm", num_examples=32, max_len=20, num_iters=1000, full_num_iters=40,
                             sketch="qk", sketch_m=4096)
    return config


def paper_schedule(num_steps: int) -> tuple[int, ...]:
    """The paper's spectrum steps (Sec. 5.5): {0, 10, 50, 100, 150, 200, 250, 500} and every 1k, up to num_steps."""
    early = (0, 10, 50, 100, 150, 200, 250, 500)
    return tuple(s for s in early if s <= num_steps) + tuple(range(1000, num_steps + 1, 1000))


def _paper_schedule(config, quick: bool) -> None:
    """The paper's Hessian protocol on the digits MLP (PAPER.md §5, Sec. 5.5 / B.8): SGD with batch 32 and
    a constant rate (the paper's 1e-5 is for fine-tuning pretrained transformers; a from-scratch MLP
    needs 0.05 to move in 3k steps; the project's sgd has momentum 0.9, the paper does not say), a
    sketched Arnoldi with 1k steps on Φ H Φᵀ (AFFD; m = 4096 < D since the paper's 2^20 exceeds D here)
    and, since both fit, a full-basis Lanczos of the same length to check the sketched top-10 against."""
    num_steps = 500 if quick else 3000
    config.studies = ("digits_mlp",)
    study = config.digits_mlp
    study.model.hidden = (32,) if quick else (64, 64)
    study.checkpoints = paper_schedule(num_steps)
    study.class_counts = ()
    study.train.update(optimizer="sgd", learning_rate=0.05, schedule="constant", warmup_steps=0, weight_decay=0.0,
                       batch_size=32, num_steps=num_steps)
    k = 300 if quick else 1000
    config.spectrum.update(num_examples=512, batch_size=128, num_iters=k, sketch="affd",
                           sketch_m=1024 if quick else 4096, sketched_iters=k, num_ratios=10, slq_probes=4,
                           slq_iters=60 if quick else 100, hutchinson_probes=10, accuracy_sketches=(),
                           accuracy_ms=())
