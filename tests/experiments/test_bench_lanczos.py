"""Smoke tests of experiments/bench_lanczos.py (shrunk), with and without the optional matfree."""
import os

import pytest

from configs import bench_lanczos as bench_config
from experiments import bench_lanczos
from experiments.run import run_experiment


def small_config():
    config = bench_config.get_config("quick")
    config.target_dims = (160,)
    config.update(num_examples=32, num_iters=20, slq_probes=2, slq_iters=8, hutchinson_probes=3, repeats=1, min_timed_s=0.0,
                  time_budget_s=5.0)
    return config


def test_bench_runs_and_agrees_with_matfree(tmp_path):
    pytest.importorskip("matfree")
    summary = run_experiment(small_config(), str(tmp_path), quiet=True)
    assert summary["matfree_used"]
    assert summary["lanczos/D=160/max_rel_diff_vs_matfree"] < 1e-10
    assert summary["slq/D=160/rel_diff_vs_matfree"] < 1e-10
    assert summary["lanczos/D=160/ours_lambda_max_rel_err_vs_dense"] < 1e-8
    assert summary["lanczos/D=160/speedup"] > 0 and summary["hutchinson/D=160/diff_in_stderr"] < 5
    for name in ("table.md", "time_vs_D.png", "metrics.jsonl"):
        assert os.path.exists(tmp_path / name), name


def test_bench_skips_matfree_cleanly_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_lanczos, "matfree_available", lambda: False)
    config = small_config()
    config.methods = ("lanczos", "hutchinson")
    summary = run_experiment(config, str(tmp_path), quiet=True)
    assert not summary["matfree_used"] and "min_speedup" not in summary
    assert summary["lanczos/D=160/ours/median_s"] > 0
    assert "skipped" in (tmp_path / "table.md").read_text()


def test_config_validation():
    config = small_config()
    config.methods = ("lanczos", "nope")
    with pytest.raises(ValueError, match="nope"):
        bench_lanczos.validate_config(config)
    config = small_config()
    config.target_dims = (10,)
    with pytest.raises(ValueError, match="target_dims"):
        bench_lanczos.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        bench_config.get_config("huge")
