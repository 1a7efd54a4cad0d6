"""Smoke test of configs/pbrf_benchmark.py on a shrunken quick preset; resume reuses the stored PBRF solves."""
import json
import os

import pytest

from configs import pbrf_benchmark as config_lib
from experiments import pbrf_benchmark
from experiments.run import run_experiment


def _tiny():
    config = config_lib.get_config("quick")
    config.num_queries = 3
    config.digits.update(num_train=60, hidden=(8,), num_steps=50, tracin_checkpoints=2)
    config.pbrf.digits_mlp.update(num_candidates=6, num_steps=150, chunk_size=3)
    config.pbrf.facts_lm.update(num_candidates=4, num_steps=20, batch_size=4, chunk_size=2)
    config.facts.data.update(num_facts=3, num_distractors=3, num_heldout=1)
    config.facts.train.update(num_steps=10, batch_size=4, checkpoint_every=5, eval_every=10, warmup_steps=2)
    config.facts.model.update(num_layers=1, d_model=16, num_heads=2)
    config.lissa.update(depth=30, batch_size=8)
    config.update(trak_dim=16, sketch_dim=16, cg_iters=30, power_iters=10, ekfac_batch=32)
    config.counterfactual.update(lds_subsets=4, chunk_size=8)
    return config


def _check_counterfactual(summary, root, task, methods, candidates, subsets):
    """LOO and LDS beside the PBRF for every method and the PBRF itself, from cached retraining runs."""
    for name in ("pbrf",) + tuple(methods):
        for metric in ("loo_pearson", "loo_spearman", "lds"):
            assert -1.0 <= summary[f"{task}/{name}/{metric}"] <= 1.0, (name, metric)
    assert summary[f"{task}/retrain/loo_change_rms"] > 0.0
    for folder, runs in (("full", 1), ("loo", candidates), ("lds", subsets)):
        stored = [f for f in os.listdir(root / task / "retrain" / folder) if f.startswith("run-")]
        assert len(stored) == runs, folder


def test_pbrf_benchmark_smoke_digits(tmp_path):
    config = _tiny()
    config.tasks = ("digits_mlp",)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    for method in config.methods:
        if method == "ngram_cosine":  # text only
            assert "digits_mlp/ngram_cosine/pearson" not in summary
            continue
        assert -1.0 <= summary[f"digits_mlp/{method}/pearson"] <= 1.0, method
        assert summary[f"digits_mlp/{method}/seconds"] >= 0.0
    # the PBRF's first-order value: the solves converged
    assert summary["digits_mlp/pbrf/residual_max"] < 1e-2 and summary["digits_mlp/gnh_if/pearson"] > 0.99
    for name in ("report.md", "pbrf_benchmark.png", "summary.json", "digits_mlp/pbrf/fingerprint.json"):
        assert os.path.exists(tmp_path / name), name
    stored = sorted(os.listdir(tmp_path / "digits_mlp" / "pbrf"))
    assert len([f for f in stored if f.startswith("example_")]) == 6
    with open(tmp_path / "summary.json") as f:
        assert "digits_mlp/gnh_if/spearman" in json.load(f)
    methods = [m for m in config.methods if m != "ngram_cosine"]
    _check_counterfactual(summary, tmp_path, "digits_mlp", methods, 6, 4)
    # the K-FAC family shares one timed fit: each method's cost is the shared part plus its own
    for method in ("ekfac", "kfac", "ekfac_heuristic"):
        assert summary[f"digits_mlp/{method}/seconds"] == pytest.approx(
            summary["digits_mlp/kfac_shared/seconds"] + summary[f"digits_mlp/{method}/own_seconds"])
    report = (tmp_path / "report.md").read_text()
    assert "| PBRF (the ground truth) |" in report and "Pearson vs LOO" in report


def test_pbrf_benchmark_smoke_lm(tmp_path):
    """The LM path (MLP layers only, mini-batch PBRF, hidden states of ln_final, text n-grams, weighted
    retraining); the other methods share the digits code path and are skipped here to keep the test short."""
    config = _tiny()
    config.tasks = ("facts_lm",)
    config.counterfactual.lds_subsets = 3
    config.methods = ("gnh_if", "ekfac", "repr_cosine", "ngram_cosine")
    summary = run_experiment(config, str(tmp_path), quiet=True)
    for method in config.methods:
        assert -1.0 <= summary[f"facts_lm/{method}/pearson"] <= 1.0, method
    assert summary["facts_lm/pbrf/residual_max"] < 1.0
    assert os.path.exists(tmp_path / "facts_lm" / "pbrf" / "fingerprint.json")
    _check_counterfactual(summary, tmp_path, "facts_lm", config.methods, 4, 3)


@pytest.mark.parametrize("field, value", [
    ("methods", ("ekfac", "influence")),
    ("pbrf.facts_lm.optimizer", "lbfgs"),
    ("damping", 0.0),
    ("counterfactual.lds_subsets", 1),
    ("counterfactual.lds_fraction", 1.0),
])
def test_pbrf_benchmark_config_validation(field, value):
    """A bad value is refused before any work, and the message names the field."""
    config = config_lib.get_config("quick")
    *parents, name = field.split(".")
    section = config
    for parent in parents:
        section = section[parent]
    section[name] = value
    with pytest.raises(ValueError, match=f"config.{field}"):
        pbrf_benchmark.validate_config(config)
