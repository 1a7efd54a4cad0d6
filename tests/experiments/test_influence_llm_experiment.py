"""Smoke test of configs/influence_llm.py (a shrunken quick preset: the full quick preset takes ~4 min)."""
import json
import os

import pytest

from configs import influence_llm as config_lib
from experiments import influence_llm
from experiments.run import run_experiment


def test_influence_llm_smoke(tmp_path):
    config = config_lib.get_config("quick")
    config.data.update(num_facts=6, num_distractors=6, num_heldout=2)
    config.train.update(num_steps=20, batch_size=8, checkpoint_every=20, eval_every=20, warmup_steps=2)
    # sketches: the two checked below (the preset's afjl goes through the same loop)
    config.update(sketch_dim=64, trak_dim=64, lds_subsets=2, query_ranks=(1, 4), tfidf_n=(2, 8),
                  sketches=("qk", "logra"))
    config.model.update(num_layers=1, d_model=16, num_heads=2)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    for task in ("facts_lm", "facts_lm_reversed"):
        for scorer in ("ekfac/none", "kfac/none", "trak/dense", "grad_dot/none", "cosine/logra", "cosine/qk"):
            assert 0.0 <= summary[f"{task}/{scorer}/recall@10"] <= 1.0
            assert 0.0 < summary[f"{task}/{scorer}/mrr"] <= 1.0
            assert -1.0 <= summary[f"{task}/{scorer}/lds"] <= 1.0
        assert summary[f"{task}/ekfac/none/qb_rel_error@4"] <= summary[f"{task}/ekfac/none/qb_rel_error@1"] + 1e-6
        assert 0.0 <= summary[f"{task}/ekfac/none/tfidf_recall@8"] <= 1.0
    for name in ("report.md", "influence_llm.png", "summary.json", "facts_lm/scores.npz", "facts_lm/ekfac/ekfac_factors.npz"):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "summary.json") as f:
        assert all(k.count("/") >= 1 for k in json.load(f) if k != "wall_time_s")


def test_influence_llm_config_validation():
    config = config_lib.get_config("quick")
    config.tasks = ("facts_lm", "facts_cv")
    with pytest.raises(ValueError, match="config.tasks"):
        influence_llm.validate_config(config)
    config = config_lib.get_config("quick")
    config.sketches = ("sjlt2",)
    with pytest.raises(ValueError, match="config.sketches"):
        influence_llm.validate_config(config)
