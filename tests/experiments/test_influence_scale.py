"""Smoke test of configs/influence_scale.py (shrunken) and the paraphrase/decoy/two-language corpus."""
import os

import numpy as np
import pytest

from configs import influence_scale as config_lib
from experiments import influence_scale
from experiments.run import run_experiment
from experiments.tasks import paraphrase_facts as pf


def test_corpus_paraphrases_share_only_entities_and_decoys_share_the_query():
    c = pf.make_corpus(3, num_facts=8, num_other_language_facts=4, num_parallel=6, num_fillers=4)
    kinds, facts = np.asarray(c.kinds), np.asarray(c.doc_fact)
    for q, (prompt, answer) in enumerate(zip(c.prompts, c.answers)):
        subject = prompt.split()[-2]
        query_words = set(prompt.split()) | {answer}
        for d in np.flatnonzero((kinds == "paraphrase") & (facts == q)):
            words = set(c.documents[d].split()) - {"."}
            assert words & query_words == {subject, answer}, c.documents[d]
        for d in np.flatnonzero((kinds == "decoy") & (facts == q)):
            words = set(c.documents[d].split())
            assert set(prompt.split()) <= words and answer not in words, c.documents[d]
        for d in np.flatnonzero((kinds == "translation") & (facts == q)):
            assert c.bilingual[q] and not set(c.documents[d].split()) & (query_words | {"the", "of", "is"})
            assert c.documents[d] == pf.translate(f"{prompt} {answer} .")
    assert sum(c.bilingual) == int(((kinds == "translation")).sum())
    with pytest.raises(ValueError, match="paraphrases"):
        pf.make_corpus(0, paraphrases=3)


def test_influence_scale_smoke(tmp_path):
    config = config_lib.get_config("quick")
    config.corpus.update(num_facts=6, num_other_language_facts=2, num_parallel=6, num_fillers=4)
    config.sizes = [dict(num_layers=1, d_model=8, num_heads=2), dict(num_layers=1, d_model=16, num_heads=2)]
    config.train.update(num_steps=20, batch_size=8, warmup_steps=2, checkpoint_every=20, log_every=10)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    for name in ("L1_d8", "L1_d16"):
        for key in ("percentile/paraphrase", "percentile/decoy", "translation/percentile", "sparsity/top1pct_share"):
            value = summary[f"{name}/{key}"]
            assert np.isnan(value) or 0.0 <= value <= 1.0, (name, key, value)
        assert 0 <= summary[f"{name}/top10/decoy"] <= 2
    assert summary["L1_d16/params"] > summary["L1_d8/params"]
    for name in ("report.md", "influence_scale.png", "summary.json", "corpus.json", "L1_d8/scores.npz"):
        assert os.path.exists(tmp_path / name), name


def test_influence_scale_config_validation():
    config = config_lib.get_config("quick")
    config.sizes = [dict(num_layers=1, d_model=16, num_heads=2)]
    with pytest.raises(ValueError, match="config.sizes"):
        influence_scale.validate_config(config)
    config = config_lib.get_config("quick")
    config.sizes[0]["d_model"] = 15
    with pytest.raises(ValueError, match="d_model"):
        influence_scale.validate_config(config)
