"""Attribution on a user's own checkpoint and JSONL files (experiments/attribute.py), end to end.

One tiny GPT-2 (Flax, saved with `save_pretrained`) trained on planted facts by the shipped example
maker is attributed with every method; each method's scores.npy must equal the library functions
called directly on the same gradients, per-token contributions must sum to the scores, the cache
must be reused exactly when the inputs are the same, and the report must render in a real browser.
"""
import json
import os
import re

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sketching
from attribution import ekfac, scorers
from configs import attribute as attribute_config
from configs import attribution_example as example_config
from experiments import attribute
from experiments.common import browser, jsonl
from experiments.common import models as models_lib
from experiments.run import main, run_experiment
from experiments.tasks import user_model

SKETCH_M = 256


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The example maker's files: data/*.jsonl, data/planted.json, model/, checkpoints/step_*."""
    folder = tmp_path_factory.mktemp("example")
    config = example_config.get_config("quick")
    config.data.update(num_facts=8, num_distractors=8)
    config.model.update(n_layer=1, n_embd=64, n_head=4)
    config.train.update(num_steps=200, checkpoint_every=100, eval_every=100, warmup_steps=20)
    config.tracin_checkpoints = 1
    summary = run_experiment(config, str(folder), quiet=True)
    assert summary["query_accuracy"] >= 0.75  # the model has learned most facts
    return folder


def _config(example, method, **overrides):
    config = attribute_config.get_config()
    config.model.path = str(example / "model")
    config.data.train = str(example / "data/train.jsonl")
    config.data.queries = str(example / "data/queries.jsonl")
    config.method = method
    config.sketch.m = SKETCH_M
    config.top_k = 3
    config.batch_size = 8
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def ekfac_run(example, tmp_path_factory):
    """One EK-FAC run shared by the tests that check its scores and its report."""
    folder = tmp_path_factory.mktemp("ekfac")
    return (folder, *_run(example, folder, "ekfac"))


def _run(example, tmp_path, method, **overrides):
    config = _config(example, method, **overrides)
    summary = run_experiment(config, str(tmp_path), quiet=True)
    return config, summary, np.load(tmp_path / "scores.npy")


def _loaded(config):
    user = user_model.load(config.model)
    train_records = jsonl.read_records(config.data.train, "lm_train")
    query_records = jsonl.read_records(config.data.queries, "lm_query")
    length = user_model.sequence_length(user, [(train_records, "lm_train"), (query_records, "lm_query")], 0)
    train = user_model.encode(user, train_records, "lm_train", length, config.data.train)
    queries = user_model.encode(user, query_records, "lm_query", length, config.data.queries)
    return user, train, queries


def _mlp_params(params, model_type):
    pattern = re.compile(user_model.MLP_LAYERS[model_type])
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    chosen = {k: v for k, v in flat.items() if pattern.fullmatch(k.rsplit("/", 1)[0])}
    return chosen, lambda sel: flax.traverse_util.unflatten_dict({**flat, **sel}, sep="/")


def _sketched_gradients(user, params, arrays, sketch, state):
    """Φ ∇ℓ_i for every row: per-example gradients of the MLP parameters, each sketched by `apply`."""
    chosen, merge = _mlp_params(params, user.model_type)
    per_example = models_lib.make_loss_fns(user.model).per_example_loss

    def one(example):
        batch = jax.tree_util.tree_map(lambda a: a[None], example)
        return jax.grad(lambda sel: per_example(merge(sel), batch)[0])(chosen)

    grads = jax.jit(jax.vmap(one))({k: jnp.asarray(v) for k, v in arrays.items()})
    return np.asarray(jax.vmap(lambda g: sketch.apply(state, g))(grads), np.float64)


def _close(actual, expected, rtol=2e-4):
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _planted_top1(folder, example) -> float:
    planted = json.loads((example / "data/planted.json").read_text())
    rows = [json.loads(line) for line in (folder / "top_k.jsonl").read_text().splitlines()]
    return float(np.mean([r["top"][0]["id"] in planted[r["query_id"]] for r in rows]))


