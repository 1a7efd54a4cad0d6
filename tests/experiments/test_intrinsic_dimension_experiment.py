"""The intrinsic-dimension experiment through the runner: output contract, resume, validation."""
import json
import os

import pytest

from configs import intrinsic_dimension as id_config
from experiments import intrinsic_dimension
from experiments.run import run_experiment


def small_config():
    config = id_config.get_config("quick")
    config.sketches = ("ffd", "affd")
    config.search.update(num_steps=80, timing_steps=3)
    return config


def test_planted_quick_contract_and_resume(tmp_path):
    config = small_config()
    summary = run_experiment(config, str(tmp_path), quiet=True)
    assert summary["planted_dim"] == 16
    for sketch in ("ffd", "affd"):
        assert 8 <= summary[f"d90/{sketch}"] <= 32  # within a factor 2 of the planted k = 16
        assert summary[f"planted/sec_per_step/{sketch}"] > 0
        assert summary[f"planted/d90_binary/{sketch}"] <= 32
    assert summary["planted/step_time_ratio_ffd_over/ffd"] == pytest.approx(1.0)
    assert os.path.exists(tmp_path / "metric_vs_d_planted.png")
    # Rerun: every (d, seed) is read from the search logs, nothing is retrained.
    again = run_experiment(config, str(tmp_path), quiet=True)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    rerun = [r for r in records if "trained_now" in r][-4:]
    assert all(r["trained_now"] == 0 for r in rerun)
    assert again["d90/affd"] == summary["d90/affd"]


def test_config_validation():
    config = small_config()
    config.sketches = ("affd", "nope")
    with pytest.raises(ValueError, match="config.sketches"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.search.d0 = 0
    with pytest.raises(ValueError, match="config.search.d0 must be a positive int"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.tasks = ("mnist",)
    with pytest.raises(ValueError, match="config.tasks"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.search.target_fraction = 1.5
    with pytest.raises(ValueError, match="target_fraction"):
        intrinsic_dimension.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        id_config.get_config("huge")
