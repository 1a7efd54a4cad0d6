"""Experiment `attribute`: which of your training sequences drive your model's answers.

    python -m experiments.run --config configs/attribute.py --workdir runs/a \\
        --config.model.path=MODEL_DIR --config.data.train=train.jsonl \\
        --config.data.queries=queries.jsonl --config.method=ekfac

Inputs: a model (experiments/tasks/user_model.py: a local transformers folder, a `train_lm` run, or
the packaged all-MiniLM-L6-v2 with a linear head fitted to the training labels)
and JSON Lines files (experiments/common/jsonl.py): training sequences {"id", "text"} and queries
{"id", "prompt", "completion"} for a causal LM (query loss on the completion tokens only), or
{"id", "text", "label"} for a sequence classifier. `config.layers` chooses the parameters: "mlp" (the
MLP matrices of every block), "all", or a regular expression over module paths.

Methods (`config.method`), with q the query's loss gradient and g_i the i-th training sequence's,
over the chosen parameters:
* `ekfac` / `kfac`: I(q, i) = ⟨(Ĝ + λI)⁻¹ ∇f_q, ∇L_i⟩ with the EK-FAC / K-FAC Gauss–Newton of the
  chosen linear layers (Grosse et al. 2023 eq. 30–31; attribution/ekfac.py), optionally with rank-k
  query batching (`query_rank`, G23 §3.2.2; attribution/query_batching.py);
* `sketch_dot` / `sketch_cosine`: ⟨Φq, Φg_i⟩ and its cosine, Φ = `config.sketch` (any of
  `sketching.names()`), from an on-disk gradient index (attribution/index.py) and streaming top-k;
* `trak`: single-model TRAK, φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_i over the sketched gradients φ = Φg
  (Park et al. 2023 eq. 11 without the ensemble), λ = `trak.ridge` · tr(ΦᵀΦ)/m;
* `logra`: the same preconditioned score with LoGra's per-layer Kronecker projection
  (Choe et al. 2024; sketching/logra.py) in place of Φ;
* `tracin`: TracIn-CP, Σ_c η_c ⟨Φq_c, Φg_{i,c}⟩ over the checkpoints `tracin.checkpoints` with learning
  rates `tracin.learning_rates` (both comma-separated; Pruthi et al. 2020 eq. 3), one index whose rows concatenate
  √η_c Φg_{i,c}.
`tfidf_candidates = N > 0` scores each query only against its N best BM25 training sequences
(G23 §3.2.1; attribution/tfidf.py); other pairs are NaN in scores.npy.

Per-token influence of each top sequence: EK-FAC / K-FAC split the score over the positions of the
layer inputs, rowsum((X̃ P_q) ⊙ Δ) (G23 §5.2, `ekfac.token_influence`); the gradient methods split
it over the per-token losses, ⟨v_q, ∇ℓ_{i,t}⟩ with v_q the score's direction in parameter space
(Φᵀφ_q, Φᵀ(ΦᵀΦ + λI)⁻¹φ_q, ...), one JVP per (query, sequence). Either way the contributions sum
to the score. Classification with a gradient method has no per-token losses: no colouring.

Scores are kept as a Q × N matrix when it fits in `scores_max_mb`. Beyond that the gradient methods
retrieve each query's top k by streaming the index (`attribution.index.top_k`: memory of one tile,
any N), and EK-FAC / K-FAC ask for TF-IDF candidates.

Outputs in the workdir: `scores.npy` (Q × N float32, when it fits in `scores_max_mb`), `top_k.jsonl`
(per query: its id and the ranked training ids, scores and texts), `report.html` (per query the
top-k sequences with tokens coloured by their contribution, the heavy-tail curve, the settings),
`heavy_tail.png`, and `cache/`: the gradient index or the EK-FAC factors, in a folder named by the
digest of everything they depend on (model weights, training file bytes, sequence length, layers,
method options), so a rerun with the same inputs reuses them and any change builds afresh.
"""
from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm.auto import tqdm

matplotlib.use("Agg")

