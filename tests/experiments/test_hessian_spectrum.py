"""Smoke and property tests of experiments/hessian_spectrum.py through the runner (reduced quick preset)."""
import json
import os

import pytest

from configs import hessian_spectrum as hs_config
from experiments import hessian_spectrum
from experiments.run import run_experiment


def small_config():
    config = hs_config.get_config("quick")
    config.digits_mlp.model.hidden = (16,)
    config.digits_mlp.checkpoints = (0, 150)
    config.digits_mlp.class_counts = (2, 4)
    config.digits_mlp.train.num_steps = 150
    config.spectrum.update(num_examples=128, num_iters=24, sketch_m=256, sketched_iters=24, slq_probes=2,
                           slq_iters=12, hutchinson_probes=2,  # same probes as SLQ
                           accuracy_sketches=("qk",), accuracy_ms=(128, 512))
    return config


def test_quick_study_end_to_end(tmp_path):
    summary = run_experiment(small_config(), str(tmp_path), quiet=True)
    for step in (0, 150):
        prefix = f"digits_mlp/step{step}"
        assert summary[f"{prefix}/lambda_max"] > 0 and summary[f"{prefix}/max_residual_top5"] < 1e-3
        assert 0.0 <= summary[f"{prefix}/alignment_top10"] <= 1.0 + 1e-9
        assert 0.0 <= summary[f"{prefix}/sketched/alignment_top10"] <= 1.0 + 1e-9
        assert summary[f"{prefix}/sketched/top10_max_rel_err"] < 1.0
        # SLQ first moment and Hutchinson use the same probes: identical traces.
        assert summary[f"{prefix}/slq_trace"] == pytest.approx(summary[f"{prefix}/hutchinson_trace"], rel=1e-6)
    # Training: accuracy up, the top eigenvalue grows and negative curvature shrinks (Ghorbani et al.).
    assert summary["digits_mlp/step150/test_accuracy"] > 0.8
    assert summary["digits_mlp/step150/rneg"] < summary["digits_mlp/step0/rneg"]
    # Outliers ≈ C − 1 for this small MLP (the class-structure conjecture; README discusses it).
    assert 1 <= summary["digits_mlp/C2/outliers"] <= 2
    assert summary["digits_mlp/C4/outliers"] >= summary["digits_mlp/C2/outliers"]
    assert summary["digits_mlp/sketch_accuracy/qk/m512/top10_mean_rel_err"] < summary["digits_mlp/sketch_accuracy/qk/m128/top10_mean_rel_err"]
    for name in ("spectrum_digits_mlp.png", "density_digits_mlp.png", "outliers_vs_classes.png", "metrics.jsonl",
                 "sketch_accuracy_digits_mlp.png"):
        assert os.path.exists(tmp_path / name), name


def test_memory_benchmark_small(tmp_path):
    config = hs_config.get_config("memory")
    config.memory.update(num_iters=6, sketch_m=512, num_examples=2)
    config.memory.model.update(vocab_size=64, num_layers=1, d_model=32, num_heads=2, max_len=8)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    assert summary["memory/basis_ratio_full_over_sketched_per_step"] == pytest.approx(summary["memory/D_over_m"])
    assert summary["memory/full/peak_rss_delta_bytes"] >= 0
    # the memory benchmark writes what the docstring promises: a metrics record, a report and a figure
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("memory/D_over_m" in r for r in records)
    assert "| sketched |" in (tmp_path / "memory.md").read_text() and (tmp_path / "memory.png").exists()


def test_k1000_preset_shrunk(tmp_path):
    """The k1000 preset's code path (a long sketched run, the full basis at fewer steps), shrunk."""
    config = hs_config.get_config("k1000")
    assert config.memory.num_iters == 1000 and config.memory.sketch == "affd"
    config.memory.update(num_iters=40, full_num_iters=8, sketch_m=64, num_examples=2)
    config.memory.model.update(vocab_size=64, num_layers=1, d_model=32, num_heads=2, max_len=8)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    assert summary["memory/sketched/num_iters"] == 40 and summary["memory/full/num_iters"] == 8
    assert summary["memory/sketched/basis_bytes"] == 41 * 64 * 8
    assert summary["memory/sketched/max_rel_residual_top10"] < 1.0
    assert summary["memory/sketched/ghost_pairs_top10"] == 0
    # the sketched top-8 against the full basis's, raw and after the best affine map (Table 7 protocol)
    raw, affine = summary["memory/sketched/top8_mean_rel_err_vs_full"], summary["memory/sketched/top8_affine_rel_err_vs_full"]
    assert 0.0 <= affine <= raw + 1e-12
    report = (tmp_path / "memory.md").read_text()
    assert "transformer LM (random weights" in report and "top8 affine rel err" in report


def test_minilm_k1000_preset_and_memory_model_validation():
    config = hs_config.get_config("minilm_k1000")
    assert (config.memory.model_name, config.memory.num_iters, config.memory.sketch) == ("minilm", 1000, "qk")
    assert config.memory.num_iters <= config.memory.sketch_m and config.studies == ()
    hessian_spectrum.validate_config(config)
    config.memory.model_name = "gpt5"
    with pytest.raises(ValueError, match="config.memory.model_name.*'transformer', 'minilm'"):
        hessian_spectrum.validate_config(config)


def test_paper_schedule_preset_shrunk(tmp_path):
    config = hs_config.get_config("paper_quick")
    assert config.digits_mlp.checkpoints == (0, 10, 50, 100, 150, 200, 250, 500)
    assert config.digits_mlp.train.optimizer == "sgd" and config.digits_mlp.train.batch_size == 32
    assert hs_config.paper_schedule(3500) == (0, 10, 50, 100, 150, 200, 250, 500, 1000, 2000, 3000)
    config.digits_mlp.model.hidden = (8,)
    config.digits_mlp.checkpoints = (0, 10, 50)
    config.digits_mlp.train.num_steps = 50
    config.spectrum.update(num_examples=64, num_iters=40, sketch_m=128, sketched_iters=40, slq_probes=2,
                           slq_iters=10, hutchinson_probes=2)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    for step in (0, 10, 50):
        prefix = f"digits_mlp/step{step}"
        assert summary[f"{prefix}/krylov_steps"] == 40 and summary[f"{prefix}/sketched/krylov_steps"] == 40
        assert 0.0 <= summary[f"{prefix}/alignment_outliers"] <= 1.0 + 1e-9
        assert summary[f"{prefix}/outliers"] >= 1 and summary[f"{prefix}/rneg"] >= 0
        assert summary[f"{prefix}/ghost_pairs_top10"] == 0
        assert 0 <= summary[f"{prefix}/converged_top10"] <= 10
        assert summary[f"{prefix}/sketched/basis_mb"] == pytest.approx(41 * 128 * 8 / 2 ** 20)


def test_config_validation():
    config = small_config()
    config.spectrum.sketch = "nope"
    with pytest.raises(ValueError, match="spectrum.sketch='nope'; allowed values"):
        hessian_spectrum.validate_config(config)
    config = small_config()
    config.digits_mlp.checkpoints = (100, 50)
    with pytest.raises(ValueError, match="checkpoints must be increasing"):
        hessian_spectrum.validate_config(config)
    config = small_config()
    config.digits_mlp.checkpoints = (0, 500)
    with pytest.raises(ValueError, match="train.num_steps"):
        hessian_spectrum.validate_config(config)
    config = small_config()
    config.digits_mlp.class_counts = (1,)
    with pytest.raises(ValueError, match="class_counts"):
        hessian_spectrum.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        hs_config.get_config("huge")
