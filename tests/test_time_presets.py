"""tools/time_presets.py: measured times are formatted, substituted and applied to the right PRESETS line."""
import json
import os

import pytest

from experiments.common.command_line import preset_spec, preset_table
from tools import time_presets


@pytest.mark.parametrize("seconds, text", [
    (4, "≈ 10 s"), (33, "≈ 30 s"), (61, "≈ 1 min"), (100, "≈ 1.5 min"), (170, "≈ 3 min"), (310, "≈ 5 min"),
    (1234, "≈ 21 min"),
])
def test_format_time(seconds, text):
    assert time_presets.format_time(seconds) == text


def test_with_time_replaces_only_the_estimate():
    assert time_presets.with_time("planted k = 16 (≈ 4 min on loaded cores)", 200) == "planted k = 16 (≈ 3.5 min)"
    assert time_presets.with_time("digits (≈ 6 min; 2 GB on disk)", 400) == "digits (≈ 7 min; 2 GB on disk)"
    assert time_presets.with_time("fewer steps", 70) == "fewer steps (≈ 1 min)"


def test_every_measured_presets_entry_can_be_rewritten_in_its_config_file():
    """`apply` edits the source line of each preset `measure` times by default: each is found exactly once."""
    measured = set(time_presets.default_specs())
    assert {"configs/demo.py:quick", "configs/attribute.py:example", "configs/pbrf_benchmark.py:quick"} <= measured
    for path, preset, description in preset_table():
        if preset_spec(path, preset) not in measured:
            continue
        with open(os.path.join(time_presets.ROOT, path), encoding="utf-8") as f:
            source = f.read()
        assert len(time_presets.entry_pattern(preset, description).findall(source)) == 1, (path, preset)


def test_apply_rewrites_the_config_and_the_doc(tmp_path, monkeypatch):
    """On a copy of the repository's configs: the measured preset changes, the others and failures do not."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "docs").mkdir()
    source = ('PRESETS = {\n    "": "the full run (≈ 60 min)",\n    "quick": "small grids (≈ 10 min idle CPU)",\n}\n')
    (tmp_path / "configs" / "toy.py").write_text(source, encoding="utf-8")
    rows = [("configs/toy.py", "", "the full run (≈ 60 min)"), ("configs/toy.py", "quick", "small grids (≈ 10 min idle CPU)")]
    monkeypatch.setattr(time_presets, "ROOT", str(tmp_path))
    monkeypatch.setattr(time_presets, "DOC", str(tmp_path / "docs" / "preset_times.md"))
    monkeypatch.setattr(time_presets, "RECORDS", str(tmp_path / "docs" / "preset_times.jsonl"))
    monkeypatch.setattr(time_presets, "preset_table", lambda: rows)
    records = tmp_path / "times.jsonl"
    common = {"load_before": 0.1, "load_after": 1.0, "machine": "2 CPU cores", "date": "2026-12-01"}
    records.write_text("\n".join(json.dumps(r) for r in [
        {"spec": "configs/toy.py:quick", "seconds": 250.0, "exit_code": 0, **common},
        {"spec": "configs/toy.py", "seconds": 10.0, "exit_code": 1, **common},
    ]) + "\n", encoding="utf-8")
    time_presets.apply(str(records))
    assert (tmp_path / "configs" / "toy.py").read_text(encoding="utf-8") == source.replace(
        "small grids (≈ 10 min idle CPU)", "small grids (≈ 4 min)")
    doc = (tmp_path / "docs" / "preset_times.md").read_text(encoding="utf-8")
    assert "| `configs/toy.py:quick` | 4.2 min | 0 | 0.10 → 1.00 |" in doc and "2 CPU cores" in doc
    # a later measurement of another preset keeps the earlier ones in the records and the doc
    later = tmp_path / "later.jsonl"
    later.write_text(json.dumps({"spec": "configs/toy.py", "seconds": 30.0, "exit_code": 0, **common}) + "\n",
                     encoding="utf-8")
    time_presets.apply(str(later))
    doc = (tmp_path / "docs" / "preset_times.md").read_text(encoding="utf-8")
    assert "| `configs/toy.py:quick` | 4.2 min |" in doc and "| `configs/toy.py` | 30 s | 0 |" in doc
    assert len(time_presets.read_records(str(tmp_path / "docs" / "preset_times.jsonl"))) == 2


def test_stated_seconds_and_the_default_order():
    assert time_presets.stated_seconds("small grids (≈ 10 min idle CPU)") == 600
    assert time_presets.stated_seconds("16 facts (≈ 10 s)") == 10
    assert time_presets.stated_seconds("not timed") == float("inf")
    stated = {preset_spec(p, s): time_presets.stated_seconds(d) for p, s, d in preset_table()}
    order = [stated[spec] for spec in time_presets.default_specs()]
    assert order == sorted(order)
