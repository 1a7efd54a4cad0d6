"""Smoke test of the sketch benchmark (quick preset shrunk to seconds) and unit tests of its tables."""
from __future__ import annotations

import json
import math

import jax
import ml_collections
import pytest

from configs import bench_sketch as bench_config
from experiments import bench_sketch
from experiments.run import run_experiment


def tiny_config(**overrides):
    config = bench_config.get_config("quick")
    config.log2_D = (10, 12)
    config.m_values = (64,)
    config.goal_m = 64
    config.goal_log2_D = 12
    config.sketches = ("afjl", "fjl", "dense")
    config.repeats = 3
    config.time_budget_s = 0.05
    for key, value in overrides.items():
        config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return config


def test_quick_preset_shrunk_runs_end_to_end(tmp_path, capsys):
    summary = run_experiment(tiny_config(), str(tmp_path), quiet=True)
    for name in ("config.json", "metrics.jsonl", "summary.json", "ratios.md", "time_vs_D.png", "memory_vs_D.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3
    assert {(r["sketch"], r["log2_D"], r["m"]) for r in records} == {
        (s, k, 64) for s in ("afjl", "fjl", "dense") for k in (10, 12)
    }
    for r in records:
        assert r["status"] == "ok"
        assert r["median_ms"] > 0 and r["repeats"] >= 1 and r["warmup"] >= 1
        assert r["temp_bytes"] >= 0 and "rss_peak_mb" in r

    for key in (
        "time_ms/afjl/D=2^12/m=64", "time_ms/dense/D=2^10/m=64", "temp_mb/fjl/D=2^12/m=64",
        "speedup_vs_dense/afjl/D=2^12/m=64", "speedup_vs_dense/fjl/D=2^10/m=64",
        "speedup/afjl_vs_fjl/D=2^12/m=64", "memory_ratio_vs_dense/afjl/D=2^12/m=64",
    ):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["best_speedup_vs_dense/log2_D"] == 12
    assert summary["best_speedup_vs_dense/sketch"] in ("afjl", "fjl")
    assert summary["best_speedup_vs_dense"] == max(
        summary["speedup_vs_dense/afjl/D=2^12/m=64"], summary["speedup_vs_dense/fjl/D=2^12/m=64"]
    )
    assert summary["goal/met"] in (True, False)
    assert json.loads((tmp_path / "summary.json").read_text())["num_measured"] == 6

    printed = capsys.readouterr().out
    assert "Speed-up vs dense" in printed and "afjl vs fjl" in printed and "time_vs_D.png" in printed


def test_slow_configuration_is_skipped_and_recorded(tmp_path):
    # Any prediction exceeds a 1 ns cap: every sketch is measured once (smallest D), then skipped.
    summary = run_experiment(tiny_config(max_call_s=1e-9, goal_log2_D=10), str(tmp_path), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["status"] == "skipped"]
    assert {(r["sketch"], r["log2_D"]) for r in skipped} == {("afjl", 12), ("fjl", 12), ("dense", 12)}
    assert all("max_call_s" in r["reason"] for r in skipped)
    assert summary["num_not_measured"] == 3
    assert "max_call_s" in summary["skipped/dense/D=2^12/m=64"]
    assert "time_ms/dense/D=2^12/m=64" not in summary
    assert "skipped [" in (tmp_path / "ratios.md").read_text()

    # The goal's (D, m) is measured whatever the prediction.
    summary = run_experiment(tiny_config(max_call_s=1e-9, goal_log2_D=12), str(tmp_path / "goal"), quiet=True)
    assert summary["num_not_measured"] == 0 and summary["goal/met"] in (True, False)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"sketches": ("afjl", "nope")}, "config.sketches"),
        ({"m_values": (0,)}, "config.m_values"),
        ({"log2_D": (4,)}, "config.log2_D"),
        ({"dtype": "int8"}, "config.dtype"),
        ({"goal_m": 128}, "config.goal_m"),
        ({"time_budget_s": 0.0}, "config.time_budget_s"),
        ({"m_values": (96,), "sketch_options": {**bench_config.sketch_options().to_dict(),
                                                 "afjl": {"reduction": "segsum"}}}, "afjl"),
        # our segment-sum afjl with the Hadamard mixer needs m a power of two (the paper's map does not)
        ({"m_values": (8192,)}, "m <= D"),  # larger than D = 2^10
    ],
)
def test_bad_config_raises_value_error_naming_the_field(tmp_path, overrides, field):
    if "m_values" in overrides:
        overrides = {**overrides, "goal_m": overrides["m_values"][0]}
    with pytest.raises(ValueError, match=field):
        run_experiment(tiny_config(**overrides), str(tmp_path), quiet=True)
    assert not (tmp_path / "summary.json").exists()


