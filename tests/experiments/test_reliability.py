"""Runs that can be trusted: a workdir lock, a workdir fingerprint, checksummed checkpoints with
fallback, divergence stops with a non-zero exit and no summary, metrics never duplicate a step, and
strict JSON. Kill tests run real subprocesses (SIGKILL)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import artifacts
from experiments import run as runner
from experiments.common import train as train_lib
from experiments.common.workdir import NONFINITE_KEY, Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = ["--config", "configs/finetune_classifier.py:digits", "--quiet", "--config.train.log_every=5",
          "--config.train.checkpoint_every=10", "--config.train.eval_every=10"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(workdir, *extra, check=None):
    out = subprocess.run([sys.executable, "-m", "experiments.run", *DIGITS, "--workdir", str(workdir), *extra],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    if check is not None:
        assert out.returncode == check, out.stderr[-3000:]
    return out


def strict(path):
    return json.loads(open(path).read(), parse_constant=lambda name: pytest.fail(f"bare {name} in {path}"))


def duplicates(workdir):
    seen, dup = set(), []
    for record in Workdir(str(workdir)).read_metrics():
        for key in record:
            if key != "step":
                if (record["step"], key) in seen:
                    dup.append((record["step"], key))
                seen.add((record["step"], key))
    return dup


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 20-step digits run (checkpoints at steps 10 and 20)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    run_cli(workdir, "--config.train.num_steps=20", check=0)
    return workdir


def test_rerun_with_changed_settings_is_refused_naming_the_fields(finished, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = (workdir / "summary.json").read_text()
    args = [*DIGITS, "--workdir", str(workdir)]
    assert runner.main([*args, "--config.train.num_steps=20", "--config.train.learning_rate=0.5"]) == 2
    assert "train.learning_rate: 0.003 (on disk) vs 0.5 (requested)" in capsys.readouterr().err
    assert runner.main([*args, "--config.train.num_steps=30"]) == 2
    assert "train.num_steps: 20 (on disk) vs 30 (requested)" in capsys.readouterr().err
    assert (workdir / "summary.json").read_text() == before  # the finished run is untouched
    # The config field workdir_on_change=subfolder runs the new settings in a fresh subfolder instead.
    out = run_cli(workdir, "--config.train.num_steps=30", "--config.workdir_on_change=subfolder", check=0)
    subfolders = [p for p in os.listdir(workdir) if p.startswith("fp-")]
    assert len(subfolders) == 1 and subfolders[0] in out.stderr
    sub = workdir / subfolders[0]
    assert strict(sub / "config.json")["train"]["num_steps"] == 30 and (sub / "summary.json").exists()
    assert (workdir / "summary.json").read_text() == before


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_good_one(finished, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    newest = workdir / "checkpoints" / "ckpt_00000020.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # a data byte (the header is at the start)
    newest.write_bytes(bytes(data))
    params = {"w": jnp.zeros(1)}
    with pytest.raises(artifacts.CorruptArtifactError, match="ckpt_00000020.safetensors is corrupt"):
        train_lib.restore_checkpoint(str(newest), params, optax.sgd(0.1).init(params))
    out = run_cli(workdir, "--config.train.num_steps=20", check=0)
    assert f"checkpoint {newest} is corrupt" in out.stderr and "falling back to" in out.stderr
    assert "ckpt_00000010.safetensors" in out.stderr
    got, want = strict(workdir / "summary.json"), strict(finished / "summary.json")
    got.pop("wall_time_s"), want.pop("wall_time_s")
    assert got.pop("resumed_from_step") == 10 and want.pop("resumed_from_step") == 0
    assert got == want  # retrained from step 10: the same numbers, bit for bit
    assert (workdir / "checkpoints" / "ckpt_00000020.safetensors.corrupt").exists()
    assert not duplicates(workdir)


def test_second_runner_is_refused_and_sigkill_resume_never_duplicates_a_step(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = [*DIGITS, "--workdir", str(workdir), "--config.train.num_steps=1000",
            "--config.train.checkpoint_every=50", "--config.train.log_every=2"]
    child = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = workdir / "checkpoints"
    try:
        while child.poll() is None and not (ckpts.is_dir() and train_lib.list_checkpoints(str(ckpts))
                                            and train_lib.list_checkpoints(str(ckpts))[-1][0] >= 100):
            time.sleep(0.05)
        assert child.poll() is None, child.communicate()[1].decode()[-3000:]
        child.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the lock
        # A second runner on the same folder is refused at once, naming the holder.
        assert runner.main(args) == 2
        assert f"another process is running an experiment in {workdir} (pid {child.pid} " in capsys.readouterr().err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (workdir / "summary.json").exists()
    assert runner.main(args) == 0  # resumes from the newest checkpoint
    assert not duplicates(workdir)
    steps = [r["step"] for r in Workdir(str(workdir)).read_metrics() if "train/loss" in r]
    assert steps == list(range(2, 1001, 2))
    strict(workdir / "summary.json")


def test_diverged_run_exits_non_zero_naming_the_step_without_summary(tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "experiments.run", "--config", "configs/train_lm.py:quick", "--quiet",
                          "--workdir", str(workdir), "--config.train.learning_rate=1e6", "--config.train.num_steps=8",
                          "--config.train.warmup_steps=1", "--config.train.log_every=2",
                          "--config.train.checkpoint_every=4", "--config.train.eval_every=4"],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "training diverged" in out.stderr and "at step" in out.stderr
    assert not (workdir / "summary.json").exists()
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def _toy(loss_scale_at):
    def loss_fn(params, batch):
        return jnp.sum((params["w"] - batch) ** 2) * batch_scale(batch)

    def batch_scale(batch):
        return jnp.where(batch[0] == loss_scale_at, jnp.nan, 1.0)

    return loss_fn, (lambda step: jnp.full((2,), float(step)))


def test_train_stops_at_the_first_non_finite_loss_or_parameter(tmp_path):
    loss_fn, batch_at = _toy(loss_scale_at=7.0)
    workdir = Workdir(str(tmp_path / "a"))
    with pytest.raises(train_lib.TrainingDivergedError, match="at step 8 ") as info:
        train_lib.train(loss_fn, {"w": jnp.zeros(2)}, optax.sgd(0.01), batch_at, 20, workdir=workdir,
                        checkpoint_every=5, log_every=5, quiet=True)
    assert info.value.step == 8
    assert [s for s, _ in train_lib.list_checkpoints(workdir.file("checkpoints"))] == [5]
    with pytest.raises(train_lib.TrainingDivergedError, match=r"parameter \['w'\] is non-finite at the start"):
        train_lib.train(loss_fn, {"w": jnp.array([0.0, jnp.nan])}, optax.sgd(0.01), batch_at, 3, quiet=True)


def test_summary_json_is_strict_with_a_nonfinite_flag(tmp_path, monkeypatch):
    from tests.experiments.test_runner import tiny_bench_config

    module = runner.load_experiment("bench_sketch")
    monkeypatch.setattr(module, "run", lambda config, workdir: {"train_loss": float("nan"), "ratio": np.float32(np.inf)})
    runner.run_experiment(tiny_bench_config(), str(tmp_path))
    summary = strict(tmp_path / "summary.json")
    assert summary["train_loss"] is None and summary["ratio"] is None
    assert summary[NONFINITE_KEY] == {"train_loss": "nan", "ratio": "inf"}


def test_metrics_log_never_duplicates_a_record_and_drops_a_torn_line(tmp_path):
    workdir = Workdir(str(tmp_path))
    workdir.log(0, task="a", d90=5)
    workdir.log(0, task="b", d90=7)  # same step and names, another record: both kept
    workdir.log(2, **{"train/loss": 0.4})
    workdir.log(4, **{"train/loss": 0.3})
    with open(workdir.file("metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "train/loss": 0.')  # a line torn by a kill
    again = Workdir(str(tmp_path))  # a resumed run, from a checkpoint at step 2
    assert again.drop_records_after(2, ("train/", "eval/")) == 1  # the step-4 loss
    again.log(2, **{"train/loss": 0.4})  # identical: not written twice
    again.log(4, **{"train/loss": 0.3})
    again.log(6, **{"train/loss": float("nan")})
    records = again.read_metrics()
    assert [(r["step"], r.get("task"), r.get("train/loss")) for r in records] == [
        (0, "a", None), (0, "b", None), (2, None, 0.4), (4, None, 0.3), (6, None, None)]
    assert records[-1][NONFINITE_KEY] == {"train/loss": "nan"}
    assert "NaN" not in open(workdir.file("metrics.jsonl")).read()
