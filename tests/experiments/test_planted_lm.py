"""experiments/tasks/planted_lm.py: the weighted retraining of counterfactual evaluations."""
import dataclasses

import jax
import numpy as np
import pytest

from configs import train_lm
from experiments.tasks import planted_lm


@pytest.fixture(scope="module")
def tiny():
    config = train_lm.get_config("quick")
    config.data.update(num_facts=3, num_distractors=3, num_heldout=1)
    config.train.update(num_steps=12, batch_size=4, checkpoint_every=0, eval_every=0, warmup_steps=2)
    config.model.update(num_layers=1, d_model=16, num_heads=2)
    return config, planted_lm.setup(config)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_unit_weights_are_the_full_run(tiny):
    config, s = tiny
    n = len(s.corpus.documents)
    stacked = planted_lm.weighted_trainer(config, s)(np.ones((2, n)))
    reference = planted_lm.train_on_subset(config, s, np.arange(n))  # the same batches, one Python loop
    for got, want in zip(_leaves(stacked), _leaves(reference)):
        np.testing.assert_allclose(got[0], want, rtol=1e-3, atol=1e-5)
        np.testing.assert_array_equal(got[0], got[1])  # the K runs of one call are independent copies
    initial = _leaves(s.params)
    assert max(float(np.abs(g[0] - p).max()) for g, p in zip(_leaves(stacked), initial)) > 1e-3  # it trained


def test_a_zero_weight_document_has_no_effect(tiny):
    """Model k never sees a document it weights 0: replacing that document's tokens changes nothing,
    while the same document with weight 1 does change the result."""
    config, s = tiny
    n = len(s.corpus.documents)
    left_out = 2
    weights = np.ones((2, n))
    weights[0, left_out] = 0.0
    tokens = np.asarray(s.train["tokens"]).copy()
    tokens[left_out] = np.roll(tokens[left_out], 3)
    other = dataclasses.replace(s, train={**s.train, "tokens": tokens})
    a = _leaves(planted_lm.weighted_trainer(config, s)(weights))
    b = _leaves(planted_lm.weighted_trainer(config, other)(weights))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x[0], y[0], rtol=0, atol=1e-6)
    assert max(float(np.abs(x[1] - y[1]).max()) for x, y in zip(a, b)) > 1e-5


def test_weights_are_validated(tiny):
    config, s = tiny
    train = planted_lm.weighted_trainer(config, s)
    n = len(s.corpus.documents)
    with pytest.raises(ValueError, match=rf"weights must be \(K, {n}\)"):
        train(np.ones(n))
    with pytest.raises(ValueError, match="finite and >= 0"):
        train(-np.ones((1, n)))
