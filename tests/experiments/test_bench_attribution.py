"""Smoke test of the attribution benchmark: every section on tiny sizes, through the runner."""
from __future__ import annotations

import json
import math
import sys

import pytest

from configs import bench_attribution as bench_config
from experiments import bench_attribution
from experiments.common.config_checks import ConfigError
from experiments.run import run_experiment


def tiny_config():
    config = bench_config.get_config("quick")
    e = config.ekfac
    e.num_train, e.num_queries, e.hidden, e.batch_size, e.ragged_batch_size = 300, 7, (8,), 100, 0
    e.train_steps, e.train_batch_size = 0, 32  # no training: the smoke test times compilation-bound tiny fits
    b = config.index_build
    b.model, b.seq_len, b.batch_size, b.num_sequences, b.m, b.repeats = "transformer", 8, 2, 4, 32, 1
    b.sketches = ("qk",)
    b.transformer.d_model, b.transformer.num_heads = 8, 1
    t = config.top_k
    t.num_rows, t.m, t.num_queries, t.shard_size, t.num_clusters = 3000, 32, 8, 1000, 16
    config.ann.nlist, config.ann.nprobe, config.ann.train_size = 16, 16, 1000
    return config


def test_tiny_run_reports_finite_consistent_numbers(tmp_path, no_compilation_cache):
    try:
        import faiss  # noqa: F401
        have_faiss = True
    except ImportError:
        have_faiss = False
    s = run_experiment(tiny_config(), str(tmp_path), quiet=True)
    assert json.loads((tmp_path / "summary.json").read_text())["ekfac/num_train"] == 300
    report = (tmp_path / "report.md").read_text()
    for title in ("EK-FAC", "Index build", "Exact top-k", "Approximate top-k"):
        assert f"## {title}" in report
    numbers = [v for k, v in s.items() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    # Ratios are the ratios of the reported times.
    assert s["ekfac/total_first_s"] == pytest.approx(s["ekfac/fit_first_s"] + s["ekfac/score_first_s"])
    assert s["ekfac/speedup_first"] == pytest.approx(s["ekfac/reference_s"] / s["ekfac/total_first_s"])
    assert s["ekfac/target_met"] == (s["ekfac/speedup_first"] >= 3.0)
    assert s["ekfac/score_second_compiles"] == 0  # the scorer compiles once (padded last batch)
    assert "ekfac/fit_ragged_s" not in s  # ragged_batch_size=0: no third fit
    for name in ("qk",):
        assert s[f"index_build/{name}/overhead"] == pytest.approx(
            s[f"index_build/{name}/sketched_s"] / s["index_build/plain_s"])
        assert s[f"index_build/{name}/build_seq_per_s"] == pytest.approx(4 / s[f"index_build/{name}/build_s"])
    assert s["top_k/num_shards"] == 3 and s["top_k/shard_float32_mb"] == pytest.approx(1000 * 32 * 4 / 2**20)
    if have_faiss:
        assert s["ann/speedup"] == pytest.approx(s["ann/exact_s"] / s["ann/search_s"])
        assert s["ann/recall@10"] == 1.0  # every cell probed: the IVF search is exhaustive
    else:
        assert "pip install faiss-cpu" in s["ann/skipped"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["section"] for r in records} == {"ekfac", "index_build/qk", "index_build",
                                               "top_k", "ann"}


def test_without_faiss_the_ann_section_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    config = tiny_config()
    config.sections = ("top_k", "ann")
    s = run_experiment(config, str(tmp_path), quiet=True)
    assert "pip install faiss-cpu" in s["ann/skipped"]
    assert "Skipped:" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("field, value, message", [
    ("sections", ("ekfac", "retrain"), "config.sections entry='retrain'"),
    ("ekfac.batch_size", 0, "config.ekfac.batch_size=0"),
    ("top_k.dtype", "int8", "config.top_k.dtype='int8'"),
    ("ann.nprobe", 5000, "config.ann.nprobe=5000"),
])
def test_bad_fields_are_named(field, value, message):
    config = tiny_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bench_attribution.validate_config(config)