# ----------------------------------------------------------------------------------------------
# Methods against the library functions
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_ekfac_scores_equal_the_library(example, ekfac_run, tmp_path, method):
    if method == "ekfac":
        tmp_path, config, summary, scores = ekfac_run
    else:
        config, summary, scores = _run(example, tmp_path, method)
    user, train, queries = _loaded(config)
    factors = ekfac.EKFACFactors.load(str(tmp_path / "cache" / f"ekfac-{summary['cache_key']}"))
    layers = factors.layers
    assert all("/mlp/" in p for p in layers) and len(layers) == 2  # c_fc and c_proj of the one block
    qgrads = ekfac.per_example_layer_grads(user.model.apply, user.params, queries.arrays, layers, "lm")
    acts, _ = ekfac.layer_activations(user.model.apply, user.params, train.arrays, layers, "lm")
    expected = np.asarray(ekfac.influence_scores(factors.ihvp(qgrads, method), acts), np.float64)
    _close(scores, expected)
    assert summary["token_sum_max_rel_error"] < 1e-3  # per-token contributions add up to the score
    if method == "ekfac":
        assert _planted_top1(tmp_path, example) >= 0.75  # EK-FAC finds the documents stating the fact


def test_gradient_methods_equal_the_library(example, tmp_path):
    """sketch_dot, sketch_cosine, trak and logra from one set of directly computed sketched gradients."""
    results = {}
    for method in ("sketch_dot", "sketch_cosine", "trak", "logra"):
        folder = tmp_path / method
        config, summary, scores = _run(example, folder, method)
        results[method] = (config, summary, scores)
        assert summary["token_sum_max_rel_error"] < 1e-3, method
    # Beyond scores_max_mb: streaming top-k over the index gives the same ranking, and no matrix.
    config, summary, _ = results["sketch_dot"]
    streamed = run_experiment(_config(example, "sketch_dot", scores_max_mb=1e-6), str(tmp_path / "streamed"),
                              quiet=True)
    assert not streamed["scores_written"] and not (tmp_path / "streamed" / "scores.npy").exists()
    dense_top = [json.loads(line)["top"] for line in (tmp_path / "sketch_dot" / "top_k.jsonl").read_text().splitlines()]
    streamed_top = [json.loads(line)["top"] for line in (tmp_path / "streamed" / "top_k.jsonl").read_text().splitlines()]
    for a, b in zip(dense_top, streamed_top):
        assert [h["id"] for h in a] == [h["id"] for h in b]
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], rtol=1e-5)
    assert streamed["token_sum_max_rel_error"] < 1e-3
    with pytest.raises(ValueError, match=r"ekfac scores of \d+ queries × \d+ training sequences exceed"):
        run_experiment(_config(example, "ekfac", scores_max_mb=1e-6), str(tmp_path / "too_big"), quiet=True)

    user, train, queries = _loaded(config)
    chosen, _ = _mlp_params(user.params, user.model_type)
    for sketch_name, methods in ((config.sketch.name, ("sketch_dot", "sketch_cosine", "trak")), ("logra", ("logra",))):
        if sketch_name == "logra":
            from sketching import logra

            sketch = logra.get(SKETCH_M)
        else:
            sketch = sketching.get(sketch_name, SKETCH_M)
        state = sketch.init(jax.random.key(config.sketch.seed), chosen)
        phi_t = _sketched_gradients(user, user.params, train.arrays, sketch, state)
        phi_q = _sketched_gradients(user, user.params, queries.arrays, sketch, state)
        with jax.enable_x64(True):
            for method in methods:
                scores = results[method][2]
                if method == "sketch_dot":
                    expected = scorers.dot_scores(phi_q, phi_t)
                elif method == "sketch_cosine":
                    expected = scorers.cosine_scores(phi_q, phi_t)
                else:
                    ridge = config.trak.ridge * np.sum(phi_t * phi_t) / SKETCH_M
                    expected = scorers.trak_scores([phi_q], [phi_t], damping=ridge)
                _close(scores, np.asarray(expected), rtol=1e-3)


