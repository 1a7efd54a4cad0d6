"""configs/tda_benchmark.py on shrunken tasks: the output contract, the exact-IF reference behaving as
theory says (leave-one-out on a strongly convex model), cached retraining, and config validation."""
import json
import os

import numpy as np
import pytest

from configs import tda_benchmark as config_lib
from experiments import tda_benchmark
from experiments.run import run_experiment


def _tiny_config():
    config = config_lib.get_config("quick")
    config.digits.update(num_train=120, num_queries=8, num_steps=1500)
    # The m sweep (32 and the headline 64) runs on digits, where it is checked; the LM only at the headline m
    # (each sketched m there costs a Krylov run through the transformer).
    config.update(sketches=("qk",), layer_selection_sketches=("qk",), sketch_dims=(32, 64),
                  facts_sketch_dims=(64,), sketch_dim=64, lds_subsets=8, loo_examples=12,
                  brittleness_queries=2, brittleness_ks=(5,), arnoldi_iters=24, arnoldi_top=12,
                  tracin_checkpoints=2, layer_selection_m=128)
    config.facts.data.update(num_facts=6, num_distractors=6, num_heldout=2)
    config.facts.train.update(num_steps=30, batch_size=8, checkpoint_every=15, eval_every=30, warmup_steps=2)
    config.facts.model.update(num_layers=1, d_model=16, num_heads=2)
    return config


def test_tda_benchmark_contract_and_reference(tmp_path):
    config = _tiny_config()
    summary = run_experiment(config, str(tmp_path), quiet=True)
    for scorer in config.scorers:
        for rep in ("none", "qk"):
            assert -1.0 <= summary[f"digits_logreg/{scorer}/{rep}/lds"] <= 1.0
            assert 0.0 <= summary[f"facts_lm/{scorer}/{rep}/recall@10"] <= 1.0
            assert 0.0 < summary[f"facts_lm/{scorer}/{rep}/mrr"] <= 1.0
            if rep != "none":
                assert np.isfinite(summary[f"digits_logreg/{scorer}/{rep}/corr_vs_none@m32"])
    # Exact influence is the first-order leave-one-out effect on this strongly convex model.
    assert summary["digits_logreg/exact_if/none/loo"] > 0.9
    assert summary["digits_logreg/exact_if/none/lds"] > summary["digits_logreg/dot/none/lds"]
    assert summary["digits_logreg/index/qk/size_bytes"] >= 120 * 64 * 4
    assert summary["digits_logreg/layer_selection/head/pearson_dot"] == pytest.approx(1.0)  # logreg: one layer
    facts_layers = [k for k in summary if k.startswith("facts_lm/layer_selection/") and k.endswith("pearson_dot")]
    assert len(facts_layers) >= 3 and all(-1 <= summary[k] <= 1 for k in facts_layers)
    for name in ("report.md", "tda_benchmark.png", "summary.json"):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "summary.json") as f:
        keys = [k for k in json.load(f) if k != "wall_time_s"]
    assert all(k.split("/")[0] in config.tasks for k in keys)

    # Every retraining outcome is cached on disk (attribution/retrain.py; resumption is tested there).
    assert len(os.listdir(tmp_path / "digits_logreg/retrain/lds")) == 8 + 1  # runs + manifest


@pytest.mark.parametrize("field, value, match", [
    ("scorers", ("dot", "lissa"), "config.scorers"),
    ("sketches", ("qk", "srht"), "config.sketches"),
    ("sketch_dim", 128, "sketch_dim"),
    ("lds_subsets", 1, "lds_subsets"),
])
def test_config_validation(field, value, match):
    config = config_lib.get_config("quick")
    config[field] = value
    with pytest.raises(ValueError, match=match):
        tda_benchmark.validate_config(config)