import artifacts  # noqa: E402
import sketching  # noqa: E402
from attribution import ekfac  # noqa: E402
from attribution import index as index_lib  # noqa: E402
from attribution import query_batching as qb  # noqa: E402
from attribution import tfidf  # noqa: E402
from experiments.common import config_checks as checks  # noqa: E402
from experiments.common import html_report  # noqa: E402
from experiments.common import jsonl  # noqa: E402
from experiments.common import models as models_lib  # noqa: E402
from experiments.common import plots  # noqa: E402
from experiments.common.workdir import Workdir, atomic_write_npz, atomic_write_text  # noqa: E402
from experiments.tasks import user_model  # noqa: E402

METHODS = ("ekfac", "kfac", "trak", "tracin", "sketch_dot", "sketch_cosine", "logra")
GRADIENT_METHODS = ("trak", "tracin", "sketch_dot", "sketch_cosine", "logra")
FIELDS = {"experiment", "seed", "model", "data", "method", "layers", "batch_size", "top_k", "sketch", "ekfac",
          "trak", "tracin", "tfidf_candidates", "query_rank", "scores_max_mb", "quiet", "workdir_on_change"}


def validate_config(config) -> None:
    checks.check_fields("config", config, FIELDS)
    checks.require_sections(config, ("model", "data", "sketch", "ekfac", "trak", "tracin"))
    user_model.validate_model_section(config.model)
    checks.check_fields("config.data", config.data, {"train", "queries", "max_len"})
    for field in ("train", "queries"):
        path = config.data.get(field)
        if not isinstance(path, str) or not path:
            raise checks.ConfigError(f"config.data.{field} is empty; give a JSONL file path")
        if not os.path.isfile(path):
            raise checks.ConfigError(f"config.data.{field}={path!r}: no such file")
    checks.integer("config.data.max_len", config.data.max_len, low=0)
    checks.one_of("config.method", config.method, METHODS)
    if not isinstance(config.layers, str) or not config.layers:
        raise checks.ConfigError(f"config.layers={config.layers!r}; allowed values: 'mlp', 'all', or a regular "
                                 "expression over module paths")
    checks.integer("config.batch_size", config.batch_size)
    checks.integer("config.top_k", config.top_k)
    checks.integer("config.tfidf_candidates", config.tfidf_candidates, low=0)
    checks.integer("config.query_rank", config.query_rank, low=0)
    checks.number("config.scores_max_mb", config.scores_max_mb, low=0)
    checks.check_fields("config.sketch", config.sketch, {"name", "m", "mode", "seed"})
    checks.one_of("config.sketch.name", config.sketch.name, sketching.names())
    checks.integer("config.sketch.m", config.sketch.m)
    checks.one_of("config.sketch.mode", config.sketch.mode, sketching.MODES)
    checks.check_fields("config.ekfac", config.ekfac, {"labels", "num_samples", "damping_factor"})
    checks.one_of("config.ekfac.labels", config.ekfac.labels, ("sampled", "data"))
    checks.integer("config.ekfac.num_samples", config.ekfac.num_samples)
    checks.number("config.ekfac.damping_factor", config.ekfac.damping_factor, low=0, low_open=True)
    checks.check_fields("config.trak", config.trak, {"ridge"})
    checks.number("config.trak.ridge", config.trak.ridge, low=0, low_open=True)
    checks.check_fields("config.tracin", config.tracin, {"checkpoints", "learning_rates"})
    if config.query_rank and config.method not in ("ekfac", "kfac"):
        raise checks.ConfigError(f"config.query_rank={config.query_rank} applies to method 'ekfac' or 'kfac' only "
                                 f"(config.method={config.method!r}); set it to 0")
    if config.method == "tracin" and config.model.kind == "minilm":
        raise checks.ConfigError("config.method='tracin' needs training checkpoints; kind='minilm' has one model")
    if config.method == "tracin":
        paths, rates = _tracin_checkpoints(config)
        if not paths or len(paths) != len(rates):
            raise checks.ConfigError(f"config.tracin.checkpoints ({len(paths)}) and config.tracin.learning_rates "
                                     f"({len(rates)}) must be non-empty lists of equal length")
        for i, (path, rate) in enumerate(zip(paths, rates)):
            if not os.path.isdir(path):
                raise checks.ConfigError(f"config.tracin.checkpoints[{i}]={path!r} is not a folder")
            checks.number(f"config.tracin.learning_rates[{i}]", rate, low=0, low_open=True)


