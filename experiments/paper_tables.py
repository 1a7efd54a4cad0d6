"""Experiment `paper_tables`: the sketch tables of Schioppa (NeurIPS 2024), side by side.

For every table: the paper's number, ours with the paper's map (eqs. 2, 6, 7, 8, 12 as published:
`sketching.get(name, m)`), ours with our variant of that map (`afjl(reduction="segsum")`,
`qk(construction="sandwich")`, `affd(permutations="none")`, `ffd(form="single")`). On a CPU every
model is scaled down (the report says to what); no GPU figure is claimed.

  table6     smallest log2 m with Pearson r ≥ 0.95 / 0.98 / 0.99 between sketched and exact gradient
             inner products over Q×T (query, train) pairs, mean r over `seeds` sketch seeds; on the
             tiny planted-facts LM and on fine-tuned all-MiniLM-L6-v2 (pretrained weights), the
             latter on the parameters named by `minilm.gradient_params` (all when empty).
  table7     smallest log2 m with top-10 eigenvalue error < 0.2 / 0.1 / 0.05 (Lanczos on Φ H Φᵀ vs
             full-basis Lanczos, error after the best orientation-preserving affine map,
             `landscape.affine_relative_error`), tiny LM Hessian.
  cost       Tables 3/4/8/9: wall time (median) and compiled temporary memory of gradient sketches
             (explicit / implicit × pre-conditioner H / FFT (Hartley) / Q) and of HVP sketches
             v ↦ Φ H Φᵀ v (explicit: Φ(H(Φᵀv)); implicit: Hessian of ω ↦ L(θ + Φᵀω)) on a
             transformer LM with GPT-2's structure at a reduced width/depth/vocabulary.
  table11    Fig. 7: wall time of Φx vs m for the on-the-fly dense projector (TRAK's method,
             `dense`) vs affd vs qk at fixed D.
  layers     Tables 1/5: Pearson r of per-layer gradient dot products vs whole-model ones, and the
             top-10 eigenvalue error of the per-layer Hessian vs the whole one; whole-model afjl at
             m = 2^13 beside it.
  tda_cost   (per-example gradient + sketch) / (per-example gradient) wall time for MiniLM: explicit
             at m in `tda_cost.log2_ms` for each sequence length in `tda_cost.max_lens` (the gradient's
             cost grows with the tokens per example, the sketch's does not), implicit at
             `tda_cost.implicit_log2_ms` for the shortest length only.

Outputs: report.md (the tables), results.json (every number), table6.png, table7.png,
table11.png, summary.json (flat headline numbers, written by the runner), and section_<name>.json
per finished section: rerunning the same command after an interruption reads those and runs only
the sections still missing.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

import landscape
import sketching
from artifacts import read_json
from configs import finetune_classifier as classifier_configs
from configs import train_lm as lm_configs
from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.plots import Panel, save_panel_grid
from experiments.common.timing import aot_compile, median_time, memory_of
from experiments.common.workdir import Workdir, atomic_write_json, atomic_write_text
from experiments.tasks import classifier, planted_lm

SECTIONS = ("table6", "table7", "cost", "table11", "layers", "tda_cost")
THRESHOLDS_R = (0.95, 0.98, 0.99)
THRESHOLDS_EIG = (0.2, 0.1, 0.05)

# (sketch name, options) of the paper's map and of our variant, per algorithm.
MAPS = {
    "fjl": {"paper": ("fjl", {}), "ours": None},
    "ffd": {"paper": ("ffd", {"form": "blocked"}), "ours": ("ffd", {})},
    "affd": {"paper": ("affd", {}), "ours": ("affd", {"permutations": "none"})},
    "afjl": {"paper": ("afjl", {}), "ours": ("afjl", {"reduction": "segsum"})},
    "qk": {"paper": ("qk", {}), "ours": ("qk", {"construction": "sandwich"})},
}
VARIANT_NOTE = {
    "fjl": "fjl (one construction)", "ffd": "ffd form='single' (Li et al.)", "affd": "affd permutations='none'",
    "afjl": "afjl reduction='segsum'", "qk": "qk construction='sandwich'",
}

# The paper's numbers (Schioppa 2024; GPT-2 unless stated).
PAPER_TABLE6 = {"fjl": (10, 12, 13), "affd": (10, 12, 13), "afjl": (12, 13, 15), "qk": (14, 16, 17), "ffd": (10, 12, 14)}
PAPER_TABLE7 = {"affd": (9, 10, 10), "afjl": (12, 12, 12), "qk": (13, 13, 13)}
# Table 8 rows (algo, I, F, Q) -> V100 ms, V100 GB, TPU ms, TPU GB.
PAPER_TABLE8 = {
    ("fjl", 0, 0, 0): (123, 6.9, 8997, 3.0), ("fjl", 1, 0, 0): (244, 6.7, 10958, 3.3),
    ("affd", 0, 0, 0): (205, 3.2, 134, 2.8), ("affd", 0, 0, 1): (142, 3.2, 134, 2.8), ("affd", 0, 1, 0): (104, 4.2, 134, 2.8),
    ("affd", 1, 0, 0): (454, 3.2, 278, 3.0), ("affd", 1, 0, 1): (237, 3.2, 278, 3.0), ("affd", 1, 1, 0): (126, 4.2, 278, 3.0),
    ("ffd", 0, 0, 0): (197, 4.1, 8694, 4.3), ("ffd", 1, 0, 0): (352, 4.2, 9600, 4.7),
    ("afjl", 0, 0, 0): (116, 2.9, 89, 2.7), ("afjl", 0, 0, 1): (81, 2.9, 89, 2.7), ("afjl", 0, 1, 0): (71, 3.8, 89, 2.7),
    ("afjl", 1, 0, 0): (231, 3.0, 149, 2.8), ("afjl", 1, 0, 1): (121, 3.1, 149, 2.8), ("afjl", 1, 1, 0): (88, 4.1, 149, 2.8),
    ("qk", 0, 0, 1): (82, 1.7, 64, 1.1), ("qk", 1, 0, 1): (116, 1.7, 157, 1.4),
}
PAPER_TABLE9 = {
    ("affd", 0, 0, 0): (397, 2.8, 158, 2.7), ("affd", 0, 0, 1): (183, 2.8, 158, 2.7), ("affd", 0, 1, 0): (111, 3.3, 158, 2.7),
    ("affd", 1, 0, 0): (627, 3.1, 268, 3.6), ("affd", 1, 0, 1): (238, 3.1, 267, 3.6), ("affd", 1, 1, 0): (137, 3.7, 268, 3.6),
    ("afjl", 0, 0, 0): (230, 2.7, 108, 2.6), ("afjl", 0, 0, 1): (121, 2.7, 108, 2.6), ("afjl", 0, 1, 0): (92, 3.3, 108, 2.6),
    ("afjl", 1, 0, 0): (345, 3.0, 191, 3.5), ("afjl", 1, 0, 1): (150, 3.0, 190, 3.5), ("afjl", 1, 1, 0): (111, 3.8, 191, 3.5),
    ("qk", 0, 0, 1): (118, 1.6, 82, 1.3), ("qk", 1, 0, 1): (146, 1.9, 161, 1.7),
}
PAPER_TABLE4 = {  # (change, algo) -> (GPU, TPU), R = slowest / fastest
    ("implicit→explicit", "fjl"): (1.96, 1.20), ("implicit→explicit", "affd"): (1.81, 2.07),
    ("implicit→explicit", "ffd"): (1.76, 1.10), ("implicit→explicit", "afjl"): (1.64, 1.67),
    ("implicit→explicit", "qk"): (1.41, 2.45), ("H→FFT", "affd"): (1.98, 1.00), ("H→FFT", "afjl"): (1.64, 1.00),
    ("H→Q", "affd"): (1.45, 1.00), ("H→Q", "afjl"): (1.44, 1.00),
}
PAPER_TABLE11 = {12: (359, 213, 84), 13: (594, 207, 87), 14: (1078, 207, 91), 15: (2047, 215, 82),
                 16: (3969, 219, 82), 17: (7812, 210, 91), 18: (15500, 209, 90)}  # TRAK[CUDA], AFFD, QK (V100 ms)
PAPER_TABLE1 = {"Tok.Emb": (0.16, 0.72), "1": (0.75, 0.24), "2": (0.89, 0.31), "3": (0.90, 0.19),
                "4": (0.89, 0.24), "5": (0.78, 0.37), "6": (0.38, 0.40)}  # GPT-2 layer: r, eig. err.
PRECONDITIONERS = {"H": "hadamard", "F": "hartley", "Q": "orthogonal"}
# Table 11's maps: (label, sketch name, options)
TABLE11_MAPS = (("dense (TRAK's method)", "dense", {}), ("affd", "affd", {}), ("qk", "qk", {}),
                ("affd ours", *MAPS["affd"]["ours"]), ("qk ours", *MAPS["qk"]["ours"]))

_TOP_FIELDS = {"experiment", "seed", "quiet", "sections", "maps", "tiny_lm", "minilm", "table6", "table7", "cost",
               "table11", "layers", "tda_cost"}


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

def _ints(where, values, low=1):
    values = tuple(values)
    if not values:
        raise checks.ConfigError(f"{where} must be a non-empty tuple of ints")
    for v in values:
        checks.integer(where, v, low=low)
    return values


def validate_config(config) -> None:
    checks.check_fields("config", config, _TOP_FIELDS)
    checks.names_from("config.sections", config.sections, SECTIONS)
    checks.names_from("config.maps", config.maps, tuple(MAPS))
    checks.check_fields("config.tiny_lm", config.tiny_lm, {"preset", "train_steps", "num_queries", "num_train",
                                                            "hessian_examples"})
    checks.integer("config.tiny_lm.train_steps", config.tiny_lm.train_steps, low=0)
    checks.check_fields("config.minilm", config.minilm, {"enabled", "train_steps", "num_queries", "num_train",
                                                          "gradient_params", "max_len"})
    checks.integer("config.minilm.train_steps", config.minilm.train_steps, low=0)
    for section in ("tiny_lm", "minilm"):
        checks.integer(f"config.{section}.num_queries", config[section].num_queries)
        checks.integer(f"config.{section}.num_train", config[section].num_train)
    checks.check_fields("config.table6", config.table6, {"log2_ms", "seeds", "models"})
    _ints("config.table6.log2_ms", config.table6.log2_ms)
    checks.integer("config.table6.seeds", config.table6.seeds)
    checks.names_from("config.table6.models", config.table6.models, ("tiny_lm", "minilm"))
    checks.check_fields("config.table7", config.table7, {"log2_ms", "num_iters", "maps"})
    _ints("config.table7.log2_ms", config.table7.log2_ms)
    checks.integer("config.table7.num_iters", config.table7.num_iters, low=10)
    checks.names_from("config.table7.maps", config.table7.maps, tuple(MAPS))
    checks.check_fields("config.cost", config.cost, {"model", "batch_size", "log2_m", "hvp", "repeats", "algos"})
    checks.names_from("config.cost.algos", config.cost.algos, tuple(MAPS))
    checks.check_fields("config.cost.model", config.cost.model, {"num_layers", "d_model", "num_heads", "vocab_size",
                                                                 "max_len"})
    checks.check_fields("config.table11", config.table11, {"log2_d", "log2_ms", "repeats", "max_call_s"})
    _ints("config.table11.log2_ms", config.table11.log2_ms)
    checks.number("config.table11.max_call_s", config.table11.max_call_s, low=0.0)
    checks.check_fields("config.layers", config.layers, {"models", "whole_model_log2_m", "num_iters"})
    checks.names_from("config.layers.models", config.layers.models, ("tiny_lm", "minilm"), nonempty=False)
    checks.check_fields("config.tda_cost", config.tda_cost, {"log2_ms", "implicit_log2_ms", "max_lens", "maps",
                                                             "batch_size", "repeats"})
    _ints("config.tda_cost.log2_ms", config.tda_cost.log2_ms)
    if config.tda_cost.implicit_log2_ms:
        _ints("config.tda_cost.implicit_log2_ms", config.tda_cost.implicit_log2_ms)
    for length in _ints("config.tda_cost.max_lens", config.tda_cost.max_lens):
        checks.integer("config.tda_cost.max_lens", length, 2, 512)  # MiniLM's position embeddings
    checks.names_from("config.tda_cost.maps", config.tda_cost.maps, tuple(MAPS))
    uses_minilm = ("minilm" in config.table6.models and "table6" in config.sections) or "tda_cost" in config.sections \
        or ("minilm" in config.layers.models and "layers" in config.sections)
    if uses_minilm and not config.minilm.enabled:
        raise checks.ConfigError("config.minilm.enabled=False but a section uses MiniLM "
                                 "(config.table6.models, config.layers.models or tda_cost)")


# ----------------------------------------------------------------------------------------------
# models and exact per-example gradients
# ----------------------------------------------------------------------------------------------

def _split(params, include: tuple[str, ...]):
    """(selected leaves, merge(selected) -> full params, selected names); all leaves if include is empty."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    mask = [not include or any(s in n for s in include) for n in names]
    if not any(mask):
        raise checks.ConfigError(f"no parameter matches {list(include)}; parameter names look like {names[:3]}")
    selected = [leaf for (_, leaf), keep in zip(flat, mask) if keep]

    def merge(sub):
        it = iter(sub)
        return jax.tree_util.tree_unflatten(treedef, [next(it) if keep else leaf for (_, leaf), keep in zip(flat, mask)])

    return selected, merge, [n for n, keep in zip(names, mask) if keep]


