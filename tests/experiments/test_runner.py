"""The one runner: files it writes, dispatch errors, and no summary after a failure."""
import json
import os
import re
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


def test_failed_run_removes_stale_summary(tmp_path, monkeypatch):
    """A run that fails after it started leaves no summary.json (not even the previous one); a config
    rejected before any work leaves the folder as it was (its summary still matches its config)."""
    module = runner.load_experiment("bench_sketch")
    monkeypatch.setattr(module, "run", lambda config, workdir: {"ratio": 2.0})
    runner.run_experiment(tiny_bench_config(), str(tmp_path))
    assert (tmp_path / "summary.json").exists()
    bad = tiny_bench_config()
    bad.sketches = ("afjl", "not_a_sketch")
    with pytest.raises(ValueError, match="not_a_sketch"):
        runner.run_experiment(bad, str(tmp_path))
    assert (tmp_path / "summary.json").exists()

    def crash(config, workdir):
        raise RuntimeError("crashed mid-run")

    monkeypatch.setattr(module, "run", crash)
    with pytest.raises(RuntimeError, match="crashed mid-run"):
        runner.run_experiment(tiny_bench_config(), str(tmp_path))
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
    assert "Unable to initialize backend" not in out.stderr  # JAX probing absent backends is not the user's concern
    assert f"Results written to {workdir}" in out.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["sketches"] == ["afjl", "dense"] and config["log2_D"] == [10] and config["quiet"] is True
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["wall_time_s"] > 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["sketch"] for r in records if "sketch" in r} == {"afjl", "dense"}

    bad = subprocess.run(cmd[:7] + ["--config.no_such_field=1"], capture_output=True, text=True, cwd=os.getcwd())
    assert bad.returncode == 2 and "config.no_such_field is not a field" in bad.stderr
    assert "Traceback" not in bad.stderr


# ---- the command line: one clear message and exit code 2 for every configuration mistake ----

def _cli(capsys, *args):
    code = runner.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (("--config.m_value=3",), "config.m_value is not a field; allowed fields: ["),
    (("--config.train.stepz=3",), "config.train.stepz is not a field; allowed fields: ['batch_size'"),
    (("--config.train.num_stepz=3",), "config.train.num_stepz is not a field (did you mean 'num_steps'?)"),
    (("--config.train.num_steps=abc",), "config.train.num_steps='abc' is not an int"),
    (("--config.sketch_mode=implicitt",), "config.sketch_mode='implicitt' (did you mean 'implicit'?); allowed values"),
    (("--config.seed",), "--config.seed needs a value"),
])
def test_override_mistakes_are_one_message_with_exit_code_2(capsys, tmp_path, args, message):
    code, out, err = _cli(capsys, "--config", "configs/demo.py:quick", "--workdir", str(tmp_path / "w"), *args)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()  # nothing written before the config is known to be good


@pytest.mark.parametrize("config, message", [
    ("configs/nope.py", "no config file 'configs/nope.py'"),
    ("configs/dmeo.py", "(did you mean configs/demo.py?)"),
    ("configs/demo.py:quikc", "unknown preset (did you mean 'quick'?); allowed presets:"),
    ("configs/demo.py:bogus", "allowed presets: '' (the default, no ':preset'), 'quick'"),
])
def test_config_file_and_preset_mistakes(capsys, tmp_path, config, message):
    code, _, err = _cli(capsys, "--config", config, "--workdir", str(tmp_path / "w"))
    assert code == 2 and message in err and "Traceback" not in err


def test_empty_workdir_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(capsys, "--config", os.path.join(runner.__file__, "..", "..", "configs", "train_lm.py"),
                        "--workdir", "")
    assert code == 2 and "--workdir is empty" in err
    assert os.listdir(tmp_path) == []  # nothing written into the current folder
    with pytest.raises(ValueError, match="--workdir is empty"):
        runner.run_experiment(ml_collections.ConfigDict({"experiment": "train_lm"}), "")


def test_missing_flags_explain_themselves(capsys):
    code, _, err = _cli(capsys)
    assert code == 2 and "both --config and --workdir are required" in err


def test_a_sketch_constraint_fails_before_training(capsys, tmp_path):
    """afjl reduces dimension (m ≤ D): the demo refuses m = 2^30 before training its model."""
    code, _, err = _cli(capsys, "--config", "configs/demo.py:quick", "--workdir", str(tmp_path / "w"),
                        f"--config.sketch_dim={1 << 30}", "--config.sketches=('afjl',)")
    assert code == 2 and f"config.sketch_dim={1 << 30} with sketch 'afjl'" in err and "needs m <= D" in err
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_list_shows_every_config_and_preset_with_a_time(capsys):
    code, out, _ = _cli(capsys, "--list")
    assert code == 0
    for path in ("configs/demo.py", "configs/demo.py:quick", "configs/train_lm.py:quick", "configs/bench_sketch.py:quick"):
        assert any(line.split()[0] == path for line in out.splitlines() if line.strip().startswith("configs/")), path
    rows = [line for line in out.splitlines() if line.strip().startswith("configs/")]
    timed = re.compile(r"(≈|>|<|≤) ?[0-9.]+[–-]?[0-9.]* ?(s|min|h)\b")
    assert all(timed.search(line) for line in rows), [r for r in rows if not timed.search(r)]


def test_every_config_has_a_preset_table_that_get_config_accepts():
    from experiments.common.command_line import config_files, _import_file, presets_of
    for path in config_files():
        module = _import_file(path)
        table = getattr(module, "PRESETS", None)
        assert isinstance(table, dict) and table, f"{path} has no PRESETS dict"
        for preset, description in presets_of(module).items():
            assert description.strip(), f"{path}:{preset} has no description"
            assert module.get_config(preset or None) is not None


def test_help_lists_the_configs():
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(runner.__file__)))
    assert out.returncode == 0 and "configs/demo.py:quick" in out.stdout and "--list" in out.stdout


def test_a_value_the_experiment_rejects_is_a_config_error(capsys, tmp_path):
    code, _, err = _cli(capsys, "--config", "configs/train_lm.py:quick", "--workdir", str(tmp_path / "w"),
                        "--config.train.warmup_steps=100000")
    assert code == 2 and "config.train.warmup_steps must be in [0, num_steps=" in err and "Traceback" not in err
