"""paper_tables on a shrunk config: every section but the MiniLM ones runs, report.md has the three
columns (≈ 1 min on an idle 2-core CPU; MiniLM is exercised by the quick preset)."""
import json
import os

import pytest

from configs import paper_tables as config_module
from experiments import paper_tables
from experiments.common.config_checks import ConfigError
from experiments.common.workdir import Workdir


def shrunk():
    c = config_module.get_config("quick")
    c.quiet = True
    c.sections = ("table6", "table7", "cost", "table11", "layers")
    c.maps = ("afjl",)
    c.tiny_lm.update(train_steps=0, num_queries=8, num_train=8, hessian_examples=8)
    c.table6.update(log2_ms=(6,), seeds=1, models=("tiny_lm",))
    c.table7.update(log2_ms=(6,), num_iters=10, maps=("afjl",))
    c.cost.update(log2_m=8, repeats=1, hvp=False, algos=("afjl",))
    c.cost.model.update(num_layers=1, d_model=32, num_heads=2, vocab_size=256, max_len=16)
    c.table11.update(log2_d=12, log2_ms=(8,), repeats=1)
    c.layers.update(models=("tiny_lm",), num_iters=10, whole_model_log2_m=8)
    return c


def test_shrunk_run_writes_the_side_by_side_report(tmp_path):
    summary = paper_tables.run(shrunk(), Workdir(str(tmp_path)))
    report = (tmp_path / "report.md").read_text()
    for heading in ("Table 6", "Table 7", "Tables 3, 8, 9", "Table 4", "Table 11", "Tables 1 / 5"):
        assert heading in report
    assert "| algo | paper | ours, paper's map | ours, our variant |" in report
    assert "| afjl | 12 / 13 / 15 |" in report  # the paper's Table 6 row next to ours
    assert "Wall time per part: build tiny lm" in report and "table6" in report
    results = json.loads((tmp_path / "results.json").read_text())
    r = results["table6"]["tiny LM"]["r"]
    assert set(r) == {"afjl/paper", "afjl/ours"}
    assert all(-1 <= v <= 1 for rs in r.values() for v in rs.values())
    assert {row["I"] for row in results["cost"]["gradient"]} == {0, 1}
    assert "table4/implicit→explicit/afjl" in summary
    for name in ("table6.png", "table7.png", "table11.png"):
        assert os.path.getsize(tmp_path / name) > 1000

    # A rerun in the same folder reads every finished section back (no model is built, nothing is
    # recomputed) and writes the same tables: the stored log2 m keys come back as ints.
    stored = json.loads((tmp_path / "section_table6.json").read_text())
    stored["seconds"] = 1234.0
    (tmp_path / "section_table6.json").write_text(json.dumps(stored))
    paper_tables.run(shrunk(), Workdir(str(tmp_path)))
    again = (tmp_path / "report.md").read_text()
    assert "Read from an earlier, interrupted run in this folder (same settings): table6, table7, cost, table11, " \
           "layers" in again
    assert "table6 20.6 min" in again and "build tiny lm" not in again
    tables = [line for line in report.splitlines() if line.startswith("|")]
    assert tables == [line for line in again.splitlines() if line.startswith("|")]


def test_quick_preset_validates_and_bad_fields_are_named():
    paper_tables.validate_config(config_module.get_config("quick"))
    paper_tables.validate_config(config_module.get_config())
    bad = config_module.get_config("quick")
    bad.maps = ("afjl", "fastfood")
    with pytest.raises(ConfigError, match="config.maps"):
        paper_tables.validate_config(bad)
    bad = config_module.get_config("quick")
    bad.minilm.enabled = False
    with pytest.raises(ConfigError, match="minilm.enabled"):
        paper_tables.validate_config(bad)


def test_tda_cost_report_rows_per_sequence_length_and_the_best_map():
    """Explicit rows at every sequence length, implicit rows at the shortest only, and the best ratio named."""
    c = config_module.get_config("quick")
    c.tda_cost.log2_ms = (12, 16)
    res = {"num_params": 22_566_916, "batch_size": 2, "gradient_ms": {"16": 70.0, "128": 560.0},
           "ratio": {"afjl/paper/explicit/12/L16": 3.7, "afjl/paper/explicit/16/L16": 3.5,
                     "afjl/paper/implicit/12/L16": 280.0, "afjl/paper/explicit/12/L128": 1.2,
                     "afjl/ours/explicit/12/L16": 16.0}}
    lines = paper_tables._report_tda(res, c)
    text = "\n".join(lines)
    assert "70 ms at 16 tokens, 560 ms at 128 tokens" in text
    assert "| afjl (paper) | explicit | 128 | 1.20 | — |" in text
    assert "| afjl (paper) | implicit | 16 | 280.00 | — |" in text
    assert not any("| implicit | 128 |" in line for line in lines)
    assert "Best: afjl (paper), explicit, m = 2^12, 128 tokens: 1.20 (meets the target)." in text
    bad = config_module.get_config("quick")
    bad.tda_cost.max_lens = (16, 1024)
    with pytest.raises(ConfigError, match="config.tda_cost.max_lens"):
        paper_tables.validate_config(bad)


def test_affine_error_and_layer_groups():
    import landscape
    assert landscape.affine_relative_error([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], 3) == pytest.approx(0.0, abs=1e-12)
    assert landscape.affine_relative_error([3.0, 2.0, 1.0], [3.0, 2.0, 1.0], 3) == pytest.approx(0.0, abs=1e-12)
    assert paper_tables.layer_of("['encoder']['layer']['3']['attention']['kernel']") == "encoder/layer/3"
    assert paper_tables.layer_of("['Block_1']['mlp']['kernel']") == "Block_1"
    assert paper_tables.layer_of("['embed']['embedding']") == "embed"


def test_search_stops_a_map_once_every_threshold_is_reached():
    """The smallest-m search stops a map at the first m reaching the strictest threshold; the report marks
    the skipped grid points "·" (not "—", which means the map does not take that m)."""
    rising = {6: 0.90, 9: 0.985}
    assert not paper_tables.reached_all(rising, paper_tables.THRESHOLDS_R, above=True)
    rising[12] = 0.995
    assert paper_tables.reached_all(rising, paper_tables.THRESHOLDS_R, above=True)
    assert paper_tables.first_reaching(rising, paper_tables.THRESHOLDS_R, above=True) == [9, 9, 12]
    assert not paper_tables.reached_all({}, paper_tables.THRESHOLDS_R, above=True)
    falling = {7: 0.04}
    assert paper_tables.reached_all(falling, paper_tables.THRESHOLDS_EIG, above=False)
    assert paper_tables._search_cells(falling, [7, 10], paper_tables.THRESHOLDS_EIG, above=False) == "0.040 | ·"
    short = {7: 0.15}
    assert paper_tables._search_cells(short, [5, 7, 10], paper_tables.THRESHOLDS_EIG, above=False) == "— | 0.150 | —"