def layer_of(name: str) -> str:
    """Group of a parameter path: everything up to its first numeric key ("['layer']['3']"), or the
    first key (embeddings, final norm, head)."""
    keys = [k.strip("'\"") for k in name.strip("[]").split("][")]
    for i, k in enumerate(keys):
        digits = "".join(c for c in k if c.isdigit())
        if digits and (k.isdigit() or k.rstrip("0123456789").endswith("_")):
            return "/".join(keys[: i + 1])
    return keys[0]


class GradientTask:
    """A model with a loss and two example sets (queries, train) for gradient inner products."""

    def __init__(self, name, loss_fn, params, queries, train, hessian_batches, include=()):
        self.name, self.loss_fn, self.params = name, loss_fn, params
        self.queries, self.train, self.hessian_batches = queries, train, hessian_batches
        self.sub, self.merge, self.names = _split(params, tuple(include))
        self.sub_loss = lambda sub, batch: loss_fn(self.merge(sub), batch)  # noqa: E731
        self.num_params = int(sum(x.size for x in self.sub))

    def flat_gradients(self, arrays, chunk: int = 8) -> np.ndarray:
        """(B, D) float32 exact per-example gradients w.r.t. the selected parameters."""
        fn = jax.jit(lambda batch: sketching.flatten_per_example(
            sketching.per_example_gradients(self.sub_loss, self.sub, batch)))
        size = int(jax.tree_util.tree_leaves(arrays)[0].shape[0])
        rows = [np.asarray(fn(data_lib.take(arrays, np.arange(i, min(i + chunk, size)))), np.float32)
                for i in range(0, size, chunk)]
        return np.concatenate(rows)


