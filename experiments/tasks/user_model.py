"""A user's own model and JSONL data as the batches and loss functions the attribution code sees.

Model kinds (`config.model.kind`):
* `hf`: a local transformers folder (config.json + `flax_model.msgpack` or PyTorch-layout
  `model.safetensors`, converted to Flax without torch; tokenizer files in the same folder or in
  `config.model.tokenizer`). `task="lm"`: `FlaxAutoModelForCausalLM` (GPT-2, GPT-Neo, GPT-J, OPT,
  Llama, Mistral, ... whatever Flax class transformers ships); `task="classification"`:
  `FlaxAutoModelForSequenceClassification` (BERT, RoBERTa, ... with its trained head, which the
  folder must hold).
* `project`: the workdir of this project's `train_lm` experiment (its config.json, tokenizer.json
  and newest checkpoint): the tiny decoder-only transformer.
* `minilm`: the packaged all-MiniLM-L6-v2 encoder (no path) with a linear head on its mean-pooled
  sentence embeddings, fitted to the training file's labels (`fit_probe`: softmax regression,
  full-batch Adam, L2 1e-4, deterministic); attribution then explains that classifier.

Sequences become right-padded arrays of one length T (`config.data.max_len`, or the longest record
capped at the model's context), so every jitted function compiles once; longer sequences are cut
at T and counted (`truncated` in the summary). LM training sequences: `[bos] + tokens(text)`, loss on
every token after the first. LM queries: `[bos] + tokens(prompt) + tokens(completion)`, loss on the
completion tokens only (Grosse et al. 2023 §5.1: f = −log p(completion | prompt)). Classification:
the tokenizer's own special tokens, label `y`; string labels are mapped through the checkpoint's
`label2id`.

`layer_patterns` resolves `config.layers`: "mlp" (the MLP matrices of every block, per model
family), "all", or a regular expression over module paths (full match, e.g.
'lm/transformer/h/1/mlp/c_(fc|proj)').
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import artifacts
from experiments.common import config_checks as checks
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.tokenizers import WordTokenizer, minilm_dir, pretrained_tokenizer, set_offline

KINDS = ("hf", "project", "minilm")
TASKS = models_lib.TASKS

# The MLP matrices of every transformer block, by transformers `model_type` (Grosse et al. 2023 §3.1
# fit EK-FAC on these). Patterns are full matches over '/'-joined module paths.
MLP_LAYERS = {
    "gpt2": r".*/h/\d+/mlp/(c_fc|c_proj)",
    "gpt_neo": r".*/h/\d+/mlp/(c_fc|c_proj)",
    "gptj": r".*/h/\d+/mlp/(fc_in|fc_out)",
    "opt": r".*/layers/\d+/(fc1|fc2)",
    "llama": r".*/layers/\d+/mlp/(gate_proj|up_proj|down_proj)",
    "mistral": r".*/layers/\d+/mlp/(gate_proj|up_proj|down_proj)",
    "gemma": r".*/layers/\d+/mlp/(gate_proj|up_proj|down_proj)",
    "bert": r".*/layer/\d+/(intermediate|output)/dense",
    "roberta": r".*/layer/\d+/(intermediate|output)/dense",
    "xlm-roberta": r".*/layer/\d+/(intermediate|output)/dense",
    "project": r"(.*/)?block_\d+/mlp_(in|out)",
}
ALL_LAYERS = r".*"


@dataclasses.dataclass
class Codec:
    """Text <-> token ids for one model: `encode(text, special)`, and `decode(ids)` (special tokens
    dropped) for showing sequences token by token."""

    encode: Callable[[str, bool], list[int]]   # (text, with the tokenizer's special tokens) -> ids
    decode: Callable[[list[int]], str]
    bos_id: int | None
    pad_id: int


@dataclasses.dataclass
class UserModel:
    model: models_lib.Model
    params: Any
    codec: Codec
    model_type: str           # transformers model_type, or "project"
    max_positions: int        # the model's context length
    label2id: dict            # classification: label -> class index (empty for LMs)
    source: str               # the folder it was read from


def validate_model_section(model) -> None:
    checks.check_fields("config.model", model, {"kind", "path", "task", "tokenizer"})
    checks.one_of("config.model.kind", model.get("kind"), KINDS)
    checks.one_of("config.model.task", model.get("task", "lm"), TASKS)
    if model.get("kind") == "minilm":
        if model.get("task", "lm") != "classification":
            raise ValueError("config.model.task must be 'classification' for kind='minilm' (an encoder with a "
                             "linear head fitted to the training labels)")
        return
    path = model.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("config.model.path is empty; give the folder of a transformers checkpoint "
                         "(kind='hf') or of a train_lm run (kind='project')")
    if not os.path.isdir(path):
        raise ValueError(f"config.model.path={path!r} is not a folder")
    if model.get("kind") == "project" and model.get("task", "lm") != "lm":
        raise ValueError("config.model.task must be 'lm' for kind='project' (the project's transformer is a language model)")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _hf_codec(tokenizer) -> Codec:
    bos = tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def encode(text: str, special: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    return Codec(encode=encode, decode=decode, bos_id=bos, pad_id=int(pad))


def _word_codec(tokenizer: WordTokenizer) -> Codec:
    def encode(text: str, special: bool) -> list[int]:
        return tokenizer.encode(text, bos=False, eos=False)

    return Codec(encode=encode, decode=tokenizer.decode, bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)


def _load_hf(path: str, task: str, tokenizer_path: str | None) -> UserModel:
    set_offline()
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"config.model.path={path!r} has no config.json (not a transformers checkpoint folder)")
    if os.path.isfile(os.path.join(path, "flax_model.msgpack")):
        from_pt = False
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        from_pt = True
    else:
        raise ValueError(f"config.model.path={path!r} has neither flax_model.msgpack nor model.safetensors "
                         "(PyTorch .bin pickles are not read; convert them to safetensors)")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type", "")
    pad_token_id = hf_config.get("pad_token_id") or 0
    tokenizer_folder = tokenizer_path or path
    try:
        tokenizer = pretrained_tokenizer(tokenizer_folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"no tokenizer could be read from {tokenizer_folder!r} ({error}); save the tokenizer "
                         "there with `tokenizer.save_pretrained(folder)` or set config.model.tokenizer") from None
    if task == "lm":
        hf, weights = models_lib.hf_from_pretrained(transformers.FlaxAutoModelForCausalLM, path, from_pt)
        module = models_lib.CausalLMWrapper(lm=hf.module, model_type=model_type, pad_token_id=pad_token_id)
        params, label2id = {"lm": weights}, {}
    else:
        heads = [a for a in hf_config.get("architectures") or [] if a.endswith("ForSequenceClassification")]
        if not heads:
            raise ValueError(f"config.model.path={path!r} holds a {hf_config.get('architectures')} checkpoint without "
                             "a sequence-classification head; attribution needs the trained classifier "
                             "(save it with `model.save_pretrained(folder)` after fine-tuning)")
        hf, weights = models_lib.hf_from_pretrained(transformers.FlaxAutoModelForSequenceClassification, path, from_pt)
        module = models_lib.SequenceClassifierWrapper(classifier=hf.module, model_type=model_type,
                                                      pad_token_id=pad_token_id)
        params = {"classifier": weights}
        label2id = {str(k): int(v) for k, v in (hf.config.label2id or {}).items()}
    max_positions = int(hf_config.get("n_positions") or hf_config.get("max_position_embeddings") or 512)
    model = models_lib.Model(name=f"hf:{model_type}", task=task, module=module)
    return UserModel(model, params, _hf_codec(tokenizer), model_type, max_positions, label2id, os.path.abspath(path))


def _load_project(path: str) -> UserModel:
    """The newest checkpoint of a `train_lm` run folder (config.json, tokenizer.json, checkpoints/)."""
    for name in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"config.model.path={path!r} has no {name}; kind='project' reads the workdir of a "
                             "`train_lm` run (python -m experiments.run --config configs/train_lm.py --workdir DIR)")
    run_config = artifacts.read_json(os.path.join(path, "config.json"))
    tokenizer = WordTokenizer.load(os.path.join(path, "tokenizer.json"))
    checkpoints = train_lib.list_checkpoints(os.path.join(path, "checkpoints"))
    if not checkpoints:
        raise ValueError(f"config.model.path={path!r} has no checkpoint under checkpoints/ (the run never finished a step)")
    options = {k: v for k, v in run_config["model"].items() if k != "name"}
    max_len = int(run_config["max_len"])
    example = {"tokens": np.zeros((1, max_len), np.int32), "mask": np.ones((1, max_len), np.float32)}
    model, template = models_lib.build_model("transformer", jax.random.key(0), example,
                                             vocab_size=tokenizer.vocab_size, max_len=max_len, **options)
    import ml_collections

    optimizer = train_lib.optimizer_from_config(ml_collections.ConfigDict(run_config["train"]))
    _, params, _ = train_lib.restore_checkpoint(checkpoints[-1][1], template, optimizer.init(template))
    return UserModel(model, params, _word_codec(tokenizer), "project", max_len, {}, os.path.abspath(path))


def _load_minilm(labels: list) -> UserModel:
    """all-MiniLM-L6-v2 + a head with one class per distinct training label (fitted by `fit_probe`)."""
    if not labels:
        raise ValueError("kind='minilm' needs the training labels to size and fit its head")
    if all(isinstance(v, int) for v in labels):
        label2id = {str(c): c for c in range(max(labels) + 1)}
    elif all(isinstance(v, str) for v in labels):
        label2id = {name: c for c, name in enumerate(sorted(set(labels)))}
    else:
        raise ValueError("kind='minilm': the training labels mix integers and strings; use one kind")
    path = minilm_dir()
    model, params = models_lib.load_pretrained(path, "classification", jax.random.key(0), num_classes=len(label2id))
    tokenizer = pretrained_tokenizer(path)
    return UserModel(model, params, _hf_codec(tokenizer), "bert", 512, label2id, path)


def load(model_section, train_labels: list | None = None) -> UserModel:
    """The model of `config.model` (see the module docstring); `train_labels` size minilm's head."""
    validate_model_section(model_section)
    kind, task = model_section["kind"], model_section.get("task", "lm")
    if kind == "hf":
        return _load_hf(model_section["path"], task, model_section.get("tokenizer") or None)
    if kind == "minilm":
        return _load_minilm(list(train_labels or []))
    return _load_project(model_section["path"])


