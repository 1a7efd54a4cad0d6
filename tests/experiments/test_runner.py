"""The one runner: files it writes, dispatch errors, and no summary after a failure."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import bench_sketch
from experiments import run as runner


def tiny_bench_config():
    config = bench_sketch.get_config("quick")
    config.sketches = ("afjl", "dense")
    config.log2_D = (10,)
    config.m_values = (64,)
    config.goal_log2_D = 10
    config.goal_m = 64
    config.warmup = 1
    config.repeats = 1
    return config


def test_unknown_experiment_names_allowed_values(tmp_path):
    config = ml_collections.ConfigDict({"experiment": "no_such_study"})
    with pytest.raises(ValueError, match=r"config.experiment='no_such_study'.*allowed values.*bench_sketch"):
        runner.run_experiment(config, str(tmp_path))
    with pytest.raises(ValueError, match="config.experiment is missing"):
        runner.run_experiment(ml_collections.ConfigDict({"seed": 0}), str(tmp_path))


def test_helpers_are_not_experiments():
    names = runner.available_experiments()
    assert "bench_sketch" in names and "demo" in names
    assert not set(names) & {"run", "workdir", "timing", "plots", "models", "data", "train"}


def test_failed_run_removes_stale_summary(tmp_path):
    (tmp_path / "summary.json").write_text('{"stale": 1}')
    config = tiny_bench_config()
    config.sketches = ("afjl", "not_a_sketch")
    with pytest.raises(ValueError, match="not_a_sketch"):
        runner.run_experiment(config, str(tmp_path))
    assert not (tmp_path / "summary.json").exists()


def test_cli_overrides_and_output_files(tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "experiments.run", "--config", "configs/bench_sketch.py:quick", "--workdir", str(workdir),
        "--quiet", "--config.sketches=('afjl','dense')", "--config.log2_D=(10,)", "--config.m_values=(64,)",
        "--config.goal_log2_D=10", "--config.goal_m=64", "--config.repeats=1", "--config.warmup=1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd(), env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"Results written to {workdir}" in out.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["sketches"] == ["afjl", "dense"] and config["log2_D"] == [10] and config["quiet"] is True
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["wall_time_s"] > 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["sketch"] for r in records if "sketch" in r} == {"afjl", "dense"}

    bad = subprocess.run(cmd[:6] + ["--config.no_such_field=1"], capture_output=True, text=True, cwd=os.getcwd())
    assert bad.returncode != 0 and "no_such_field" in bad.stderr