def test_tracin_equals_the_library_and_tfidf_restricts(example, tmp_path):
    steps = json.loads((example / "checkpoints.json").read_text())
    paths = [str(example / s["path"]) for s in steps] + [str(example / "model")]
    rates = [s["learning_rate"] for s in steps] + [1e-3]
    config, summary, scores = _run(example, tmp_path / "tracin", "tracin", **{
        "tracin.checkpoints": ",".join(paths), "tracin.learning_rates": ",".join(map(str, rates))})
    user, train, queries = _loaded(config)
    sketch = sketching.get(config.sketch.name, SKETCH_M)
    per_ckpt = []
    for path in paths:
        params = user_model.load({**config.model.to_dict(), "path": path}).params
        chosen, _ = _mlp_params(params, user.model_type)
        state = sketch.init(jax.random.key(config.sketch.seed), chosen)
        per_ckpt.append((_sketched_gradients(user, params, queries.arrays, sketch, state),
                         _sketched_gradients(user, params, train.arrays, sketch, state)))
    with jax.enable_x64(True):
        expected = scorers.tracin_scores([q for q, _ in per_ckpt], [t for _, t in per_ckpt], rates)
    _close(scores, np.asarray(expected), rtol=1e-3)
    assert summary["token_sum_max_rel_error"] < 1e-3

    # TF-IDF candidates + query batching: only each query's N BM25 candidates are scored.
    n = 4
    config, summary, scores = _run(example, tmp_path / "tfidf", "ekfac", tfidf_candidates=n, query_rank=1)
    assert np.all(np.isfinite(scores).sum(axis=1) == n)
    assert summary["num_scored_pairs"] == n * scores.shape[0]
    rows = [json.loads(line) for line in (tmp_path / "tfidf" / "top_k.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in jsonl.read_records(config.data.train, "lm_train")]
    for q, row in enumerate(rows):
        for hit in row["top"]:
            assert np.isfinite(scores[q, ids.index(hit["id"])])
    assert summary["token_sum_max_rel_error"] < 1e-3  # the rank-1 scores that were ranked


# ----------------------------------------------------------------------------------------------
# Cache, errors, report
# ----------------------------------------------------------------------------------------------

def test_cache_reused_only_for_the_same_inputs(example, tmp_path):
    work = tmp_path / "run"
    config = _config(example, "sketch_dot")
    first = run_experiment(config, str(work), quiet=True)
    again = run_experiment(_config(example, "sketch_dot"), str(work), quiet=True)
    assert (first["cache"], again["cache"]) == ("built", "reused")
    assert first["cache_key"] == again["cache_key"]
    np.testing.assert_array_equal(np.load(work / "scores.npy"), np.load(work / "scores.npy"))

    # Same config, but the training file's contents changed: a fresh cache folder, never the old index.
    train = tmp_path / "train.jsonl"
    records = jsonl.read_records(config.data.train, "lm_train")
    jsonl.write_records(str(train), records[:-1])
    changed = _config(example, "sketch_dot", **{"data.train": str(train)})
    work2 = tmp_path / "run2"
    run_experiment(_config(example, "sketch_dot", **{"data.train": str(train)}), str(work2), quiet=True)
    jsonl.write_records(str(train), records[:-2])
    third = run_experiment(changed, str(work2), quiet=True)
    assert third["cache"] == "built" and third["num_train"] == len(records) - 2
    assert len(os.listdir(work2 / "cache")) == 2

    # Other settings into the same workdir: refused by the runner, naming the field.
    code = main(["--config", "configs/attribute.py", "--workdir", str(work), "--quiet",
                 f"--config.model.path={config.model.path}", f"--config.data.train={config.data.train}",
                 f"--config.data.queries={config.data.queries}", "--config.method=sketch_cosine",
                 f"--config.sketch.m={SKETCH_M}", "--config.top_k=3", "--config.batch_size=8"])
    assert code == 2


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    good = '{"id": "a", "text": "one two"}\n'
    cases = {
        "missing": (good + '{"id": "b"}\n', r"missing\.jsonl:2: missing field 'text'"),
        "badjson": (good + good.replace("a", "c") + '{"id": "d", "text": "x"\n', r"badjson\.jsonl:3: not valid JSON"),
        "type": ('{"id": 1.5, "text": "x"}\n', r"type\.jsonl:1: field 'id' must be a string or an integer"),
        "duplicate": (good + "\n" + good, r"duplicate\.jsonl:3: duplicate id 'a' \(first on line 1\)"),
        "empty": ("\n\n", r"empty\.jsonl: the file holds no records"),
        "array": ("[1, 2]\n", r"array\.jsonl:1: a record must be a JSON object"),
        "blank": ('{"id": "a", "text": "  "}\n', r"blank\.jsonl:1: field 'text' is empty"),
    }
    for name, (text, message) in cases.items():
        with pytest.raises(jsonl.RecordError, match=message):
            jsonl.read_records(_write(tmp_path / f"{name}.jsonl", text), "lm_train")
    with pytest.raises(jsonl.RecordError, match="completion"):
        jsonl.read_records(_write(tmp_path / "q.jsonl", '{"id": 1, "prompt": "p"}\n'), "lm_query")
    records = jsonl.read_records(_write(tmp_path / "ok.jsonl", good + '{"id": 7, "text": "x", "extra": 1}\n'),
                                 "lm_train")
    assert [r["id"] for r in records] == ["a", 7]


def test_bad_record_through_the_runner_writes_no_summary(example, tmp_path, capsys):
    queries = _write(tmp_path / "queries.jsonl", '{"id": "q", "prompt": "the capital of"}\n')
    work = tmp_path / "run"
    code = main(["--config", "configs/attribute.py", "--workdir", str(work), "--quiet",
                 f"--config.model.path={example / 'model'}", f"--config.data.train={example / 'data/train.jsonl'}",
                 f"--config.data.queries={queries}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "queries.jsonl:1: missing field 'completion'" in err and "Traceback" not in err
    assert not (work / "summary.json").exists() and not (work / "report.html").exists()


def test_config_errors_name_the_field(example):
    config = _config(example, "ekfac")
    config.method = "ekfack"
    with pytest.raises(ValueError, match=r"config.method='ekfack' \(did you mean 'ekfac'\?\)"):
        attribute.validate_config(config)
    config = _config(example, "sketch_dot", query_rank=2)
    with pytest.raises(ValueError, match="config.query_rank=2 applies to method 'ekfac' or 'kfac' only"):
        attribute.validate_config(config)
    config = _config(example, "tracin", **{"tracin.checkpoints": str(example / "model")})
    with pytest.raises(ValueError, match="must be non-empty lists of equal length"):
        attribute.validate_config(config)
    config = _config(example, "ekfac", **{"data.train": str(example / "nope.jsonl")})
    with pytest.raises(ValueError, match=r"config.data.train=.*nope.jsonl.*no such file"):
        attribute.validate_config(config)
    config = _config(example, "ekfac", **{"model.path": str(example / "data")})
    with pytest.raises(ValueError, match="has no config.json"):
        user_model.load(config.model)


def test_report_renders_in_a_browser(ekfac_run, tmp_path):
    chromium = browser.find_browser()
    if chromium is None:
        pytest.skip(f"no Chromium-family browser installed (looked for {list(browser.BROWSERS)}; "
                    "Debian: apt-get install chromium)")
    run_dir, _, summary, _ = ekfac_run
    dom = browser.rendered_dom(str(run_dir / "report.html"), browser=chromium)
    rows = [json.loads(line) for line in (run_dir / "top_k.jsonl").read_text().splitlines()]
    assert dom.count("<h2 id=\"q-") == len(rows) == summary["num_queries"]
    for row in rows:
        top = row["top"][0]
        # The top sequence is shown token by token; its words appear in order in the rendered page.
        cell = dom.split(f'<td class="id">{top["id"]}</td>', 1)[1].split("</tr>", 1)[0]
        words = re.sub(r"<[^>]+>", "", cell)
        assert " ".join(top["text"].split()[:4]) in " ".join(words.split())
        assert 'style="background:rgba(220,40,40' in cell  # coloured tokens
    assert "<svg" in dom  # the heavy-tail figure
    png = browser.screenshot(str(run_dir / "report.html"), str(tmp_path / "report.png"), browser=chromium)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20_000  # a rendered page, not a blank one


# ----------------------------------------------------------------------------------------------
# Other model kinds: a BERT sequence classifier, the project's own transformer
# ----------------------------------------------------------------------------------------------

def test_bert_classifier_from_save_pretrained(tmp_path):
    """A (random, tiny) FlaxBertForSequenceClassification and its WordPiece tokenizer, saved by transformers."""
    import transformers

    folder = tmp_path / "bert"
    folder.mkdir()
    words = ["rivers", "music", "bridges", "cheese", "boats", "tea"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "of", "town", "are", "is", "good", "bad"] + words + \
        [str(i) for i in range(12)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(str(folder))
    hf_config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                        num_labels=2)
    transformers.FlaxBertForSequenceClassification(hf_config, seed=0).save_pretrained(str(folder))
    train = [{"id": i, "text": f"the {words[i % 6]} of town {i} are {'good' if i % 2 else 'bad'}", "label": i % 2}
             for i in range(12)]
    queries = [{"id": "q0", "text": "the rivers are good", "label": 1}, {"id": "q1", "text": "tea is bad", "label": 0}]
    jsonl.write_records(str(tmp_path / "train.jsonl"), train)
    jsonl.write_records(str(tmp_path / "queries.jsonl"), queries)
    config = attribute_config.get_config()
    config.model.update(path=str(folder), task="classification")
    config.data.update(train=str(tmp_path / "train.jsonl"), queries=str(tmp_path / "queries.jsonl"))
    config.update(method="ekfac", top_k=3, batch_size=4)
    summary = run_experiment(config, str(tmp_path / "run"), quiet=True)
    scores = np.load(tmp_path / "run" / "scores.npy")

    user = user_model.load(config.model)
    assert user.model.task == "classification" and user.model_type == "bert"
    t = user_model.encode(user, jsonl.read_records(config.data.train, "classification"), "classification",
                          summary["sequence_length"], config.data.train)
    q = user_model.encode(user, jsonl.read_records(config.data.queries, "classification"), "classification",
                          summary["sequence_length"], config.data.queries)
    assert t.arrays["tokens"][0, 0] == vocab.index("[CLS]")  # the tokenizer's own special tokens
    factors = ekfac.EKFACFactors.load(str(tmp_path / "run" / "cache" / f"ekfac-{summary['cache_key']}"))
    assert sorted(p.rsplit("/", 3)[-3:][1] for p in factors.layers) == ["intermediate", "output"]
    qgrads = ekfac.per_example_layer_grads(user.model.apply, user.params, q.arrays, factors.layers, "classification")
    acts, _ = ekfac.layer_activations(user.model.apply, user.params, t.arrays, factors.layers, "classification")
    _close(scores, np.asarray(ekfac.influence_scores(factors.ihvp(qgrads), acts), np.float64))
    assert summary["token_sum_max_rel_error"] < 1e-3  # G23's split over positions works for classifiers too


def test_project_transformer_from_a_train_lm_run(tmp_path):
    from configs import train_lm as train_lm_config

    config = train_lm_config.get_config("quick")
    config.data.update(num_facts=4, num_distractors=4, num_heldout=0)
    config.train.update(num_steps=20, batch_size=4, checkpoint_every=0, eval_every=0, warmup_steps=2)
    run_experiment(config, str(tmp_path / "lm"), quiet=True)
    corpus = json.loads((tmp_path / "lm" / "corpus.json").read_text())
    jsonl.write_records(str(tmp_path / "train.jsonl"), [{"id": i, "text": d} for i, d in enumerate(corpus["documents"])])
    jsonl.write_records(str(tmp_path / "queries.jsonl"), [
        {"id": i, "prompt": q["prompt"], "completion": " " + q["answer"]} for i, q in enumerate(corpus["queries"])])
    attribute_cfg = attribute_config.get_config()
    attribute_cfg.model.update(kind="project", path=str(tmp_path / "lm"))
    attribute_cfg.data.update(train=str(tmp_path / "train.jsonl"), queries=str(tmp_path / "queries.jsonl"))
    attribute_cfg.update(method="sketch_dot", top_k=2, batch_size=4)
    attribute_cfg.sketch.m = SKETCH_M
    summary = run_experiment(attribute_cfg, str(tmp_path / "run"), quiet=True)
    assert summary["num_train"] == len(corpus["documents"]) and summary["truncated"] == 0
    assert summary["token_sum_max_rel_error"] < 1e-3
    rows = [json.loads(line) for line in (tmp_path / "run" / "top_k.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in rows] == list(range(len(corpus["queries"])))


def test_packaged_minilm_with_a_fitted_head(tmp_path):
    """kind='minilm': the packaged encoder, a linear head fitted to the labels, EK-FAC on its last block."""
    train = [{"id": f"t{i}", "text": text, "label": label} for i, (text, label) in enumerate([
        ("the river flooded the town", "nature"), ("storms and rain all week", "nature"),
        ("the forest is green in spring", "nature"), ("the team won the final match", "sport"),
        ("she ran the marathon in record time", "sport"), ("a goal in the last minute", "sport")])]
    queries = [{"id": "q", "text": "heavy rain over the hills", "label": "nature"}]
    jsonl.write_records(str(tmp_path / "train.jsonl"), train)
    jsonl.write_records(str(tmp_path / "queries.jsonl"), queries)
    config = attribute_config.get_config()
    config.model.update(kind="minilm", task="classification")
    config.data.update(train=str(tmp_path / "train.jsonl"), queries=str(tmp_path / "queries.jsonl"))
    config.update(method="ekfac", top_k=3, batch_size=6, layers=r".*/layer/5/(intermediate|output)/dense")
    summary = run_experiment(config, str(tmp_path / "run"), quiet=True)
    assert summary["probe_train_accuracy"] == 1.0  # six separable sentences
    assert summary["token_sum_max_rel_error"] < 1e-3
    top = json.loads((tmp_path / "run" / "top_k.jsonl").read_text().splitlines()[0])["top"]
    assert top[0]["id"] in ("t0", "t1", "t2")  # a same-label sentence helps the query most


def test_token_pieces_rebuild_the_text_for_byte_level_bpe():
    """The report shows a sequence token by token; with a byte-level BPE (GPT-2's kind of tokenizer,
    spaces inside the tokens) and with a word-level one the pieces must join back into the text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from experiments.attribution_example import hf_word_tokenizer

    texts = ["the capital of kelnixia is zorzorin.", "Ünïcode wörds, spaced  twice and numbers 1234!"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 20, vocab_size=300, min_frequency=1, show_progress=False)
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    word_level = hf_word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "the", "capital", "of", "is", "."])
    for tokenizer, text in ((byte_level, texts[1]), (byte_level, texts[0]), (word_level, "the capital of the capital .")):
        user = user_model.UserModel(None, None, user_model._hf_codec(tokenizer), "gpt2", 64, {}, "")
        ids = np.asarray(tokenizer(text)["input_ids"])
        pieces = attribute._pieces(user, ids, np.ones(len(ids)))
        assert len(pieces) == len(ids)
        assert "".join(pieces) == tokenizer.decode(ids.tolist(), skip_special_tokens=True)