def tiny_lm_task(config, quiet: bool) -> GradientTask:
    lm = lm_configs.get_config(config.tiny_lm.preset or None)
    lm.seed = config.seed
    s = planted_lm.setup(lm)
    losses = models_lib.make_loss_fns(s.model)
    params = s.params
    if config.tiny_lm.train_steps:
        optimizer = train_lib.optimizer_from_config(lm.train)
        batch_at = train_lib.batch_fn(s.train, lm.train.batch_size, config.seed)
        params = train_lib.train(losses.loss_fn, params, optimizer, batch_at, config.tiny_lm.train_steps,
                                 quiet=quiet, description="tiny LM").params
    t = config.tiny_lm
    size = int(s.train["tokens"].shape[0])
    if t.num_queries + t.num_train > size:
        raise checks.ConfigError(f"config.tiny_lm.num_queries + num_train = {t.num_queries + t.num_train} > "
                                 f"{size} training documents of tiny_lm.preset={t.preset!r}")
    queries = data_lib.take(s.train, np.arange(t.num_queries))
    train = data_lib.take(s.train, np.arange(t.num_queries, t.num_queries + t.num_train))
    hessian = [data_lib.take(s.train, np.arange(min(t.hessian_examples, size)))]
    return GradientTask("tiny LM", losses.loss_fn, params, queries, train, hessian)


def minilm_task(config, quiet: bool) -> GradientTask:
    c = classifier_configs.get_config("quick")
    c.seed = config.seed
    c.max_len = config.minilm.max_len
    t = config.minilm
    c.data.update(num_train=max(c.data.num_train, t.num_train), num_test=max(c.data.num_test, t.num_queries))
    s = classifier.prepare(c)
    losses = models_lib.make_loss_fns(s.model)
    params = s.params
    if t.train_steps:
        params = train_lib.train(losses.loss_fn, params, s.optimizer, s.batch_at, t.train_steps, quiet=quiet,
                                 description="MiniLM fine-tuning").params
    queries = data_lib.take(s.test_arrays, np.arange(t.num_queries))
    train = data_lib.take(s.train_arrays, np.arange(t.num_train))
    return GradientTask("MiniLM", losses.loss_fn, params, queries, train, [queries], include=tuple(t.gradient_params))


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------

def pearson(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(np.corrcoef(a, b)[0, 1])


def _variants(maps):
    for algo in maps:
        for which in ("paper", "ours"):
            if MAPS[algo][which] is not None:
                yield algo, which, MAPS[algo][which]


def _fits(name, options, m, d) -> bool:
    try:
        sketching.get(name, m, **options).init(jax.random.key(0), jax.ShapeDtypeStruct((d,), jnp.float32))
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)
def _compiled_rows(name, options: tuple, m: int, d: int):
    """(sketch, jitted init, jitted batched apply) for one (map, m, D): compiled once, reused per seed."""
    sketch = sketching.get(name, m, **dict(options))
    template = jax.ShapeDtypeStruct((d,), jnp.float32)
    init = jax.jit(lambda key: sketch.init(key, template))
    return sketch, init, jax.jit(jax.vmap(sketch.apply, in_axes=(None, 0)))


