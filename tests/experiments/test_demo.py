"""Smoke tests of the experiment configs through the runner (quick presets)."""
import json
import os

import pytest

from configs import demo as demo_config
from configs import finetune_classifier as ft_config
from configs import train_lm as train_lm_config
from experiments import demo
from experiments.run import run_experiment


def test_demo_quick_end_to_end(tmp_path):
    summary = run_experiment(demo_config.get_config("quick"), str(tmp_path), quiet=True)
    assert summary["query_accuracy"] > 0.9
    assert summary["heldout_query_accuracy"] < 0.5
    for name in ("qk", "afjl", "exact"):
        assert 0.0 <= summary[f"recall@10/{name}"] <= 1.0 and 0.0 < summary[f"mrr/{name}"] <= 1.0
    for name in ("qk", "afjl"):
        assert summary[f"sketch_overhead/{name}"] > 0
    assert summary["recall@10/exact"] >= 0.75  # the preconditioned exact gradients find the facts
    for name in ("report.md", "training.png", "retrieval.png", "retrieval.npz", "summary.json", "corpus.json"):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["recall@10/afjl"] == summary["recall@10/afjl"]
    assert "recall@10" in (tmp_path / "report.md").read_text()


def test_demo_config_validation():
    config = demo_config.get_config("quick")
    config.sketches = ("qk", "nope")
    with pytest.raises(ValueError, match="allowed values"):
        demo.validate_config(config)
    config = demo_config.get_config("quick")
    config.data.order = "sideways"
    with pytest.raises(ValueError, match="config.data.order"):
        demo.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        demo_config.get_config("huge")


def test_train_lm_quick_resumes(tmp_path):
    config = train_lm_config.get_config("quick")
    config.train.num_steps = 40
    config.train.checkpoint_every = 20
    config.train.eval_every = 20
    first = run_experiment(config, str(tmp_path), quiet=True)
    assert first["resumed_from_step"] == 0
    again = run_experiment(config, str(tmp_path), quiet=True)
    assert again["resumed_from_step"] == 40 and again["train_loss"] == first["train_loss"]


def test_finetune_classifier_quick(tmp_path):
    summary = run_experiment(ft_config.get_config("quick"), str(tmp_path), quiet=True)
    assert summary["test_accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert summary["num_params"] > 22_000_000


def test_finetune_classifier_digits(tmp_path):
    config = ft_config.get_config("digits")
    config.train.num_steps = 60
    summary = run_experiment(config, str(tmp_path), quiet=True)
    assert summary["test_accuracy"] > 0.8
