"""Planted-facts corpus (determinism, provenance), text classes, digits, batching, tokenizer."""
import numpy as np
import pytest

from experiments.common import data
from experiments.common.tokenizers import WordTokenizer, split_words


def test_planted_facts_deterministic_in_seed():
    a = data.make_planted_facts(seed=3, num_facts=8, num_distractors=5, num_heldout=2)
    b = data.make_planted_facts(seed=3, num_facts=8, num_distractors=5, num_heldout=2)
    c = data.make_planted_facts(seed=4, num_facts=8, num_distractors=5, num_heldout=2)
    assert a == b
    assert a.documents != c.documents


@pytest.mark.parametrize("order", data.ORDERS)
def test_planted_facts_provenance(order):
    corpus = data.make_planted_facts(seed=0, num_facts=12, docs_per_fact=3, num_distractors=10, num_heldout=4,
                                     order=order)
    assert len(corpus.documents) == 12 * 3 + 10
    assert sum(f == -1 for f in corpus.doc_fact) == 10
    for q in corpus.queries:
        fact = corpus.facts[q.fact]
        assert len(q.documents) == 3
        assert q.prompt == data.RELATIONS[fact.relation].prompt.format(s=fact.subject)
        for d in q.documents:
            words = split_words(corpus.documents[d])
            assert corpus.doc_fact[d] == q.fact and fact.answer in words and fact.subject in words
        # the answer occurs in exactly the planting documents
        holders = {d for d, doc in enumerate(corpus.documents) if fact.answer in split_words(doc)}
        assert holders == set(q.documents)
        canonical = f"{q.prompt} {q.answer} ."
        opens = [corpus.documents[d].startswith(canonical) for d in q.documents]
        assert sum(opens) == (1 if order == "forward" else 0)
    for q in corpus.heldout_queries:  # negative controls are written nowhere
        assert q.documents == ()
        assert not any(q.answer in split_words(doc) for doc in corpus.documents)
    if order == "reversed":
        for q in corpus.queries:
            assert all(q.prompt not in corpus.documents[d] for d in q.documents)


def test_planted_facts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        data.make_planted_facts(seed=0, order="sideways")
    with pytest.raises(ValueError, match="num_facts"):
        data.make_planted_facts(seed=0, num_facts=0)


def test_text_classification_and_digits():
    a = data.make_text_classification(seed=1, num_classes=3, num_train=40, num_test=20)
    b = data.make_text_classification(seed=1, num_classes=3, num_train=40, num_test=20)
    assert a["train"]["texts"] == b["train"]["texts"] and len(a["test"]["texts"]) == 20
    assert set(np.unique(a["train"]["labels"])) <= {0, 1, 2} and len(a["classes"]) == 3
    with pytest.raises(ValueError, match="num_classes"):
        data.make_text_classification(seed=0, num_classes=len(data.TOPICS) + 1)
    digits = data.load_digits(seed=0, test_fraction=0.25)
    assert digits["train"]["x"].shape[1:] == (8, 8, 1) and digits["train"]["x"].max() <= 1.0
    assert len(digits["train"]["y"]) + len(digits["test"]["y"]) == 1797


def test_batch_indices_cover_each_epoch_once():
    seen = np.concatenate([data.batch_indices(10, 3, step, seed=5) for step in range(3)])
    assert sorted(seen.tolist()) == sorted(set(seen.tolist())) and len(seen) == 9
    assert np.array_equal(data.batch_indices(10, 3, 4, seed=5), data.batch_indices(10, 3, 4, seed=5))
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_indices(4, 5, 0, seed=0)


def test_word_tokenizer_roundtrip_and_overflow(tmp_path):
    tok = WordTokenizer.fit(["The capital of Zorvia is Quellin ."])
    ids = tok.encode("the capital of zorvia is quellin .", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "the capital of zorvia is quellin ."
    assert tok.encode("unseen", bos=False) == [tok.unk_id]
    tokens, mask = tok.encode_batch(["capital of zorvia", "is"], max_len=6)
    assert tokens.shape == (2, 6) and mask.sum(1).tolist() == [5.0, 3.0]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch(["the capital of zorvia is quellin ."], max_len=4)
    tok.save(str(tmp_path / "tok.json"))
    assert WordTokenizer.load(str(tmp_path / "tok.json")).vocab == tok.vocab