def sketch_rows(name, options, m, seed, rows: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Φ applied to every row of `rows` (B, D), one sketch drawn from `seed`."""
    _, init, fn = _compiled_rows(name, tuple(sorted(options.items())), m, int(rows.shape[1]))
    state = init(jax.random.key(seed))
    return np.concatenate([np.asarray(fn(state, jnp.asarray(rows[i:i + chunk]))) for i in range(0, len(rows), chunk)])


def _in_variant_order(by_key: dict, maps) -> list:
    """(key, value) of a {"<algo>/<paper|ours>": value} mapping, in the order of `_variants(maps)`."""
    return [(f"{a}/{w}", by_key[f"{a}/{w}"]) for a, w, _ in _variants(maps) if f"{a}/{w}" in by_key]


def first_reaching(values: dict, thresholds, above: bool) -> list:
    """The smallest key whose value is ≥ (above) or < (below) each threshold; None where none is."""
    out = []
    for t in thresholds:
        hits = [k for k in sorted(values) if (values[k] >= t if above else values[k] < t)]
        out.append(hits[0] if hits else None)
    return out


def reached_all(values: dict, thresholds, above: bool) -> bool:
    """Whether every threshold is already reached. The searches of Tables 6 and 7 stop a map there, in
    increasing m: a larger m cannot change the smallest m that reached a threshold."""
    return bool(values) and all(k is not None for k in first_reaching(values, thresholds, above))


def run_table6(task: GradientTask, config, quiet: bool) -> dict:
    gq, gt = task.flat_gradients(task.queries), task.flat_gradients(task.train)
    exact = gq.astype(np.float64) @ gt.astype(np.float64).T
    rows = np.concatenate([gq, gt])
    out = {"num_params": task.num_params, "pairs": int(exact.size), "r": {}, "min_log2m": {}}
    todo = [(a, w, e, lm) for a, w, e in _variants(config.maps) for lm in config.table6.log2_ms]
    for algo, which, (name, options), log2_m in tqdm(todo, desc=f"table 6 ({task.name})", disable=quiet):
        m = 1 << log2_m
        key = f"{algo}/{which}"
        if m > task.num_params or not _fits(name, options, m, task.num_params) \
                or reached_all(out["r"].get(key, {}), THRESHOLDS_R, above=True):
            continue
        rs = []
        for seed in range(config.table6.seeds):
            s = sketch_rows(name, options, m, 1000 + seed, rows)
            est = s[: len(gq)].astype(np.float64) @ s[len(gq):].astype(np.float64).T
            rs.append(pearson(est, exact))
        out["r"].setdefault(key, {})[log2_m] = float(np.mean(rs))
    for key, rs in out["r"].items():
        out["min_log2m"][key] = first_reaching(rs, THRESHOLDS_R, above=True)
    return out


def _lanczos_top(task: GradientTask, num_iters: int, sketch=None, params=None, loss=None):
    params = task.sub if params is None else params
    loss = task.sub_loss if loss is None else loss
    matvec = landscape.hvp_fn(loss, params, task.hessian_batches)
    result = landscape.lanczos(matvec, params, num_iters, jax.random.key(7), sketch=sketch)
    return np.asarray(result.eigenvalues)


def run_table7(task: GradientTask, config, quiet: bool) -> dict:
    iters = min(config.table7.num_iters, task.num_params)
    reference = _lanczos_top(task, iters)
    out = {"num_params": task.num_params, "reference_top10": reference[np.argsort(-reference)][:10].tolist(),
           "error": {}, "min_log2m": {}}
    todo = [(a, w, e, lm) for a, w, e in _variants(config.table7.maps) for lm in config.table7.log2_ms]
    for algo, which, (name, options), log2_m in tqdm(todo, desc="table 7", disable=quiet):
        m = 1 << log2_m
        if m > task.num_params or not _fits(name, options, m, task.num_params) \
                or reached_all(out["error"].get(f"{algo}/{which}", {}), THRESHOLDS_EIG, above=False):
            continue
        values = _lanczos_top(task, min(iters, m), sketch=sketching.get(name, m, **options))
        err = landscape.affine_relative_error(values, reference, 10)
        out["error"].setdefault(f"{algo}/{which}", {})[log2_m] = err
    for key, errs in out["error"].items():
        out["min_log2m"][key] = first_reaching(errs, THRESHOLDS_EIG, above=False)
    return out


def _cost_model(config):
    c = config.cost.model
    example = {"tokens": jnp.zeros((1, c.max_len), jnp.int32), "loss_mask": jnp.ones((1, c.max_len), jnp.float32)}
    model, params = models_lib.build_model("transformer", jax.random.key(config.seed), example,
                                           vocab_size=c.vocab_size, max_len=c.max_len, num_layers=c.num_layers,
                                           d_model=c.d_model, num_heads=c.num_heads, mlp_ratio=4, num_classes=0,
                                           positional="learned")
    tokens = jax.random.randint(jax.random.key(1), (config.cost.batch_size, c.max_len), 0, c.vocab_size)
    batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    return models_lib.make_loss_fns(model).loss_fn, params, batch


def _grid(algos):
    """(algo, I, F, Q, sketch name, options) of Table 8, the paper's maps."""
    rows = []
    for algo in algos:
        name, base = MAPS[algo]["paper"]
        pres = ("H", "F", "Q") if algo in ("affd", "afjl") else (("Q",) if algo == "qk" else ("H",))
        for implicit in (0, 1):
            for p in pres:
                options = dict(base)
                if algo in ("affd", "afjl"):
                    options["preconditioner"] = PRECONDITIONERS[p]
                rows.append((algo, implicit, int(p == "F"), int(p == "Q"), name, options))
    return rows


def run_cost(config, quiet: bool) -> dict:
    loss_fn, params, batch = _cost_model(config)
    d = models_lib.count_params(params)
    m = 1 << config.cost.log2_m
    out = {"num_params": d, "m": m, "gradient": [], "hvp": []}
    grad_only = jax.jit(jax.grad(loss_fn))
    base = median_time(grad_only, params, batch, repeats=config.cost.repeats)
    out["gradient_only_ms"] = 1e3 * base["median_s"]
    rows = _grid(config.cost.algos)
    extra = [(algo, 0, 0, 0 if algo != "qk" else 1, *MAPS[algo]["ours"], "ours")
             for algo in ("affd", "afjl", "qk") if algo in config.cost.algos]
    for algo, implicit, fft, q, name, options, *tag in tqdm(rows + extra, desc="tables 3/8", disable=quiet):
        sketch = sketching.get(name, m, **options)
        state = sketch.init(jax.random.key(0), params)
        mode = "implicit" if implicit else "explicit"
        fn = aot_compile(lambda s, p, b, _sk=sketch, _mode=mode: sketching.sketch_gradient(_sk, s, loss_fn, p, b, _mode),
                         state, params, batch)
        t = median_time(fn, state, params, batch, repeats=config.cost.repeats)
        mem = memory_of(fn)
        out["gradient"].append({"algo": algo, "I": implicit, "F": fft, "Q": q, "variant": tag[0] if tag else "paper",
                                "ms": 1e3 * t["median_s"], "temp_MB": mem["temp_bytes"] / 2**20})
    if config.cost.hvp:
        v = jax.random.normal(jax.random.key(3), (m,))
        hvp_rows = [r for r in rows if r[0] in ("affd", "afjl", "qk")]
        for algo, implicit, fft, q, name, options in tqdm(hvp_rows, desc="table 9", disable=quiet):
            sketch = sketching.get(name, m, **options)
            state = sketch.init(jax.random.key(0), params)
            if implicit:
                fn = lambda s, p, b, u, _sk=sketch: sketching.sketched_hessian_operator(_sk, s, loss_fn, p, b)(u)  # noqa: E731
            else:
                fn = lambda s, p, b, u, _sk=sketch: _sk.apply(s, sketching.hvp(loss_fn, p, b, _sk.transpose(s, u)))  # noqa: E731
            fn = aot_compile(fn, state, params, batch, v)
            t = median_time(fn, state, params, batch, v, repeats=config.cost.repeats)
            mem = memory_of(fn)
            out["hvp"].append({"algo": algo, "I": implicit, "F": fft, "Q": q, "variant": "paper",
                               "ms": 1e3 * t["median_s"], "temp_MB": mem["temp_bytes"] / 2**20})
    return out


def table4_ratios(gradient_rows: list[dict]) -> dict:
    """Ours: time(before)/time(after) for each of the paper's Table 4 design changes (paper maps)."""
    t = {(r["algo"], r["I"], r["F"], r["Q"]): r["ms"] for r in gradient_rows if r["variant"] == "paper"}
    out = {}
    for (change, algo) in PAPER_TABLE4:
        q = 1 if algo == "qk" else 0
        if change == "implicit→explicit":
            pair = ((algo, 1, 0, q), (algo, 0, 0, q))
        elif change == "H→FFT":
            pair = ((algo, 0, 0, 0), (algo, 0, 1, 0))
        else:
            pair = ((algo, 0, 0, 0), (algo, 0, 0, 1))
        if pair[0] in t and pair[1] in t:
            out[f"{change}/{algo}"] = t[pair[0]] / t[pair[1]]
    return out


def run_table11(config, quiet: bool) -> dict:
    d = 1 << config.table11.log2_d
    x = jax.random.normal(jax.random.key(0), (d,))
    out = {"D": d, "ms": {}}
    todo = [(label, name, opts, lm) for label, name, opts in TABLE11_MAPS for lm in sorted(config.table11.log2_ms)]
    too_slow: set[str] = set()  # maps whose call took longer than max_call_s: their time grows with m
    for label, name, options, log2_m in tqdm(todo, desc="table 11", disable=quiet):
        m = 1 << log2_m
        if label in too_slow or not _fits(name, options, m, d):
            continue
        sketch = sketching.get(name, m, **options)
        state = sketch.init(jax.random.key(1), x)
        t = median_time(jax.jit(sketch.apply), state, x, repeats=config.table11.repeats, budget_s=20.0)
        out["ms"].setdefault(label, {})[log2_m] = 1e3 * t["median_s"]
        if t["median_s"] > config.table11.max_call_s:
            too_slow.add(label)
    return out


def run_layers(task: GradientTask, config, quiet: bool) -> dict:
    gq, gt = task.flat_gradients(task.queries), task.flat_gradients(task.train)
    exact = gq.astype(np.float64) @ gt.astype(np.float64).T
    groups: dict[str, list[int]] = {}
    offset = 0
    spans = []
    for name, leaf in zip(task.names, task.sub):
        spans.append((offset, offset + leaf.size))
        groups.setdefault(layer_of(name), []).append(len(spans) - 1)
        offset += leaf.size
    iters = min(config.layers.num_iters, task.num_params)
    reference = _lanczos_top(task, iters)
    out = {"num_params": task.num_params, "layers": {}}
    for layer, leaf_ids in tqdm(groups.items(), desc=f"tables 1/5 ({task.name})", disable=quiet):
        cols = np.concatenate([np.arange(*spans[i]) for i in leaf_ids])
        r = pearson(gq[:, cols].astype(np.float64) @ gt[:, cols].astype(np.float64).T, exact)
        # Hessian restricted to this layer: the other parameters are held fixed.
        inner = [task.sub[i] for i in leaf_ids]

        def layer_loss(sub_layer, batch, _ids=tuple(leaf_ids)):
            full = list(task.sub)
            for i, leaf in zip(_ids, sub_layer):
                full[i] = leaf
            return task.sub_loss(full, batch)

        size = int(cols.size)
        err = float("nan")
        if size >= 10:
            values = _lanczos_top(task, min(iters, size), params=inner, loss=layer_loss)
            err = landscape.affine_relative_error(values, reference, 10)
        out["layers"][layer] = {"params": size, "r": r, "eig_err": err}
    m = 1 << config.layers.whole_model_log2_m
    rows = np.concatenate([gq, gt])
    for which in ("paper", "ours"):
        name, options = MAPS["afjl"][which]
        if m <= task.num_params and _fits(name, options, m, task.num_params):
            s = sketch_rows(name, options, m, 0, rows)
            out[f"whole_model_afjl_{which}_r"] = pearson(s[: len(gq)] @ s[len(gq):].T, exact)
    return out


def run_tda_cost(config, quiet: bool) -> dict:
    """Ratios keyed "<algo>/<which>/<mode>/<log2 m>/L<max_len>"; "gradient_ms" per max_len."""
    tc = config.tda_cost
    shortest = min(tc.max_lens)
    todo = [(a, w, e, lm, mode, length) for length in tc.max_lens for a, w, e in _variants(tc.maps)
            for mode in sketching.MODES if mode == "explicit" or length == shortest
            for lm in (tc.log2_ms if mode == "explicit" else tc.implicit_log2_ms)]
    out: dict[str, Any] = {"batch_size": tc.batch_size, "gradient_ms": {}, "ratio": {}}
    setups: dict[int, tuple] = {}
    for algo, which, (name, options), log2_m, mode, length in tqdm(todo, desc="TDA cost", disable=quiet):
        if length not in setups:  # the classifier's data at this sequence length, and the plain gradient's time
            c = classifier_configs.get_config("quick")
            c.seed, c.max_len = config.seed, length
            s = classifier.prepare(c)
            loss_fn = models_lib.make_loss_fns(s.model).loss_fn
            batch = data_lib.take(s.train_arrays, np.arange(tc.batch_size))
            grads = jax.jit(lambda p, b, _loss=loss_fn: sketching.per_example_gradients(_loss, p, b))
            base = median_time(grads, s.params, batch, repeats=tc.repeats)["median_s"]
            out["num_params"] = models_lib.count_params(s.params)
            out["gradient_ms"][str(length)] = 1e3 * base
            setups[length] = (loss_fn, s.params, batch, base)
        loss_fn, params, batch, base = setups[length]
        sketch = sketching.get(name, 1 << log2_m, **options)
        try:
            state = sketch.init(jax.random.key(0), params)
        except ValueError:
            continue
        fn = jax.jit(lambda st, p, b, _sk=sketch, _mode=mode, _loss=loss_fn: sketching.sketch_per_example_gradients(
            _sk, st, _loss, p, b, _mode))
        # a call slower than the budget is timed once (implicit mode at MiniLM's size: tens of seconds)
        t = median_time(fn, state, params, batch, repeats=tc.repeats, budget_s=30.0)["median_s"]
        out["ratio"][f"{algo}/{which}/{mode}/{log2_m}/L{length}"] = t / base
    return out


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

def _fmt(v, digits=2):
    if v is None:
        return "—"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


_STOPPED_NOTE = ("·: not computed, every threshold was already reached at a smaller m; "
                 "—: not computed, the map does not take this m at this D.")


def _search_cells(values: dict, grid, thresholds, above: bool) -> str:
    """One row of a search table: the value at each grid point, "·" past the point where the search stopped."""
    stopped = reached_all(values, thresholds, above)
    cells = ["·" if stopped and g not in values and g > max(values) else _fmt(values.get(g), 3) for g in grid]
    return " | ".join(cells)


def _triple(values):
    return " / ".join(_fmt(v) for v in values)


def _report_table6(results: dict, config) -> list[str]:
    lines = ["## Table 6: smallest log2 m with Pearson r ≥ 0.95 / 0.98 / 0.99", ""]
    grid = list(config.table6.log2_ms)
    lines.append(f"log2 m searched over {grid} (— : not reached within the grid), mean r over "
                 f"{config.table6.seeds} sketch seeds. Paper: GPT-2 (124M parameters) on a V100/TPU.")
    lines.append("")
    for model, res in results.items():
        lines += [f"**{model}** (D = {res['num_params']:,} parameters, {res['pairs']} pairs)", "",
                  "| algo | paper | ours, paper's map | ours, our variant |", "|---|---|---|---|"]
        for algo in config.maps:
            paper = PAPER_TABLE6.get(algo)
            mine = res["min_log2m"].get(f"{algo}/paper")
            var = res["min_log2m"].get(f"{algo}/ours")
            lines.append(f"| {algo} | {_triple(paper) if paper else '—'} | {_triple(mine) if mine else '—'} | "
                         f"{(_triple(var) + ' (' + VARIANT_NOTE[algo] + ')') if var else '—'} |")
        lines.append("")
        lines += ["r at each log2 m:", "", "| map | " + " | ".join(str(g) for g in grid) + " |",
                  "|---|" + "---|" * len(grid)]
        for key, rs in _in_variant_order(res["r"], config.maps):
            lines.append(f"| {key} | " + _search_cells(rs, grid, THRESHOLDS_R, above=True) + " |")
        lines += ["", _STOPPED_NOTE, ""]
    return lines


def _report_table7(res: dict, config) -> list[str]:
    lines = ["## Table 7: smallest log2 m with top-10 eigenvalue error < 0.2 / 0.1 / 0.05", "",
             f"Tiny LM Hessian (D = {res['num_params']:,}), Lanczos with {config.table7.num_iters} iterations, error "
             f"after the best orientation-preserving affine map; log2 m in {list(config.table7.log2_ms)}.", "",
             "| algo | paper | ours, paper's map | ours, our variant |", "|---|---|---|---|"]
    for algo in config.table7.maps:
        paper = PAPER_TABLE7.get(algo)
        mine, var = res["min_log2m"].get(f"{algo}/paper"), res["min_log2m"].get(f"{algo}/ours")
        lines.append(f"| {algo} | {_triple(paper) if paper else '—'} | {_triple(mine) if mine else '—'} | "
                     f"{_triple(var) if var else '—'} |")
    lines.append("")
    grid = list(config.table7.log2_ms)
    lines += ["| map | " + " | ".join(str(g) for g in grid) + " |", "|---|" + "---|" * len(grid)]
    for key, errs in _in_variant_order(res["error"], config.table7.maps):
        lines.append(f"| {key} | " + _search_cells(errs, grid, THRESHOLDS_EIG, above=False) + " |")
    return lines + ["", _STOPPED_NOTE, ""]


def _report_cost(res: dict, config) -> list[str]:
    c = config.cost.model
    lines = ["## Tables 3, 8, 9: cost of gradient and HVP sketches", "",
             f"CPU (2 cores), transformer LM with GPT-2's structure scaled to {c.num_layers} layers, "
             f"d_model {c.d_model}, vocabulary {c.vocab_size}, context {c.max_len}, batch {config.cost.batch_size}: "
             f"D = {res['num_params']:,} (GPT-2 small: 124M), m = 2^{config.cost.log2_m}. Time: median wall ms; memory: "
             f"XLA's compiled temporary buffers (MB), not a profiler peak. The plain gradient takes "
             f"{res['gradient_only_ms']:.1f} ms. Paper: V100 / TPUv2 ms and peak GB.", "",
             "| algo | I | F | Q | map | ours ms | ours temp MB | paper V100 ms | paper V100 GB | paper TPU ms | paper TPU GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["gradient"]:
        p = PAPER_TABLE8.get((r["algo"], r["I"], r["F"], r["Q"])) if r["variant"] == "paper" else None
        lines.append(f"| {r['algo']} | {r['I']} | {r['F']} | {r['Q']} | {r['variant']} | {r['ms']:.1f} | "
                     f"{r['temp_MB']:.1f} | " + " | ".join(_fmt(v, 1) for v in (p or (None,) * 4)) + " |")
    if res["hvp"]:
        lines += ["", "Table 9 (HVP sketches v ↦ Φ H Φᵀ v):", "",
                  "| algo | I | F | Q | ours ms | ours temp MB | paper V100 ms | paper V100 GB | paper TPU ms | paper TPU GB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["hvp"]:
            p = PAPER_TABLE9.get((r["algo"], r["I"], r["F"], r["Q"]))
            lines.append(f"| {r['algo']} | {r['I']} | {r['F']} | {r['Q']} | {r['ms']:.1f} | {r['temp_MB']:.1f} | "
                         + " | ".join(_fmt(v, 1) for v in (p or (None,) * 4)) + " |")
    ratios = table4_ratios(res["gradient"])
    lines += ["", "## Table 4: speed-up of one design change (time before / time after; paper: slowest / fastest)", "",
              "| change | algo | paper GPU | paper TPU | ours (CPU) |", "|---|---|---|---|---|"]
    for (change, algo), (gpu, tpu) in PAPER_TABLE4.items():
        lines.append(f"| {change} | {algo} | {gpu:.2f} | {tpu:.2f} | {_fmt(ratios.get(f'{change}/{algo}'))} |")
    return lines + [""]


def _report_table11(res: dict, config) -> list[str]:
    grid = list(config.table11.log2_ms)
    labels = [label for label, _, _ in TABLE11_MAPS if label in res["ms"]]
    lines = ["## Table 11 / Fig. 7: wall time (ms) of Φx vs m", "",
             f"CPU, D = 2^{config.table11.log2_d} (paper: GPT-2, V100). Paper columns: TRAK[CUDA] / AFFD / QK. "
             "—: not timed (the map does not take this m at this D, or it took over "
             f"{config.table11.max_call_s:g} s per call at a smaller m: its time only grows with m).", "",
             "| log2 m | paper TRAK / AFFD / QK | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for g in grid:
        p = PAPER_TABLE11.get(g)
        lines.append(f"| {g} | {_triple(p) if p else '—'} | " + " | ".join(_fmt(res['ms'][l].get(g), 1) for l in labels) + " |")
    return lines + [""]


def _report_layers(results: dict, config) -> list[str]:
    lines = ["## Tables 1 / 5: per-layer gradient dot products and Hessians vs the whole model", "",
             "Paper (GPT-2, Table 1): r / eig. err. per layer: " +
             ", ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in PAPER_TABLE1.items()) +
             "; whole-model AFJL reaches r = 0.98 at m = 2^13.", ""]
    for model, res in results.items():
        lines += [f"**{model}** (D = {res['num_params']:,})", "", "| layer | params | r | eig. err. |", "|---|---|---|---|"]
        for layer, v in res["layers"].items():
            lines.append(f"| {layer} | {v['params']:,} | {v['r']:.3f} | {_fmt(v['eig_err'], 3)} |")
        m = config.layers.whole_model_log2_m
        lines.append(f"| whole model, afjl m = 2^{m} (paper's map / our segsum) | {res['num_params']:,} | "
                     f"{_fmt(res.get('whole_model_afjl_paper_r'), 3)} / {_fmt(res.get('whole_model_afjl_ours_r'), 3)} | |")
        lines.append("")
    return lines


def _report_tda(res: dict, config) -> list[str]:
    tc = config.tda_cost
    ms = sorted(set(tc.log2_ms) | set(tc.implicit_log2_ms))
    lengths = sorted((int(n) for n in res["gradient_ms"]))  # the sequence lengths measured
    gradient = ", ".join(f"{res['gradient_ms'][str(n)]:.0f} ms at {n} tokens" for n in lengths)
    lines = ["## Per-example TDA cost: (per-example gradient + sketch) / per-example gradient", "",
             f"MiniLM (D = {res['num_params']:,}, real pretrained weights), batch {res['batch_size']}; per-example "
             f"gradients alone: {gradient}. The sketch's cost does not depend on the tokens per example, the "
             "gradient's grows with them, so the ratio falls with the sequence length. Target ≤ 1.25 for the "
             "best map.", "",
             "| map | mode | tokens | " + " | ".join(f"m = 2^{g}" for g in ms) + " |",
             "|---|---|---|" + "---|" * len(ms)]
    for length in lengths:
        for algo, which, _ in _variants(tc.maps):
            for mode in sketching.MODES:
                vals = [res["ratio"].get(f"{algo}/{which}/{mode}/{g}/L{length}") for g in ms]
                if any(v is not None for v in vals):
                    lines.append(f"| {algo} ({which}) | {mode} | {length} | " + " | ".join(_fmt(v) for v in vals) + " |")
    best = min(res["ratio"].items(), key=lambda kv: kv[1], default=None)
    if best is not None:
        algo, which, mode, log2_m, length = best[0].split("/")
        lines += ["", f"Best: {algo} ({which}), {mode}, m = 2^{log2_m}, {length[1:]} tokens: {best[1]:.2f} "
                  f"({'meets' if best[1] <= 1.25 else 'misses'} the target)."]
    return lines + [""]


def write_report(results: dict, config, workdir: Workdir, seconds: float,
                 section_seconds: dict[str, float] | None = None, resumed: list[str] | tuple = ()) -> None:
    lines = ["# The paper's sketch tables, reproduced on a CPU", "",
             "Three columns per table: the paper's number (Schioppa, NeurIPS 2024), ours with the paper's map "
             "(`sketching.get(name, m)`), ours with our variant of that map. Everything ran on a 2-core CPU in "
             f"{seconds / 60:.1f} min; models are scaled down as stated per table, so absolute "
             "times are not comparable with the paper's V100/TPU figures, only shapes and ratios are.", ""]
    if section_seconds:
        lines += ["Wall time per part: " + ", ".join(f"{k.replace('_', ' ')} {_duration(v)}"
                                                       for k, v in section_seconds.items()) + ".", ""]
    if resumed:
        lines += [f"Read from an earlier, interrupted run in this folder (same settings): {', '.join(resumed)}; "
                  "the total time above excludes them.", ""]
    if "table6" in results:
        lines += _report_table6(results["table6"], config)
    if "table7" in results:
        lines += _report_table7(results["table7"], config)
    if "cost" in results:
        lines += _report_cost(results["cost"], config)
    if "table11" in results:
        lines += _report_table11(results["table11"], config)
    if "layers" in results:
        lines += _report_layers(results["layers"], config)
    if "tda_cost" in results:
        lines += _report_tda(results["tda_cost"], config)
    atomic_write_text(workdir.file("report.md"), "\n".join(lines) + "\n")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _plots(results: dict, config, workdir: Workdir) -> None:
    if "table6" in results:
        panels = []
        for model, res in results["table6"].items():
            series = {k: ([2 ** int(x) for x, _ in sorted(v.items())], [1 - r for _, r in sorted(v.items())])
                      for k, v in _in_variant_order(res["r"], config.maps)}
            panels.append(Panel(title=model, xlabel="sketch dimension m", ylabel="1 − Pearson r", series=series))
        save_panel_grid(workdir.file("table6.png"), [panels], suptitle="Table 6: sketched vs exact gradient inner products",
                        panel_size=(max(6.5, 13.0 / len(panels)), 4.6))
    if "table7" in results:
        series = {k: ([2 ** int(x) for x, _ in sorted(v.items())], [e for _, e in sorted(v.items())])
                  for k, v in _in_variant_order(results["table7"]["error"], config.table7.maps)}
        save_panel_grid(workdir.file("table7.png"), [[Panel(title="tiny LM Hessian", xlabel="sketch dimension m",
                                                            ylabel="top-10 eigenvalue error", series=series)]],
                        suptitle="Table 7: sketched Lanczos", panel_size=(9.0, 4.6))
    if "table11" in results:
        series = {}
        for label, _, _ in TABLE11_MAPS:
            times = sorted(results["table11"]["ms"].get(label, {}).items())
            if times:
                series[label] = ([2 ** int(x) for x, _ in times], [t for _, t in times])
        save_panel_grid(workdir.file("table11.png"), [[Panel(title=f"D = 2^{config.table11.log2_d}, CPU",
                                                             xlabel="sketch dimension m", ylabel="wall time (ms)",
                                                             series=series)]],
                        suptitle="Fig. 7: dense projection vs affd vs qk", panel_size=(9.0, 4.6))


def _flat_summary(results: dict) -> dict:
    out = {}
    for model, res in results.get("table6", {}).items():
        for key, values in res["min_log2m"].items():
            for t, v in zip(THRESHOLDS_R, values):
                out[f"table6/{model}/{key}/min_log2m_r>={t}"] = float("nan") if v is None else float(v)
    for key, values in results.get("table7", {}).get("min_log2m", {}).items():
        for t, v in zip(THRESHOLDS_EIG, values):
            out[f"table7/{key}/min_log2m_err<{t}"] = float("nan") if v is None else float(v)
    if "cost" in results:
        for k, v in table4_ratios(results["cost"]["gradient"]).items():
            out[f"table4/{k}"] = v
    for k, v in results.get("tda_cost", {}).get("ratio", {}).items():
        out[f"tda_cost/{k}"] = v
    return out


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    quiet = bool(config.quiet)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    sections = tuple(config.sections)
    tasks = {}

    def task(name):
        if name not in tasks:
            tasks[name] = tiny_lm_task(config, quiet) if name == "tiny_lm" else minilm_task(config, quiet)
        return tasks[name]

    section_seconds: dict[str, float] = {}
    resumed = [section for section in sections if os.path.exists(_section_file(workdir, section))]
    pending = set(sections) - set(resumed)
    needed = set(config.table6.models if "table6" in pending else ()) | ({"tiny_lm"} if "table7" in pending else set())
    needed |= set(config.layers.models if "layers" in pending else ())
    for name in ("tiny_lm", "minilm"):  # built first, so each section's time is its own
        if name in needed:
            begin = time.perf_counter()
            task(name)
            section_seconds[f"build_{name}"] = time.perf_counter() - begin

    def timed(section, compute):
        """Runs a section and stores it in section_<name>.json, or reads it from there: an interrupted
        run resumes after its last finished section (the workdir's fingerprint guarantees the settings)."""
        path = _section_file(workdir, section)
        if section in resumed:
            stored = read_json(path)
            results[section], section_seconds[section] = _int_keyed(section, stored["result"]), stored["seconds"]
            return
        begin = time.perf_counter()
        results[section] = compute()
        section_seconds[section] = time.perf_counter() - begin
        atomic_write_json(path, {"seconds": section_seconds[section], "result": results[section]})

    if "table6" in sections:
        timed("table6", lambda: {task(m).name: run_table6(task(m), config, quiet) for m in config.table6.models})
    if "table7" in sections:
        timed("table7", lambda: run_table7(task("tiny_lm"), config, quiet))
    if "cost" in sections:
        timed("cost", lambda: run_cost(config, quiet))
    if "table11" in sections:
        timed("table11", lambda: run_table11(config, quiet))
    if "layers" in sections and config.layers.models:
        timed("layers", lambda: {task(m).name: run_layers(task(m), config, quiet) for m in config.layers.models})
    if "tda_cost" in sections:
        timed("tda_cost", lambda: run_tda_cost(config, quiet))
    seconds = time.perf_counter() - start
    atomic_write_json(workdir.file("results.json"), {"seconds": seconds, "section_seconds": section_seconds, **results})
    _plots(results, config, workdir)
    write_report(results, config, workdir, seconds, section_seconds, resumed)
    return {"seconds": seconds, **_flat_summary(results)}


def _section_file(workdir: Workdir, section: str) -> str:
    return workdir.file(f"section_{section}.json")


def _int_keyed(section: str, result: dict) -> dict:
    """A stored section's result with its log2 m keys back as ints (JSON object keys are strings)."""
    def by_log2_m(table: dict) -> dict:
        return {key: {int(log2_m): v for log2_m, v in inner.items()} for key, inner in table.items()}
    if section == "table6":
        for res in result.values():
            res["r"] = by_log2_m(res["r"])
    elif section == "table7":
        result["error"] = by_log2_m(result["error"])
    elif section == "table11":
        result["ms"] = by_log2_m(result["ms"])
    return result
