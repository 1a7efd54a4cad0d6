"""Task: a classifier on the generated C-class text set (all-MiniLM-L6-v2 + head by default, or a
local transformers checkpoint, or the tiny transformer), or logreg / MLP / CNN on scikit-learn's digits.

`prepare(config)` builds data, model, optimizer, batches and the evaluation of a
finetune_classifier-style config; used by the experiments `finetune_classifier`, `hessian_spectrum`
and `intrinsic_dimension`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.tokenizers import WordTokenizer, minilm_tokenizer, pretrained_tokenizer
from experiments.common.workdir import Workdir

DATASETS = ("text", "digits")
_MODELS_FOR = {"text": ("minilm", "pretrained", "transformer"), "digits": ("logreg", "mlp", "cnn")}
_DATA_FIELDS = {"name", "num_classes", "num_train", "num_test", "topic_prob", "test_fraction"}


def validate_config(config) -> None:
    checks.require_sections(config, ("data", "model", "train"))
    checks.check_fields("config.data", config.data, _DATA_FIELDS)
    checks.one_of("config.data.name", config.data.name, DATASETS)
    checks.one_of("config.model.name", config.model.name, _MODELS_FOR[config.data.name],
                  context=f" with config.data.name={config.data.name!r}")
    options = _model_options(config, vocab_size=1)
    models_lib.validate_model_config(config.model.name, options)
    if config.model.name == "pretrained" and options["task"] != "classification":
        raise ValueError("config.model.task must be 'classification' for finetune_classifier")
    train_lib.validate_train_section(config, min_max_len=4)


def _num_classes(config) -> int:
    return 10 if config.data.name == "digits" else config.data.num_classes


def _model_options(config, vocab_size: int) -> dict:
    options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    options["num_classes"] = _num_classes(config)
    if config.model.name == "transformer":
        options.update(vocab_size=vocab_size, max_len=config.max_len)
    return options


def _text_arrays(config, splits: dict) -> tuple[dict, dict, int]:
    """Tokenised train/test arrays {"tokens", "mask", "y"} and the vocabulary size."""
    name = config.model.name
    if name == "transformer":
        tokenizer = WordTokenizer.fit(splits["train"]["texts"])

        def encode(texts):
            return tokenizer.encode_batch(texts, config.max_len)
        vocab_size = tokenizer.vocab_size
    else:
        tokenizer = minilm_tokenizer() if name == "minilm" else pretrained_tokenizer(config.model.path)

        def encode(texts):
            enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=config.max_len,
                            return_tensors="np")
            return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.float32)
        vocab_size = tokenizer.vocab_size
    out = []
    for split in ("train", "test"):
        tokens, mask = encode(splits[split]["texts"])
        out.append({"tokens": tokens, "mask": mask, "y": splits[split]["labels"]})
    return out[0], out[1], vocab_size


def _keep_classes(arrays: dict, num_classes: int) -> dict:
    return data_lib.take(arrays, np.flatnonzero(np.asarray(arrays["y"]) < num_classes))


@dataclasses.dataclass
class Setup:
    """Everything a classifier experiment needs: model, initial params, data, optimizer and batches."""

    model: models_lib.Model
    params: Any
    train_arrays: dict
    test_arrays: dict
    optimizer: Any
    batch_at: Callable[[int], dict]
    evaluate: Callable[[Any], dict]


def prepare(config, num_classes: int | None = None) -> Setup:
    """Builds the data, model and optimizer of a finetune_classifier-style config. `num_classes`
    overrides the class count: the text set is generated with that many classes, digits keeps the
    classes 0..num_classes−1 (the class-count sweeps of experiments/hessian_spectrum.py)."""
    d = config.data
    classes = _num_classes(config) if num_classes is None else num_classes
    if d.name == "text":
        splits = data_lib.make_text_classification(config.seed, classes, d.num_train, d.num_test, d.topic_prob)
        train_arrays, test_arrays, vocab_size = _text_arrays(config, splits)
    else:
        splits = data_lib.load_digits(config.seed, d.test_fraction)
        train_arrays, test_arrays, vocab_size = splits["train"], splits["test"], 1
        train_arrays, test_arrays = _keep_classes(train_arrays, classes), _keep_classes(test_arrays, classes)
    options = _model_options(config, vocab_size)
    options["num_classes"] = classes
    model, params = models_lib.build_model(
        config.model.name, jax.random.key(config.seed), data_lib.take(train_arrays, np.arange(1)), **options)
    losses = models_lib.make_loss_fns(model)
    t = config.train
    optimizer = train_lib.optimizer_from_config(t)
    batch_at = train_lib.batch_fn(train_arrays, t.batch_size, config.seed)

    eval_loss = jax.jit(losses.loss_fn)
    correct = jax.jit(functools.partial(models_lib.per_example_correct, model))

    def evaluate(p) -> dict:
        return {"test_loss": float(eval_loss(p, test_arrays)),
                "test_accuracy": float(jnp.mean(correct(p, test_arrays)))}

    return Setup(model, params, train_arrays, test_arrays, optimizer, batch_at, evaluate)
