"""Experiment `attribution_example`: the files a user brings to `attribute`, made from planted facts.

    python -m experiments.run --config configs/attribution_example.py --workdir runs/example

1. The planted-facts corpus (experiments/common/data.py: each fact "the capital of X is Y" is stated
   in `docs_per_fact` documents among filler sentences and distractor documents) is written as JSON
   Lines: `data/train.jsonl` with {"id": "doc-00017", "text": ...}, `data/queries.jsonl` with
   {"id": "fact-003", "prompt": "the capital of X is", "completion": " Y"}, and `data/planted.json`
   mapping each query id to the ids of the documents that state its fact (the ground truth).
2. A word-level tokenizer fitted on the corpus is saved as a transformers tokenizer
   (`PreTrainedTokenizerFast`, tokenizer.json), and a tiny GPT-2 (`FlaxGPT2LMHeadModel`, `n_layer`,
   `n_embd`, `n_head`, context `max_len`) is trained from scratch on the documents with
   `experiments/common/train.py` (next-token loss, resumable checkpoints), then saved with
   `save_pretrained` in `model/`; `tracin_checkpoints` earlier states are saved in
   `checkpoints/step_XXXXXX/` with `checkpoints.json` listing them and the learning rate at each.
Reports `query_accuracy` (the greedy next token after each prompt is its completion).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import jsonl
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.tokenizers import PAD, BOS, EOS, UNK, WordTokenizer, set_offline
from experiments.common.workdir import Workdir, atomic_write_json


def validate_config(config) -> None:
    checks.require_sections(config, ("data", "model", "train"))
    checks.check_fields("config.data", config.data, {"num_facts", "docs_per_fact", "num_distractors", "num_heldout"})
    checks.check_fields("config.model", config.model, {"n_layer", "n_embd", "n_head"})
    for name in ("n_layer", "n_embd", "n_head"):
        checks.integer(f"config.model.{name}", config.model[name])
    if config.model.n_embd % config.model.n_head:
        raise ValueError(f"config.model.n_embd={config.model.n_embd} must be a multiple of n_head={config.model.n_head}")
    checks.integer("config.tracin_checkpoints", config.tracin_checkpoints, low=0)
    train_lib.validate_train_section(config, min_max_len=8)


def hf_word_tokenizer(vocab: list[str]):
    """A transformers fast tokenizer over a fixed word vocabulary: lower-cased, split into words and
    single punctuation marks (the split of experiments.common.tokenizers.WordTokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def _write_data(wd: Workdir, corpus) -> None:
    os.makedirs(wd.file("data"), exist_ok=True)
    doc_ids = [f"doc-{i:05d}" for i in range(len(corpus.documents))]
    jsonl.write_records(wd.file("data/train.jsonl"), [{"id": d, "text": t} for d, t in zip(doc_ids, corpus.documents)])
    queries = [{"id": f"fact-{q.fact:03d}", "prompt": q.prompt, "completion": f" {q.answer}"} for q in corpus.queries]
    jsonl.write_records(wd.file("data/queries.jsonl"), queries)
    atomic_write_json(wd.file("data/planted.json"), {
        r["id"]: [doc_ids[d] for d in q.documents] for r, q in zip(queries, corpus.queries)})


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    set_offline()
    import transformers

    d = config.data
    corpus = data_lib.make_planted_facts(seed=config.seed, num_facts=d.num_facts, docs_per_fact=d.docs_per_fact,
                                         num_distractors=d.num_distractors, num_heldout=d.num_heldout)
    _write_data(workdir, corpus)
    words = WordTokenizer.fit(list(corpus.documents) + [f"{q.prompt} {q.answer}" for q in corpus.queries])
    tokenizer = hf_word_tokenizer(words.vocab)
    hf_config = transformers.GPT2Config(
        vocab_size=words.vocab_size, n_positions=config.max_len, n_embd=config.model.n_embd,
        n_layer=config.model.n_layer, n_head=config.model.n_head, bos_token_id=words.bos_id,
        eos_token_id=words.eos_id, pad_token_id=words.pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.FlaxGPT2LMHeadModel(hf_config, seed=config.seed)
    model = models_lib.Model(name="hf:gpt2", task="lm", module=models_lib.CausalLMWrapper(
        lm=hf.module, model_type="gpt2", pad_token_id=words.pad_id))

    def encode(texts, loss_from_answer=False):
        ids = [[words.bos_id] + list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        tokens = np.full((len(ids), config.max_len), words.pad_id, np.int32)
        mask = np.zeros_like(tokens, np.float32)
        for row, seq in enumerate(ids):
            if len(seq) > config.max_len:
                raise ValueError(f"a document has {len(seq)} tokens > config.max_len={config.max_len}")
            tokens[row, :len(seq)], mask[row, :len(seq)] = seq, 1.0
        return tokens, mask

    train_arrays = data_lib.lm_arrays(*encode(corpus.documents))
    q_tokens, q_mask = encode([f"{q.prompt} {q.answer}" for q in corpus.queries])
    q_loss = np.zeros_like(q_mask)
    q_loss[np.arange(len(q_mask)), q_mask.sum(1).astype(int) - 1] = 1.0
    queries = {"tokens": q_tokens, "mask": q_mask, "loss_mask": q_loss}
    accuracy = jax.jit(lambda p: models_lib.per_example_correct(model, p, queries).mean())

    t = config.train
    optimizer = train_lib.optimizer_from_config(t)
    loss_fn = models_lib.make_loss_fns(model).loss_fn
    batch_at = train_lib.batch_fn(train_arrays, t.batch_size, config.seed)
    params = {"lm": hf.params}
    stops = [int(round(t.num_steps * (i + 1) / (config.tracin_checkpoints + 1)))
             for i in range(config.tracin_checkpoints)] + [t.num_steps]
    saved = []
    for stop in stops:  # train() resumes from the workdir's checkpoint: the same run as one call
        result = train_lib.train(loss_fn, params, optimizer, batch_at, stop, workdir=workdir,
                                 checkpoint_every=t.checkpoint_every, log_every=t.log_every,
                                 quiet=config.get("quiet", False), description=f"train GPT-2 to step {stop}")
        folder = workdir.file("model") if stop == t.num_steps else workdir.file(f"checkpoints/step_{stop:06d}")
        hf.params = jax.device_get(result.params["lm"])
        hf.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if stop != t.num_steps:
            saved.append({"path": os.path.relpath(folder, workdir.path), "step": stop,
                          "learning_rate": train_lib.learning_rate_at(t, stop)})
    atomic_write_json(workdir.file("checkpoints.json"), saved)
    acc = float(accuracy(result.params))
    return {"query_accuracy": acc, "num_documents": len(corpus.documents), "num_queries": len(corpus.queries),
            "num_params": models_lib.count_params(result.params), "final_loss": result.final_loss}