def test_bad_sketch_options_raise_value_error(tmp_path):
    config = tiny_config()
    config.sketch_options.afjl.preconditioner = "fourier"
    with pytest.raises(ValueError, match="config.sketch_options.afjl.*preconditioner"):
        run_experiment(config, str(tmp_path), quiet=True)
    config = tiny_config()
    config.sketch_options["bogus"] = {}
    with pytest.raises(ValueError, match="config.sketch_options.*'bogus'"):
        run_experiment(config, str(tmp_path), quiet=True)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="preset"):
        bench_config.get_config("huge")


def test_presets_validate():
    for preset in bench_config.PRESETS:
        bench_sketch.validate_config(bench_config.get_config(preset))


def test_template_has_exactly_d_numbers():
    for log2_d in (8, 11, 16, 24):
        template = bench_sketch.make_template(log2_d, jax.numpy.float32)
        assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(template)) == 2 ** log2_d
        assert len(jax.tree.leaves(template)) == 5


def _record(sketch, log2_d, m, ms, temp, status="ok"):
    record = {"sketch": sketch, "log2_D": log2_d, "D": 2 ** log2_d, "m": m, "status": status}
    if status == "ok":
        record.update(median_ms=ms, temp_bytes=temp, temp_mb=temp / 2 ** 20,
                      temp_D_floats=temp / (4 * 2 ** log2_d), rss_peak_mb=1.0)
    else:
        record["reason"] = "one call predicted to take 99 s > max_call_s=30"
    return record


def test_ratio_rows_on_synthetic_records():
    records = [
        _record("dense", 16, 256, 200.0, 4000),
        _record("afjl", 16, 256, 2.0, 1000),
        _record("fjl", 16, 256, 4.0, 500),
        _record("affd", 16, 256, 5.0, 2000),
        _record("ffd", 16, 256, 50.0, 4000),
        _record("dense", 18, 256, 0.0, 0, status="skipped"),
        _record("afjl", 18, 256, 8.0, 4000),
        _record("fjl", 18, 256, 4.0, 0),
    ]
    rows = bench_sketch.ratio_rows(records)
    assert [(r["log2_D"], r["m"]) for r in rows] == [(16, 256), (18, 256)]
    first, second = rows
    assert first["speedup_vs_dense/afjl"] == pytest.approx(100.0)
    assert first["speedup_vs_dense/fjl"] == pytest.approx(50.0)
    assert first["memory_ratio_vs_dense/afjl"] == pytest.approx(4.0)
    assert first["speedup/afjl_vs_fjl"] == pytest.approx(2.0)        # fjl time / afjl time
    assert first["memory_ratio/afjl_vs_fjl"] == pytest.approx(0.5)   # fjl temp / afjl temp
    assert first["speedup/affd_vs_ffd"] == pytest.approx(10.0)
    assert first["memory_ratio/affd_vs_ffd"] == pytest.approx(2.0)
    assert "speedup_vs_dense/dense" not in first
    # Dense skipped at 2^18: no ratios vs dense; a zero temp leaves only that memory ratio out.
    assert not any(k.startswith(("speedup_vs_dense", "memory_ratio_vs_dense")) for k in second)
    assert second["speedup/afjl_vs_fjl"] == pytest.approx(0.5)
    assert "memory_ratio/afjl_vs_fjl" in second and second["memory_ratio/afjl_vs_fjl"] == 0.0

    table = bench_sketch.format_tables(records)
    assert "| 2^16 | 256 | 40.0x | 100x | 4x | 50.0x |" in table   # speed-up vs dense: affd afjl ffd fjl
    assert "skipped [1]" in table and "[1] dense D=2^18 m=256: skipped:" in table
    assert "| 2^16 | 256 | 2x | 0.5x | 10.0x | 2x |" in table   # afjl vs fjl, affd vs ffd


def test_summary_goal_and_best_on_synthetic_records():
    config = bench_config.get_config()
    records = [
        _record("dense", 20, 1024, 1000.0, 4000),
        _record("afjl", 20, 1024, 20.0, 1000),
        _record("dense", 22, 1024, 4000.0, 4000),
        _record("afjl", 22, 1024, 50.0, 1000),
        _record("qk", 22, 1024, 25.0, 1000),
        _record("dense", 24, 1024, 0.0, 0, status="skipped"),
        _record("afjl", 24, 1024, 200.0, 1000),
    ]
    summary = bench_sketch.summarize(records, config)
    assert summary["best_speedup_vs_dense"] == pytest.approx(160.0)
    assert summary["best_speedup_vs_dense/sketch"] == "qk"
    assert summary["best_speedup_vs_dense/log2_D"] == 22
    assert summary["goal/met"] is True and summary["goal/sketch"] == "qk"
    assert summary["skipped/dense/D=2^24/m=1024"].startswith("one call predicted")
    config.goal_speedup = 500.0
    assert bench_sketch.summarize(records, config)["goal/met"] is False
