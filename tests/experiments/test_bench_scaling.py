"""Smoke test of the scaling benchmark (quick preset shrunk to seconds) and unit tests of its report."""
from __future__ import annotations

import json

import pytest

from configs import bench_scaling as scaling_config
from experiments import bench_scaling
from experiments.run import run_experiment


def tiny_config(**overrides):
    config = scaling_config.get_config("quick")
    config.device_counts = (1, 2)
    config.d_in, config.width, config.depth, config.classes = 8, 16, 1, 3
    config.batch_size = 8
    config.m = 16
    config.warmup, config.repeats, config.time_budget_s = 1, 2, 0.2
    config.timeout_s = 120
    for key, value in overrides.items():
        config[key] = value
    return config


def test_quick_preset_shrunk_runs_end_to_end(tmp_path, capsys):
    summary = run_experiment(tiny_config(), str(tmp_path), quiet=True)
    for name in ("config.json", "metrics.jsonl", "summary.json", "scaling.md", "scaling.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_devices"] for r in records] == [1, 2]
    for r in records:
        assert r["status"] == "ok" and r["platform"] == "cpu" and r["devices_available"] == r["num_devices"]
        assert r["examples_per_s_best"] >= r["examples_per_s"] > 0 and r["output_devices"] == r["num_devices"]
        assert r["output_spec"] == "P('data', None)"
        assert r["err_vs_single_device"] < 1e-5
    assert summary["speedup/n=1"] == 1.0 and summary["speedup/n=2"] > 0
    assert summary["examples_per_s/n=2"] == pytest.approx(records[1]["examples_per_s"])
    assert "| 2 |" in (tmp_path / "scaling.md").read_text()
    assert "Scaling of sharded per-example sketched gradients" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"platform": "tpu"}, "config.platform"),
        ({"device_counts": (2, 4)}, "must include 1"),
        ({"device_counts": (1, 0)}, "config.device_counts"),
        ({"batch_size": 9}, "config.batch_size"),
        ({"sketch": "nope"}, "config.sketch"),
        ({"mode": "both"}, "config.mode"),
        ({"m": 0}, "config.m"),
        ({"chunk_size": -1}, "config.chunk_size"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        run_experiment(tiny_config(**overrides), str(tmp_path), quiet=True)
    assert not (tmp_path / "summary.json").exists()


def test_presets_validate():
    for preset in scaling_config.PRESETS:
        bench_scaling.validate_config(scaling_config.get_config(preset))
    with pytest.raises(ValueError, match="preset"):
        scaling_config.get_config("huge")


def test_summary_and_table_on_synthetic_records():
    def record(n, eps, status="ok"):
        if status != "ok":
            return {"num_devices": n, "status": status, "reason": "8 devices requested, 4 available"}
        return {"num_devices": n, "status": "ok", "examples_per_s": eps, "median_s": 100 / eps, "platform": "gpu",
                "examples_per_s_best": 2 * eps,
                "device_kind": "H100", "num_params": 10, "batch_size": 100, "err_vs_single_device": 1e-7}

    records = [record(1, 100.0), record(2, 190.0), record(4, 360.0), record(8, 0.0, status="skipped")]
    summary = bench_scaling.summarize(records)
    assert summary["speedup/n=4"] == pytest.approx(3.6) and summary["efficiency/n=2"] == pytest.approx(0.95)
    assert summary["best/num_devices"] == 4 and summary["skipped/n=8"].startswith("8 devices")
    table = bench_scaling.format_table(records, tiny_config())
    assert summary["speedup_best/n=4"] == pytest.approx(3.6) and summary["examples_per_s_best/n=2"] == 380.0
    assert "| 4 | 360 | 3.60x | 90% | 720 | 3.60x | 277.8 | 1.0e-07 |" in table and "| 8 | skipped" in table