def fit_probe(user: UserModel, arrays: dict, batch_size: int, steps: int = 500) -> float:
    """Fits the head of a minilm model (in place) by softmax regression on the frozen mean-pooled
    embeddings of `arrays`: full-batch Adam (lr 0.05), loss CE + 1e-4 ‖W‖². Returns the train accuracy."""
    embed = jax.jit(lambda p, b: user.model.apply(p, b, method="embed"))
    rows = len(arrays["y"])
    features = np.concatenate([np.asarray(embed(user.params, {k: v[i: i + batch_size] for k, v in arrays.items()}))
                               for i in range(0, rows, batch_size)])
    x, y = jnp.asarray(features), jnp.asarray(arrays["y"])
    head = user.params["head"]
    optimizer = optax.adam(0.05)

    def loss(h):
        logits = x @ h["kernel"] + h["bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)) + 1e-4 * jnp.sum(h["kernel"] ** 2)

    @jax.jit
    def fit(h):
        def step(carry, _):
            h, state = carry
            grads = jax.grad(loss)(h)
            updates, state = optimizer.update(grads, state, h)
            return (optax.apply_updates(h, updates), state), None
        (h, _), _ = jax.lax.scan(step, (h, optimizer.init(h)), None, length=steps)
        return h

    head = fit(head)
    user.params = {**user.params, "head": head}
    return float(jnp.mean(jnp.argmax(x @ head["kernel"] + head["bias"], axis=1) == y))


def layer_patterns(layers, model_type: str) -> tuple[str, ...]:
    """config.layers -> regular expressions over module paths."""
    if layers == "mlp":
        if model_type not in MLP_LAYERS:
            raise ValueError(f"config.layers='mlp' is not known for model_type {model_type!r} (known: "
                             f"{sorted(MLP_LAYERS)}); give a list of regular expressions over module paths instead")
        return (MLP_LAYERS[model_type],)
    if layers == "all":
        return (ALL_LAYERS,)
    if not isinstance(layers, str) or not layers:
        raise ValueError(f"config.layers={layers!r}; allowed values: 'mlp', 'all', or a regular expression "
                         "over module paths")
    try:
        re.compile(layers)
    except re.error as error:
        raise ValueError(f"config.layers={layers!r} is not a valid regular expression: {error}") from None
    return (layers,)


# ----------------------------------------------------------------------------------------------
# Records -> arrays
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Encoded:
    arrays: dict               # tokens, mask, loss_mask (lm) or y (classification), leading axis N
    ids: list                  # record ids
    texts: list[str]           # what the report shows (training text, or prompt + completion)
    truncated: int             # records cut at T


def _lm_ids(codec: Codec, record: dict, query: bool) -> tuple[list[int], int]:
    """(ids, index of the first token that carries loss)."""
    head = [codec.bos_id] if codec.bos_id is not None else []
    if not query:
        ids = codec.encode(record["text"], False)
        if head and ids and ids[0] == head[0]:
            head = []
        return head + ids, 1
    prompt = head + codec.encode(record["prompt"], False)
    return prompt + codec.encode(record["completion"], False), len(prompt)


def sequence_length(user: UserModel, record_lists: list[tuple[list[dict], str]], max_len: int) -> int:
    """T: `max_len` if positive, else the longest encoded record; never above the model's context."""
    if max_len:
        return min(int(max_len), user.max_positions)
    longest = 1
    for records, kind in record_lists:
        for r in records:
            longest = max(longest, len(_encode_one(user, r, kind)[0]))
    return min(longest, user.max_positions)


def _encode_one(user: UserModel, record: dict, kind: str) -> tuple[list[int], int]:
    if kind == "classification":
        return user.codec.encode(record["text"], True), 0
    return _lm_ids(user.codec, record, query=kind == "lm_query")


def encode(user: UserModel, records: list[dict], kind: str, length: int, path: str) -> Encoded:
    """Right-padded arrays of `records` (kind: 'lm_train', 'lm_query' or 'classification')."""
    n = len(records)
    tokens = np.full((n, length), user.codec.pad_id, np.int32)
    mask = np.zeros((n, length), np.float32)
    loss_mask = np.zeros((n, length), np.float32)
    labels = np.zeros(n, np.int32)
    truncated = 0
    for row, record in enumerate(records):
        ids, first_loss = _encode_one(user, record, kind)
        if len(ids) > length:
            truncated += 1
            ids = ids[:length]
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1.0
        loss_mask[row, first_loss: len(ids)] = 1.0
        if kind == "lm_query" and first_loss >= len(ids):
            raise ValueError(f"{path}: record id {record['id']!r}: its completion starts after token {length} "
                             f"(config.data.max_len); raise max_len or shorten the prompt")
        if kind == "classification":
            labels[row] = _label_index(user, record["label"], path, record["id"])
    if kind == "classification":
        arrays = {"tokens": tokens, "mask": mask, "y": labels}
    else:
        arrays = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
    texts = [r["text"] if kind != "lm_query" else r["prompt"] + r["completion"] for r in records]
    return Encoded(arrays, [r["id"] for r in records], texts, truncated)


def _label_index(user: UserModel, label, path: str, record_id) -> int:
    num_classes = len(user.label2id) or None
    if isinstance(label, str):
        if label not in user.label2id:
            raise ValueError(f"{path}: record id {record_id!r}: label {label!r} is not one of the model's labels "
                             f"{sorted(user.label2id)}")
        return user.label2id[label]
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"{path}: record id {record_id!r}: label {label} outside [0, {num_classes})")
    return int(label)


def token_losses_fn(user: UserModel) -> Callable[[Any, dict], jax.Array]:
    """(params, one example's arrays without the batch axis) -> (T,) per-token losses whose sum is the
    example's loss: position t holds −log p(tokens[t] | tokens[<t]) · loss_mask[t] (0 at t = 0)."""
    def token_losses(params, example):
        batch = jax.tree_util.tree_map(lambda a: a[None], example)
        logits = user.model.apply(params, batch)[0, :-1].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, example["tokens"][1:])
        return jnp.concatenate([jnp.zeros(1, ce.dtype), ce * example["loss_mask"][1:]])

    return token_losses