def _tracin_checkpoints(config) -> tuple[list[str], list[float]]:
    """config.tracin's comma-separated checkpoint folders and learning rates."""
    paths = [p.strip() for p in str(config.tracin.checkpoints).split(",") if p.strip()]
    rates = []
    for i, text in enumerate(t.strip() for t in str(config.tracin.learning_rates).split(",") if t.strip()):
        try:
            rates.append(float(text))
        except ValueError:
            raise checks.ConfigError(f"config.tracin.learning_rates[{i}]={text!r} is not a number") from None
    return paths, rates


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def _record_kinds(task: str) -> tuple[str, str]:
    return ("lm_train", "lm_query") if task == "lm" else ("classification", "classification")


def _digest(fields: dict) -> str:
    return artifacts.digest(fields)[:16]


def _select(params, patterns: tuple[str, ...]):
    """(the leaves whose module path fully matches a pattern, as a flat dict 'a/b/kernel' -> array,
    merge(selected) -> the full parameter tree with those leaves replaced)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    compiled = [re.compile(p) for p in patterns]
    chosen = {k: v for k, v in flat.items() if any(p.fullmatch(k.rsplit("/", 1)[0]) for p in compiled)}
    if not chosen:
        modules = sorted({k.rsplit("/", 1)[0] for k in flat})
        raise checks.ConfigError(f"config.layers={list(patterns)} match no parameter; module paths are e.g. "
                                 f"{modules[:12]}{' ...' if len(modules) > 12 else ''}")

    def merge(selected):
        return flax.traverse_util.unflatten_dict({**flat, **selected}, sep="/")

    return chosen, merge


def _batches(arrays: dict, rows: np.ndarray, batch_size: int):
    """(start, batch padded to batch_size rows with empty sequences, number of real rows)."""
    for start in range(0, len(rows), batch_size):
        idx = rows[start: start + batch_size]
        batch = {k: v[idx] for k, v in arrays.items()}
        real = len(idx)
        if real < batch_size:
            batch = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        yield start, batch, real


# ----------------------------------------------------------------------------------------------
# Gradient methods: an index of sketched gradients, then scores
# ----------------------------------------------------------------------------------------------

class GradientScorer:
    """Sketched per-example gradients of the selected parameters at one or more checkpoints."""

    def __init__(self, config, user, params_list, weights, patterns, train, queries, rows, cache_key):
        self.config, self.user = config, user
        self.method = config.method
        name = "logra" if self.method == "logra" else config.sketch.name
        if name == "logra":
            from sketching import logra

            self.sketch = logra.get(config.sketch.m)
        else:
            self.sketch = sketching.get(name, config.sketch.m)
        self.sketch_name = name
        self.weights = [math.sqrt(w) for w in weights]  # √η_c for TracIn, 1 otherwise
        self.selected, self.merges = [], []
        for params in params_list:
            chosen, merge = _select(params, patterns)
            self.selected.append(chosen)
            self.merges.append(merge)
        self.state = self.sketch.init(jax.random.key(config.sketch.seed), self.selected[0])
        per_example = models_lib.make_loss_fns(user.model).per_example_loss
        self.loss = [lambda sel, batch, m=merge: per_example(m(sel), batch) for merge in self.merges]
        self.train, self.queries, self.rows = train, queries, rows
        self.cache_key = cache_key
        self._fns = {}  # (arrays, checkpoint) -> its sketched-features function, built once

    def features(self, arrays: dict, rows: np.ndarray) -> np.ndarray:
        """(len(rows), C·m): [√η_c Φ ∇ℓ(z, θ_c)]_c, through `index.sketched_features_fn` per checkpoint,
        always on batches of `batch_size` rows (the last one padded with empty sequences, whose
        features are dropped), so each checkpoint's program compiles once."""
        rows = np.asarray(rows, np.int64)
        size = self.config.batch_size
        padded = np.concatenate([rows, np.full((-len(rows)) % size, rows[0] if len(rows) else 0, np.int64)])
        blocks = []
        for c, (sel, loss) in enumerate(zip(self.selected, self.loss)):
            key = (id(arrays), c)
            if key not in self._fns:
                self._fns[key] = index_lib.sketched_features_fn(self.sketch, self.state, loss, sel, arrays,
                                                                mode=self.config.sketch.mode)
            fn = self._fns[key]
            out = np.concatenate([fn(padded[i: i + size]) for i in range(0, len(padded), size)])
            blocks.append(self.weights[c] * out[: len(rows)])
        return np.concatenate(blocks, axis=1)

    def build_index(self, folder: str, quiet: bool) -> index_lib.GradientIndex:
        m = self.config.sketch.m * len(self.selected)
        meta = {"sketch": self.sketch_name, "m": m, "checkpoint": self.cache_key, "sketch_seed": self.config.sketch.seed,
                "mode": self.config.sketch.mode, "checkpoints": len(self.selected)}
        rows = self.rows
        return index_lib.build_index(
            folder, lambda idx: self.features(self.train.arrays, rows[idx]), len(rows), meta=meta,
            shard_size=max(self.config.batch_size, 256 // self.config.batch_size * self.config.batch_size),
            example_ids=[str(self.train.ids[r]) for r in rows], progress=not quiet)

    def query_features(self) -> np.ndarray:
        return self.features(self.queries.arrays, np.arange(len(self.queries.ids)))

    def preconditioned(self, index: index_lib.GradientIndex, phi_q: np.ndarray) -> np.ndarray:
        """trak / logra: (ΦᵀΦ + λI)⁻¹ φ_q with ΦᵀΦ accumulated over the index (float64), λ = ridge·tr/m."""
        m = index.dim
        kernel = np.zeros((m, m), np.float64)
        for _, block in index.iter_blocks():
            block = block.astype(np.float64)
            kernel += block.T @ block
        ridge = self.config.trak.ridge * np.trace(kernel) / m
        return np.linalg.solve(kernel + ridge * np.eye(m), phi_q.astype(np.float64).T).T, float(ridge)

    def directions(self, query_vectors: np.ndarray) -> list:
        """Per checkpoint c, the parameter-space direction v_c = √η_c Φᵀ u_c of each query (u: the
        vector the score dots with Φg): a list over checkpoints of flat dicts with a leading query axis."""
        m = self.config.sketch.m
        transpose_all = jax.jit(jax.vmap(self.sketch.transpose, in_axes=(None, 0)))
        out = []
        for c in range(len(self.selected)):
            u = jnp.asarray(query_vectors[:, c * m: (c + 1) * m] * self.weights[c], jnp.float32)
            out.append(transpose_all(self.state, u))
        return out


def _token_contributions_gradient(scorer: GradientScorer, directions: list, pairs, train_arrays, quiet):
    """{(q, row): (T,) contributions ⟨v_q, ∇ℓ_{row,t}⟩ summed over checkpoints} by forward-mode JVPs."""
    token_losses = user_model.token_losses_fn(scorer.user)

    def per_checkpoint(c):
        merge = scorer.merges[c]

        @jax.jit
        def contributions(sel, example, v):
            return jax.jvp(lambda s: token_losses(merge(s), example), (sel,), (v,))[1]
        return contributions

    fns = [per_checkpoint(c) for c in range(len(scorer.selected))]
    out = {}
    for q, row in tqdm(pairs, desc="per-token influence", disable=quiet):
        example = {k: jnp.asarray(v[row]) for k, v in train_arrays.items()}
        total = 0.0
        for c, fn in enumerate(fns):
            v = jax.tree_util.tree_map(lambda a: a[q], directions[c])
            v = {k: v[k].astype(scorer.selected[c][k].dtype) for k in scorer.selected[c]}
            total = total + np.asarray(fn(scorer.selected[c], example, v), np.float64)
        out[(q, row)] = total
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def _candidate_rows(config, train, queries) -> tuple[np.ndarray | None, np.ndarray]:
    """(per-query candidate rows (Q, N_c) or None, the rows to score: their union or all)."""
    n = len(train.ids)
    if not config.tfidf_candidates or config.tfidf_candidates >= n:
        return None, np.arange(n)
    bm25 = tfidf.tfidf_scores(queries.texts, train.texts)
    candidates = tfidf.top_candidates(bm25, config.tfidf_candidates)
    return candidates, np.unique(candidates)


@dataclasses.dataclass
class Scored:
    """A method's result: `scores` (Q, len(rows)) when the matrix fits in memory, else `top`
    (columns into rows (Q, k), scores (Q, k)) from streaming retrieval; `token_fn(pairs)` ->
    {(query, row): (T,) per-token contributions}; the settings shown in the report."""

    scores: np.ndarray | None
    top: tuple[np.ndarray, np.ndarray] | None
    token_fn: Any
    settings: dict
    reused: bool


def _dense_fits(config, num_queries: int, num_rows: int) -> bool:
    """Whether the Q × N float32 score matrix fits in `scores_max_mb`."""
    return num_queries * num_rows * 4 <= config.scores_max_mb * 2 ** 20


def _ekfac_scores(config, wd, user, params, patterns, train, queries, rows, cache_key, quiet) -> Scored:
    task = user.model.task
    apply = user.model.apply
    fit_batches = [b for _, b, real in _batches(train.arrays, rows, config.batch_size)
                   if real == config.batch_size]
    tail = len(rows) % config.batch_size
    if tail:  # the last, smaller batch unpadded: padded rows would count as examples in Λ
        fit_batches.append({k: v[rows[-tail:]] for k, v in train.arrays.items()})
    folder = wd.file(f"cache/ekfac-{cache_key}")
    reused = os.path.exists(os.path.join(folder, ekfac.FACTORS_FILE))
    fit = ekfac.fit_ekfac(apply, params, fit_batches, task=task, layers=patterns, seed=config.seed,
                          labels=config.ekfac.labels, num_samples=config.ekfac.num_samples,
                          damping_factor=config.ekfac.damping_factor, folder=folder, progress=not quiet)
    layers = fit.layers
    qgrads = jax.jit(lambda b: ekfac.per_example_layer_grads(apply, params, b, layers, task))(queries.arrays)
    pre = fit.ihvp(qgrads, config.method)
    low_rank = qb.low_rank_queries(pre, config.query_rank) if config.query_rank else None

    @jax.jit
    def batch_scores(batch):
        acts, _ = ekfac.layer_activations(apply, params, batch, layers, task)
        if low_rank is not None:
            return qb.low_rank_scores(low_rank, acts)
        return ekfac.influence_scores(pre, acts)

    # The per-token split of the score actually ranked: of the rank-k queries when query batching.
    scored = pre if low_rank is None else {p: jnp.einsum("qik,qko->qio", a, b) for p, (a, b) in low_rank.items()}

    @jax.jit
    def tokens_of(example_batch, q):
        acts, _ = ekfac.layer_activations(apply, params, example_batch, layers, task)
        return ekfac.token_influence({p: jax.lax.dynamic_slice_in_dim(v, q, 1) for p, v in scored.items()}, acts)[0, 0]

    scores = np.zeros((len(queries.ids), len(rows)), np.float64)
    for start, batch, real in tqdm(list(_batches(train.arrays, rows, config.batch_size)), desc="score",
                                   disable=quiet):
        scores[:, start: start + real] = np.asarray(batch_scores(batch), np.float64)[:, :real]

    def token_fn(pairs):
        out = {}
        for q, row in tqdm(pairs, desc="per-token influence", disable=quiet):
            example = {k: v[row: row + 1] for k, v in train.arrays.items()}
            out[(q, row)] = np.asarray(tokens_of(example, q), np.float64)
        return out

    settings = {"layers (EK-FAC)": ", ".join(layers), "labels": config.ekfac.labels,
                "damping": f"{config.ekfac.damping_factor} × mean(Λ) per layer",
                "query rank": config.query_rank or "full",
                "cache": f"{os.path.relpath(folder, wd.path)} ({'reused' if reused else 'built'})"}
    return Scored(scores, None, token_fn, settings, reused)


def _gradient_scores(config, wd, user, params, patterns, train, queries, rows, cache_key, quiet) -> Scored:
    if config.method == "tracin":
        paths, weights = _tracin_checkpoints(config)
        params_list = [user_model.load({**config.model.to_dict(), "path": p}).params for p in paths]
    else:
        params_list, weights = [params], [1.0]
    key = cache_key if config.method != "tracin" else _digest({
        "base": cache_key, "checkpoints": [artifacts.tree_digest(p) for p in params_list], "rates": weights})
    scorer = GradientScorer(config, user, params_list, weights, patterns, train, queries, rows, key)
    folder = wd.file(f"cache/index-{key}")
    manifest = os.path.join(folder, index_lib.MANIFEST)
    reused = os.path.exists(manifest) and bool(artifacts.read_json(manifest).get("complete"))
    index = scorer.build_index(folder, quiet)
    phi_q = scorer.query_features()
    settings = {"sketch": f"{scorer.sketch_name}, m = {config.sketch.m}, seed {config.sketch.seed}, "
                          f"{config.sketch.mode} gradients",
                "parameters": f"{sum(int(v.size) for v in scorer.selected[0].values()):,} in "
                              f"{len(scorer.selected[0])} arrays",
                "cache": f"{os.path.relpath(folder, wd.path)} ({'reused' if reused else 'built'})"}
    if config.method in ("trak", "logra"):
        u, ridge = scorer.preconditioned(index, phi_q)
        settings["ridge λ"] = f"{ridge:.4g} = {config.trak.ridge} · tr(ΦᵀΦ)/m"
    else:
        u = phi_q.astype(np.float64)
    cosine = config.method == "sketch_cosine"
    q_norms = np.linalg.norm(phi_q.astype(np.float64), axis=1)
    if _dense_fits(config, len(queries.ids), len(rows)):
        scores, row_norms = np.empty((len(queries.ids), len(rows))), np.empty(len(rows))
        for start, block in index.iter_blocks():
            block = block.astype(np.float64)
            scores[:, start: start + len(block)] = u @ block.T
            row_norms[start: start + len(block)] = np.linalg.norm(block, axis=1)
        if cosine:
            denominator = q_norms[:, None] * row_norms[None, :]
            scores = np.divide(scores, denominator, out=np.zeros_like(scores), where=denominator > 0)
        top = None
    else:  # streaming top-k over the index: memory O(Q·k + one tile), no Q × N matrix
        k = min(config.top_k, len(rows))
        top_scores, columns = index_lib.top_k(index, (phi_q if cosine else u).astype(np.float32), k,
                                              score="cosine" if cosine else "dot")
        scores, top = None, (columns, top_scores.astype(np.float64))
        settings["scores"] = f"streaming top-{k} (Q × N exceeds scores_max_mb = {config.scores_max_mb})"
    if config.method == "tracin":
        settings["checkpoints"] = ", ".join(f"{p} (η={r:g})" for p, r in zip(paths, weights))
    directions = scorer.directions(u) if user.model.task == "lm" else None

    def token_fn(pairs):
        if directions is None:
            return {}
        out = _token_contributions_gradient(scorer, directions, pairs, train.arrays, quiet)
        if cosine:  # the dot's contributions over ‖φ_q‖‖φ_i‖
            hit_rows = sorted({row for _, row in pairs})
            hit_norms = dict(zip(hit_rows, np.linalg.norm(scorer.features(train.arrays, np.array(hit_rows)), axis=1)))
            for (q, row), v in out.items():
                out[(q, row)] = v / max(q_norms[q] * hit_norms[row], 1e-300)
        return out

    return Scored(scores, top, token_fn, settings, reused)


def _pieces(user, tokens: np.ndarray, mask: np.ndarray, context: int = 8) -> list[str]:
    """Each real token's text in context: decode(ids[t-c : t+1]) minus decode(ids[t-c : t]), so the
    spaces a tokenizer's decoder puts between tokens (word-level) or inside them (byte-level BPE)
    come out right, at O(T·c) decoding cost. A character whose UTF-8 bytes span several byte-level
    tokens decodes to U+FFFD until its last byte: it is given to the token that completes it."""
    incomplete = "\ufffd"
    ids = [int(t) for t, m in zip(tokens, mask) if m > 0]
    pieces, pending = [], None  # pending: the first token whose text waits for a character's last byte
    for t in range(len(ids)):
        first = t if pending is None else pending
        start = max(0, first - context)
        current = user.codec.decode(ids[start: t + 1])
        previous = user.codec.decode(ids[start: first]).rstrip(incomplete)
        if current.endswith(incomplete) and t + 1 < len(ids):
            pieces.append("")
            pending = first
            continue
        pending = None
        pieces.append(current[len(previous):] if current.startswith(previous) else user.codec.decode(ids[first: t + 1]))
    return pieces


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    quiet = bool(config.get("quiet", False))
    task = config.model.get("task", "lm")
    train_kind, query_kind = _record_kinds(task)
    train_records = jsonl.read_records(config.data.train, train_kind)
    query_records = jsonl.read_records(config.data.queries, query_kind)
    user = user_model.load(config.model, train_labels=[r["label"] for r in train_records] if task != "lm" else None)
    length = user_model.sequence_length(user, [(train_records, train_kind), (query_records, query_kind)],
                                        config.data.max_len)
    train = user_model.encode(user, train_records, train_kind, length, config.data.train)
    queries = user_model.encode(user, query_records, query_kind, length, config.data.queries)
    probe_accuracy = None
    if config.model.kind == "minilm":
        probe_accuracy = user_model.fit_probe(user, train.arrays, config.batch_size)
    if config.top_k > len(train.ids):
        raise checks.ConfigError(f"config.top_k={config.top_k} exceeds the {len(train.ids)} training sequences")
    patterns = user_model.layer_patterns(config.layers, user.model_type)
    candidates, rows = _candidate_rows(config, train, queries)
    params = user.params
    cache_key = _digest({
        "model": artifacts.tree_digest(params), "train": jsonl.file_digest(config.data.train), "length": length,
        "layers": list(patterns), "rows": artifacts.digest({"rows": rows.tolist()}), "method": config.method,
        "options": {"sketch": config.sketch.to_dict(), "ekfac": config.ekfac.to_dict(),
                    "batch_size": config.batch_size, "seed": config.seed}})

    if config.method in ("ekfac", "kfac") and not _dense_fits(config, len(queries.ids), len(rows)):
        raise checks.ConfigError(
            f"{config.method} scores of {len(queries.ids)} queries × {len(rows)} training sequences exceed "
            f"config.scores_max_mb={config.scores_max_mb}; set config.tfidf_candidates (score each query "
            "against its BM25 candidates only), use fewer queries, or raise scores_max_mb")
    if candidates is not None and not _dense_fits(config, len(queries.ids), len(rows)):
        raise checks.ConfigError(f"config.tfidf_candidates={config.tfidf_candidates}: the {len(queries.ids)} × "
                                 f"{len(rows)} candidate scores exceed config.scores_max_mb={config.scores_max_mb}")
    compute = _ekfac_scores if config.method in ("ekfac", "kfac") else _gradient_scores
    result = compute(config, workdir, user, params, patterns, train, queries, rows, cache_key, quiet)
    reused, settings = result.reused, result.settings

    # Rank: per query over its candidates (or all rows), ties by the lower row.
    if result.scores is not None:
        ranking = result.scores.copy()
        if candidates is not None:
            allowed = np.zeros_like(ranking, bool)
            for q, cand in enumerate(candidates):
                allowed[q, np.searchsorted(rows, cand)] = True
            ranking[~allowed] = -np.inf
        k = min(config.top_k, ranking.shape[1] if candidates is None else config.tfidf_candidates)
        columns = np.argsort(-ranking, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(result.scores, columns, axis=1)
        scale = np.max(np.abs(np.where(np.isfinite(ranking), result.scores, 0.0)), axis=1)
    else:
        columns, top_scores = result.top
        scale = np.max(np.abs(top_scores), axis=1)
    top_rows = rows[columns]
    pairs = [(q, int(r)) for q in range(len(queries.ids)) for r in top_rows[q]]
    tokens = result.token_fn(pairs)

    # Outputs: the full matrix (NaN on pairs not scored) when it was computed.
    full = None
    if result.scores is not None:
        full = np.full((len(queries.ids), len(train.ids)), np.nan, np.float32)
        full[:, rows] = result.scores
        if candidates is not None:
            for q in range(len(queries.ids)):
                keep = np.zeros(len(train.ids), bool)
                keep[candidates[q]] = True
                full[q, ~keep] = np.nan
        artifacts.atomic_write_npy(workdir.file("scores.npy"), full)
    wrote_scores = full is not None
    curve = full if full is not None else top_scores
    lines, report_queries = [], []
    for q, qid in enumerate(queries.ids):
        hits = []
        for rank, row in enumerate(top_rows[q], start=1):
            hits.append({"rank": rank, "id": train.ids[row], "score": float(top_scores[q, rank - 1]),
                         "text": train.texts[row], "row": int(row)})
        lines.append(json.dumps({"query_id": qid, "method": config.method,
                                 "top": [{k2: h[k2] for k2 in ("rank", "id", "score", "text")} for h in hits]},
                                ensure_ascii=False))
        report_hits = []
        for h in hits:
            pieces = _pieces(user, train.arrays["tokens"][h["row"]], train.arrays["mask"][h["row"]])
            contrib = tokens.get((q, h["row"]))
            contrib = None if contrib is None else contrib[: len(pieces)]
            report_hits.append({**h, "html": html_report.token_spans(pieces, contrib)})
        prompt_html = _query_html(query_records[q], task)
        report_queries.append({"id": qid, "prompt_html": prompt_html, "hits": report_hits})
    atomic_write_text(workdir.file("top_k.jsonl"), "\n".join(lines) + "\n")
    settings = {"method": config.method, "model": f"{user.source} ({user.model_type}, {task})",
                "training file": f"{config.data.train} ({len(train.ids)} sequences)",
                "queries file": f"{config.data.queries} ({len(queries.ids)} queries)",
                "sequence length": f"{length} tokens ({train.truncated + queries.truncated} sequences truncated)",
                "layers": ", ".join(patterns),
                **({"linear head": f"fitted to the training labels, train accuracy {probe_accuracy:.3f}"}
                   if probe_accuracy is not None else {}),
                "TF-IDF candidates": config.tfidf_candidates or "off (every training sequence scored)", **settings}
    _heavy_tail_png(workdir.file("heavy_tail.png"), curve)
    page = html_report.render(title=f"Training-data attribution: {config.method}", settings=settings,
                              queries=report_queries, scores=curve)
    atomic_write_text(workdir.file("report.html"), page)
    summary = {"method": config.method, "num_train": len(train.ids), "num_queries": len(queries.ids),
               "num_scored_pairs": int(np.isfinite(full).sum()) if full is not None else None,
               "sequence_length": length,
               "truncated": train.truncated + queries.truncated, "scores_written": wrote_scores,
               "top1_ids": [str(train.ids[top_rows[q][0]]) for q in range(len(queries.ids))],
               "token_sum_max_rel_error": _token_sum_error(tokens, top_rows, top_scores, scale),
               "cache": "reused" if reused else "built", "cache_key": cache_key,
               **({"probe_train_accuracy": probe_accuracy} if probe_accuracy is not None else {}),
               "report": workdir.file("report.html")}
    if not quiet:
        print(f"report: {workdir.file('report.html')}\ntop-k: {workdir.file('top_k.jsonl')}"
              + (f"\nscores: {workdir.file('scores.npy')}" if wrote_scores else ""))
    return summary


def _token_sum_error(tokens: dict, top_rows: np.ndarray, top_scores: np.ndarray, scale: np.ndarray) -> float | None:
    """max over the coloured (query, sequence) pairs of |Σ_t contribution − score| / max_j |score_qj|
    (the query's largest score sets the scale: float32 JVPs of a preconditioned direction carry
    rounding of that size, not of the pair's own, possibly tiny, score)."""
    if not tokens:
        return None
    errors = [abs(float(np.sum(tokens[(q, int(row))])) - top_scores[q, j]) / max(scale[q], 1e-30)
              for q in range(top_rows.shape[0]) for j, row in enumerate(top_rows[q]) if (q, int(row)) in tokens]
    return float(max(errors))


def _query_html(record: dict, task: str) -> str:
    if task == "lm":
        return (f"<span class='prompt'>{html.escape(record['prompt'])}</span>"
                f"<span class='completion'>{html.escape(record['completion'])}</span>")
    return f"{html.escape(record['text'])} <span class='completion'>label: {html.escape(str(record['label']))}</span>"


def _heavy_tail_png(path: str, scores: np.ndarray) -> None:
    fig, ax = plots.figure(size=(5.5, 3.5))
    curves = [np.sort(np.abs(s[np.isfinite(s)]))[::-1] for s in scores]
    curves = [c for c in curves if c.size and c[0] > 0]
    if curves:
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        keep = mean > 0
        ax.loglog(np.arange(1, n + 1)[keep], mean[keep], color="black", label="mean over queries")
    ax.set(xlabel="rank of training sequence", ylabel="|score|", title="heavy tail of the scores")
    plots.legend(ax)
    plots.save(fig, path)
