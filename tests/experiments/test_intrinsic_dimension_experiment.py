"""The intrinsic-dimension experiment through the runner: output contract, the three searches, resume,
stale-state refusal and validation."""
import json
import os

import pytest

import artifacts
from configs import intrinsic_dimension as id_config
from experiments import intrinsic_dimension
from experiments.run import run_experiment


def small_config():
    """quick shrunk: D = 256, k = 8, affd only, doubling + single-run searches."""
    config = id_config.get_config("quick")
    config.sketches = ("affd",)
    config.searches = ("doubling", "single_run")
    config.planted.update(num_params=256, planted_dim=8, num_train=128, num_test=128)
    config.search.update(d0=2, d_max=64, num_steps=80, timing_d=16, timing_steps=2)
    config.single_run.update(d_min=2, d_max=64, interval=40)
    return config


def test_planted_quick_contract_resume_and_stale_state(tmp_path):
    config = small_config()
    summary = run_experiment(config, str(tmp_path), quiet=True)
    assert summary["planted_dim"] == 8
    assert 4 <= summary["d90/affd"] <= 16  # within a factor 2 of the planted k = 8
    assert 4 <= summary["planted/single_run/d_star/affd"] <= 16
    assert summary["planted/single_run/verified/affd"] == 1.0  # D*/2 stays below τ90
    assert summary["planted/single_run/steps/affd"] % 40 == 0
    assert summary["planted/doubling/steps/affd"] % 80 == 0 and summary["planted/doubling/steps/affd"] >= 3 * 80
    assert summary["planted/full/steps"] == 80 and summary["planted/full/seconds"] > 0
    assert summary["planted/single_run/steps_over_full/affd"] == summary["planted/single_run/steps/affd"] / 80
    for name in ("metric_vs_d_planted.png", "single_run_planted.png"):
        assert os.path.getsize(tmp_path / name) > 10_000
    # Rerun: every (d, seed) is read from the search log, the single run from its final checkpoint.
    again = run_experiment(config, str(tmp_path), quiet=True)
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    rerun = records[-2:]
    assert [r["search"] for r in rerun] == ["doubling", "single_run"]
    assert rerun[0]["trained_now"] == 0
    assert rerun[1]["resumed_from"] == rerun[1]["steps"] == summary["planted/single_run/steps/affd"]
    assert again["planted/single_run/d_star/affd"] == summary["planted/single_run/d_star/affd"]
    assert again["planted/doubling/seconds/affd"] == pytest.approx(summary["planted/doubling/seconds/affd"])
    # Stale state: the logs were made with 80 steps per d; a 90-step search must not reuse them.
    config.search.num_steps = 90
    config.searches = ("doubling",)
    with pytest.raises(artifacts.FingerprintMismatchError, match="num_steps"):
        run_experiment(config, str(tmp_path), quiet=True)
    config = small_config()
    config.single_run.learning_rate = 0.05
    config.searches = ("single_run",)
    with pytest.raises(artifacts.FingerprintMismatchError, match="learning_rate"):
        run_experiment(config, str(tmp_path), quiet=True)


def test_config_validation():
    config = small_config()
    config.sketches = ("affd", "nope")
    with pytest.raises(ValueError, match="config.sketches"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.search.d0 = 0
    with pytest.raises(ValueError, match="config.search.d0=0"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.tasks = ("mnist",)
    with pytest.raises(ValueError, match="config.tasks"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.search.target_fraction = 1.5
    with pytest.raises(ValueError, match="target_fraction"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.searches = ("doubling", "one_run")
    with pytest.raises(ValueError, match="config.searches"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.single_run.d_max = 1
    with pytest.raises(ValueError, match="config.single_run.d_max"):
        intrinsic_dimension.validate_config(config)
    config = small_config()
    config.single_run.intervall = 3
    with pytest.raises(ValueError, match="intervall"):
        intrinsic_dimension.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        id_config.get_config("huge")
    for preset in id_config.PRESETS:
        intrinsic_dimension.validate_config(id_config.get_config(preset))
