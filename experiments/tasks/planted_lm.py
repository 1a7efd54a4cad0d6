"""Task: the tiny decoder-only transformer trained on the planted-facts corpus.

Used by the experiments `train_lm`, `demo`, `influence_llm` and `tda_benchmark`. `train_model` writes `corpus.json` (documents, which fact each plants, queries with their planting documents),
`tokenizer.json`, checkpoints under `checkpoints/` (a rerun resumes from the newest) and reports
`query_accuracy` (greedy next word after each planted fact's prompt is its answer),
`heldout_query_accuracy` (facts never written: ≈ 0 unless the model guesses) and the final loss.
`train_on_subset` is the retraining of counterfactual evaluations (LDS, leave-one-out) on a subset's own
batches; `weighted_trainer` retrains several models at once with per-document loss weights and the full
run's batch order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.tokenizers import WordTokenizer
from experiments.common.workdir import Workdir, atomic_write_json

_DATA_FIELDS = {"num_facts", "docs_per_fact", "num_distractors", "num_heldout", "num_subjects",
                "filler_min", "filler_max", "order", "canonical_first"}


def validate_config(config) -> None:
    """ValueError naming the field for anything the run would reject later (checked before any work)."""
    checks.require_sections(config, ("data", "model", "train"))
    checks.check_fields("config.data", config.data, _DATA_FIELDS)
    checks.one_of("config.data.order", config.data.order, data_lib.ORDERS)
    model = config.model.to_dict()
    checks.one_of("config.model.name", model.get("name"), ["transformer"])
    model.pop("name")
    for derived in ("vocab_size", "max_len"):
        if derived in model:
            raise ValueError(f"config.model.{derived} is derived (tokenizer vocabulary / config.max_len); remove it")
    models_lib.validate_model_config("transformer", {**model, "vocab_size": 1, "max_len": 1})
    if model.get("num_classes", 0):
        raise ValueError("config.model.num_classes must be 0 (a language model) for planted facts")
    train_lib.validate_train_section(config, min_max_len=8)


@dataclasses.dataclass
class Setup:
    corpus: data_lib.PlantedFacts
    tokenizer: WordTokenizer
    train: dict      # LM arrays of the training documents
    queries: dict    # LM arrays of the planted facts' queries (loss on the answer only)
    heldout: dict    # the same for the held-out facts
    model: models_lib.Model
    params: Any      # initial parameters


def setup(config) -> Setup:
    d = config.data
    corpus = data_lib.make_planted_facts(
        seed=config.seed, num_facts=d.num_facts, docs_per_fact=d.docs_per_fact,
        num_distractors=d.num_distractors, num_heldout=d.num_heldout, num_subjects=d.num_subjects,
        filler_sentences=(d.filler_min, d.filler_max), order=d.order, canonical_first=d.canonical_first,
    )
    all_queries = corpus.queries + corpus.heldout_queries
    tokenizer = WordTokenizer.fit(list(corpus.documents) + [f"{q.prompt} {q.answer}" for q in all_queries])
    train_arrays = data_lib.lm_arrays(*tokenizer.encode_batch(corpus.documents, config.max_len))
    queries = data_lib.query_arrays(tokenizer, corpus.queries, config.max_len)
    heldout = data_lib.query_arrays(tokenizer, corpus.heldout_queries, config.max_len)
    options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    model, params = models_lib.build_model(
        "transformer", jax.random.key(config.seed), data_lib.take(train_arrays, np.arange(1)),
        vocab_size=tokenizer.vocab_size, max_len=config.max_len, **options,
    )
    return Setup(corpus, tokenizer, train_arrays, queries, heldout, model, params)


def accuracy_fn(model: models_lib.Model):
    """jitted (params, arrays) -> fraction of examples answered correctly (nan for no examples)."""
    correct = jax.jit(functools.partial(models_lib.per_example_correct, model))

    def accuracy(params, arrays: dict) -> float:
        if len(arrays["tokens"]) == 0:
            return float("nan")
        return float(jnp.mean(correct(params, arrays)))

    return accuracy


def write_corpus(path: str, corpus: data_lib.PlantedFacts) -> None:
    atomic_write_json(path, {
        "order": corpus.order,
        "documents": list(corpus.documents),
        "doc_fact": list(corpus.doc_fact),
        "facts": [dataclasses.asdict(f) for f in corpus.facts],
        "queries": [dataclasses.asdict(q) for q in corpus.queries],
        "heldout_queries": [dataclasses.asdict(q) for q in corpus.heldout_queries],
    })


def train_model(config, workdir: Workdir, s: Setup) -> train_lib.TrainResult:
    """Trains (or resumes) the LM of `s` with config.train; checkpoints in the workdir."""
    t = config.train
    loss_fn = models_lib.make_loss_fns(s.model).loss_fn
    num_docs = len(s.corpus.documents)
    if t.batch_size > num_docs:
        raise ValueError(f"config.train.batch_size={t.batch_size} > {num_docs} training documents")
    batch_at = train_lib.batch_fn(s.train, t.batch_size, config.seed)
    eval_loss = jax.jit(loss_fn)
    accuracy = accuracy_fn(s.model)

    def evaluate(params) -> dict:
        return {"loss": float(eval_loss(params, s.train)),
                "query_accuracy": accuracy(params, s.queries),
                "heldout_query_accuracy": accuracy(params, s.heldout)}

    s.tokenizer.save(workdir.file("tokenizer.json"))
    write_corpus(workdir.file("corpus.json"), s.corpus)
    return train_lib.train(
        loss_fn, s.params, train_lib.optimizer_from_config(config.train), batch_at, t.num_steps, workdir=workdir,
        checkpoint_every=t.checkpoint_every, eval_fn=evaluate, eval_every=t.eval_every,
        log_every=t.log_every, quiet=config.get("quiet", False), description="train LM",
    )


def setup_and_train(config, folder: Workdir, *, quiet: bool = False) -> tuple[Setup, train_lib.TrainResult]:
    """The task of `config` built and trained (or resumed) with its checkpoints in `folder`; `quiet`
    silences the progress bar (the experiment's own --quiet)."""
    with config.unlocked():
        config.quiet = bool(quiet)
    s = setup(config)
    return s, train_model(config, folder, s)


def train_on_subset(config, s: Setup, indices: np.ndarray) -> Any:
    """Parameters after training from `s.params` on the documents `indices` only (in memory, quiet):
    the same optimiser and number of steps, batches drawn from the subset (batch size capped at its
    size). The retraining of LDS / counterfactual evaluations (attribution/retrain.py caches results)."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-D array of document indices, got shape {indices.shape}")
    loss_fn = models_lib.make_loss_fns(s.model).loss_fn
    batch_at = train_lib.batch_fn(data_lib.take(s.train, indices), min(config.train.batch_size, len(indices)),
                                  config.seed)
    return train_lib.train(loss_fn, s.params, train_lib.optimizer_from_config(config.train), batch_at, config.train.num_steps,
                           log_every=0, quiet=True).params


def weighted_trainer(config, s: Setup) -> Callable[[np.ndarray], Any]:
    """`train(weights)`: the parameters of K models trained from `s.params`, stacked along a leading K
    axis, where model k multiplies document j's loss by weights[k, j] (weights (K, N), e.g. 0/1 masks).

    Everything else is the full run of `train_model`: the same optimiser and number of steps and the
    same batches in the same order (`data.batch_indices(N, B, step, seed)`); step t minimises
    (1/B) Σ_{j ∈ batch t} w_j L_j. With w = 1 this is the full run; with a zero at j it is the run
    without document j's gradient contributions and with every other batch unchanged (common random
    numbers: the only difference between two such runs is the documents they weight differently, so a
    leave-one-out effect is not drowned by a reshuffled batch order, as it is with `train_on_subset`).
    The K runs are one compiled, vmapped `lax.scan` (compiled once per K)."""
    num_docs = len(s.corpus.documents)
    t = config.train
    batch_size = min(t.batch_size, num_docs)
    steps = np.stack([data_lib.batch_indices(num_docs, batch_size, step, config.seed) for step in range(t.num_steps)])
    per_example_loss = models_lib.make_loss_fns(s.model).per_example_loss
    optimizer = train_lib.optimizer_from_config(t)
    documents = jax.tree_util.tree_map(jnp.asarray, s.train)

    def one_run(w):
        def step(carry, indices):
            params, state = carry
            batch = data_lib.take(documents, indices)
            grads = jax.grad(lambda p: jnp.mean(w[indices] * per_example_loss(p, batch)))(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (s.params, optimizer.init(s.params)), jnp.asarray(steps))
        return params

    runs = jax.jit(jax.vmap(one_run))

    def train(weights: np.ndarray) -> Any:
        weights = np.asarray(weights, np.float32)
        if weights.ndim != 2 or weights.shape[1] != num_docs:
            raise ValueError(f"weights must be (K, {num_docs}) (one weight per training document), got {weights.shape}")
        if not np.all(np.isfinite(weights)) or weights.min() < 0:
            raise ValueError("weights must be finite and >= 0")
        return runs(jnp.asarray(weights))

    return train
