"""Smoke test of configs/simfluence.py:quick through the runner."""
import os

import pytest

from configs import simfluence as sf_config
from experiments import simfluence
from experiments.run import run_experiment


def test_simfluence_quick(tmp_path):
    summary = run_experiment(sf_config.get_config("quick"), str(tmp_path), quiet=True)
    # The fitted linear simulator beats the mean-trajectory baseline and the additive variant on held-out runs.
    assert summary["linear/mse"] < summary["constant/mse"]
    assert summary["linear/mse"] < summary["additive/mse"]
    assert summary["linear/spearman_final"] > 0.8
    for name in ("report.md", "simfluence.png", "summary.json"):
        assert os.path.exists(tmp_path / name), name


def test_simfluence_config_validation():
    config = sf_config.get_config("quick")
    config.num_heldout = config.num_runs
    with pytest.raises(ValueError, match="num_heldout"):
        simfluence.validate_config(config)
    config = sf_config.get_config("quick")
    config.variants = ("cubic",)
    with pytest.raises(ValueError, match="allowed values"):
        simfluence.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        sf_config.get_config("huge")
