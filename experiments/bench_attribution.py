"""Attribution benchmark: EK-FAC, index build throughput, exact and approximate top-k (one run).

Sections (`config.sections`), every ratio taken between times measured in this run:

* `ekfac` — EK-FAC influence on digits (`attribution.ekfac`). The 1797 bundled 8×8 images are split
  train/test (`data.load_digits`); the training split is repeated to `num_train` examples, copy c of
  image i shifted by (dy, dx) ∈ [−max_shift, max_shift]² (zero fill) and given N(0, noise²) pixel
  noise, clipped to [0, 1], all from a seeded generator (copy 0 of each image is the original).
  An MLP 64 → hidden → 10 is trained with Adam (not timed). Timed: `fit_ekfac` (A, S, eigendecompositions,
  Λ; all Dense layers, sampled labels) and scoring — pairwise scores
  I(q, z) = Σ_ℓ ⟨(Ĝ_ℓ + λ_ℓ I)⁻¹ ∇_ℓ L(q), ∇_ℓ L(z)⟩ of every training example z against
  `num_queries` test digits (`per_example_layer_grads`, `EKFACFactors.ihvp`, `influence_scores` on
  `layer_activations` of each training batch, jitted once; the ragged last batch, if any, is padded
  to the batch shape and its padding rows dropped). Each is called twice: the first call includes
  compilation, the second is steady state; XLA compilations are counted in each call
  (`timing.CompileLog`). A third fit with `ragged_batch_size` (a last batch of another shape)
  counts the compilations a ragged batch costs. Compared with kronfluence's fit + scores on the same
  workload measured on this machine (`configs.bench_attribution.KRONFLUENCE_DIGITS_S`).
* `index_build` — per-example gradients of all-MiniLM-L6-v2 (+ a 2-class head; sentences of
  `data.make_text_classification` tokenised by its WordPiece tokenizer, padded to `seq_len`). Plain:
  `jax.jit(sketching.per_example_gradients)` on one batch (the per-example gradient PyTree, B×D
  numbers); sketched: `jax.jit(sketching.sketch_per_example_gradients)` with the same loss, params
  and batch, for each sketch at m; median times (`timing.median_time`) and overhead =
  time(sketched) / time(plain). Throughput: `build_index` over `num_sequences` sequences with
  `sketched_features_fn` (one shard per batch; its jit is warmed on one batch first), sequences/s
  including shard writing and checksums.
* `top_k` — `build_index` writes `num_rows` synthetic rows of dimension m (float16 storage by
  default) under the workdir (reused by a rerun with the same settings): "clustered" rows are
  c_j + ε with `num_clusters` centres c_j ~ N(0, I/m) and ‖ε‖ ≈ cluster_noise (queries drawn the
  same way), "gaussian" rows are N(0, I/m). `attribution.index.top_k` (exact) of `num_queries`
  queries is timed on a freshly opened index (first read: shard sha256 verification included) and
  again on the same object (verified: steady state, the median of `repeats` calls); peak RSS above the start of each call
  (`timing.PeakRSS`) is compared with the size of one shard (stored and decoded float32).
* `ann` — `attribution.ann.build_ann` over the same index (IVF by default) and `ann_top_k`:
  recall@k against the exact top-k, search time, speed-up = exact steady time / ANN search time,
  build time reported separately. Skipped, with a note in report.md, when faiss is not installed.

Outputs in the workdir: `metrics.jsonl` (one record per measurement), `report.md` (tables, printed
too), `summary.json` (flat numbers: `ekfac/...`, `index_build/...`, `top_k/...`, `ann/...`), and the
index folder `topk_index/` (delete it to free the disk; 2–4 GB at 10^6 rows).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import time
from typing import Any

import jax
import numpy as np

import sketching
from sketching.gradients import MODES
from attribution import ekfac
from attribution.index import STORAGE_DTYPES, GradientIndex, build_index, params_hash, sketched_features_fn, top_k
from configs.bench_attribution import SECTIONS
from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.timing import CompileLog, PeakRSS, median_time
from experiments.common.workdir import atomic_write_text

MB = 1 << 20
ANN_KINDS = ("ivf", "hnsw", "flat")
ANN_STORAGES = ("float32", "fp16")
DISTRIBUTIONS = ("clustered", "gaussian")
INDEX_MODELS = ("minilm", "transformer")
EKFAC_FIELDS = ("num_train", "num_queries", "hidden", "noise", "max_shift", "batch_size", "ragged_batch_size",
                "labels", "train_steps", "train_batch_size", "learning_rate", "reference_s", "target_speedup")
INDEX_FIELDS = ("model", "transformer", "seq_len", "batch_size", "num_sequences", "sketches", "m", "mode",
                "warmup", "repeats", "target_overhead")
TOPK_FIELDS = ("num_rows", "m", "num_queries", "k", "dtype", "shard_size", "distribution", "num_clusters",
               "cluster_noise", "repeats", "target_s")
ANN_FIELDS = ("kind", "nlist", "nprobe", "storage", "train_size", "hnsw_m", "ef_search", "target_recall")


# ---------------------------------------------------------------------------------------- config

def validate_config(config) -> None:
    """Every field at the boundary; ConfigError naming the field and the allowed values."""
    checks.require_sections(config, ("sections", "ekfac", "index_build", "top_k", "ann"))
    sections = checks.names_from("config.sections", config.sections, SECTIONS)
    checks.integer("config.seed", config.seed, 0)
    e = config.ekfac
    checks.check_fields("config.ekfac", e, EKFAC_FIELDS)
    checks.integer("config.ekfac.num_train", e.num_train, 2)
    checks.integer("config.ekfac.num_queries", e.num_queries, 1, 359)  # the digits' test split: 359 images
    if not isinstance(e.hidden, (list, tuple)):
        raise checks.ConfigError(f"config.ekfac.hidden={e.hidden!r}; allowed values: a tuple of layer widths")
    for width in e.hidden:
        checks.integer("config.ekfac.hidden entry", width)
    checks.number("config.ekfac.noise", e.noise, 0.0)
    checks.integer("config.ekfac.max_shift", e.max_shift, 0, 3)
    checks.integer("config.ekfac.batch_size", e.batch_size, 1, e.num_train)
    checks.integer("config.ekfac.ragged_batch_size", e.ragged_batch_size, 0, e.num_train)
    checks.one_of("config.ekfac.labels", e.labels, ekfac.LABELS)
    checks.integer("config.ekfac.train_steps", e.train_steps, 0)
    checks.integer("config.ekfac.train_batch_size", e.train_batch_size, 1, e.num_train)
    checks.number("config.ekfac.learning_rate", e.learning_rate, 0.0, low_open=True)
    checks.number("config.ekfac.reference_s", e.reference_s, 0.0, low_open=True)
    checks.number("config.ekfac.target_speedup", e.target_speedup, 0.0, low_open=True)
    b = config.index_build
    checks.check_fields("config.index_build", b, INDEX_FIELDS)
    checks.one_of("config.index_build.model", b.model, INDEX_MODELS)
    checks.check_fields("config.index_build.transformer", b.transformer, ("num_layers", "d_model", "num_heads",
                                                                          "mlp_ratio"))
    checks.integer("config.index_build.seq_len", b.seq_len, 4, 512)
    checks.integer("config.index_build.batch_size", b.batch_size)
    checks.integer("config.index_build.num_sequences", b.num_sequences, b.batch_size)
    names = checks.names_from("config.index_build.sketches", b.sketches, sketching.NAMES)
    checks.integer("config.index_build.m", b.m)
    checks.one_of("config.index_build.mode", b.mode, MODES)
    checks.integer("config.index_build.warmup", b.warmup)
    checks.integer("config.index_build.repeats", b.repeats)
    checks.number("config.index_build.target_overhead", b.target_overhead, 0.0, low_open=True)
    if "index_build" in sections:
        for name in names:
            sketching.get(name, b.m)  # option and m checks that need no template
    t = config.top_k
    checks.check_fields("config.top_k", t, TOPK_FIELDS)
    checks.integer("config.top_k.num_rows", t.num_rows, 2)
    checks.integer("config.top_k.m", t.m)
    checks.integer("config.top_k.num_queries", t.num_queries)
    checks.integer("config.top_k.k", t.k, 1, t.num_rows)
    checks.one_of("config.top_k.dtype", t.dtype, STORAGE_DTYPES)
    checks.integer("config.top_k.shard_size", t.shard_size)
    checks.one_of("config.top_k.distribution", t.distribution, DISTRIBUTIONS)
    checks.integer("config.top_k.num_clusters", t.num_clusters, 1, t.num_rows)
    checks.number("config.top_k.cluster_noise", t.cluster_noise, 0.0)
    checks.integer("config.top_k.repeats", t.repeats)
    checks.number("config.top_k.target_s", t.target_s, 0.0, low_open=True)
    a = config.ann
    checks.check_fields("config.ann", a, ANN_FIELDS)
    checks.one_of("config.ann.kind", a.kind, ANN_KINDS)
    checks.integer("config.ann.nlist", a.nlist, 1, t.num_rows)
    checks.integer("config.ann.nprobe", a.nprobe, 1, a.nlist)
    checks.one_of("config.ann.storage", a.storage, ANN_STORAGES)
    checks.integer("config.ann.train_size", a.train_size, a.nlist)
    checks.integer("config.ann.hnsw_m", a.hnsw_m)
    checks.integer("config.ann.ef_search", a.ef_search)
    checks.number("config.ann.target_recall", a.target_recall, 0.0, 1.0)
    if "ann" in sections and "top_k" not in sections:
        raise checks.ConfigError(f"config.sections={list(sections)}: 'ann' needs 'top_k' (its exact reference and "
                                 "its rows)")


# ----------------------------------------------------------------------------------------- EK-FAC

def augmented_digits(seed: int, num_train: int, noise: float, max_shift: int) -> tuple[dict, dict, dict]:
    """(train, test, description): the digits' training split repeated to `num_train` images, copy c ≥ 1
    of each shifted by a seeded (dy, dx) ∈ [−max_shift, max_shift]² with zero fill and given
    N(0, noise²) pixel noise, clipped to [0, 1]; copy 0 is the original. The test split is unchanged."""
    digits = data_lib.load_digits(seed)
    x, y = digits["train"]["x"], digits["train"]["y"]
    n = len(y)
    rng = np.random.default_rng([seed, 1])
    source = np.arange(num_train) % n
    copy = np.arange(num_train) // n
    shifts = rng.integers(-max_shift, max_shift + 1, size=(num_train, 2))
    shifts[copy == 0] = 0
    out = np.zeros((num_train,) + x.shape[1:], np.float32)
    padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    for i in range(num_train):
        dy, dx = shifts[i]
        r, c = max_shift - dy, max_shift - dx
        out[i] = padded[source[i], r:r + 8, c:c + 8]
    pixel_noise = rng.normal(0.0, noise, size=out.shape).astype(np.float32)
    pixel_noise[copy == 0] = 0.0
    out = np.clip(out + pixel_noise, 0.0, 1.0)
    description = (f"the {n} training images of sklearn's digits (of 1797; the other {len(digits['test']['y'])} are "
                   f"the test split) repeated {math.ceil(num_train / n)} times to {num_train}: copy 0 is the original, "
                   f"copy c ≥ 1 is shifted by (dy, dx) ∈ [−{max_shift}, {max_shift}]² pixels (zero fill) and gets "
                   f"N(0, {noise:g}²) pixel noise, clipped to [0, 1] (seeded numpy generator)")
    return {"x": out, "y": y[source].astype(np.int32)}, digits["test"], description


def build_random_model(name: str, key: jax.Array, example: dict, **options):
    """`models.build_model` for a randomly initialised model, with the init traced under one `jax.jit`
    (one compilation instead of one per operation of an eager init)."""
    built = {}

    def init(k):
        built["model"], params = models_lib.build_model(name, k, example, **options)
        return params

    params = jax.jit(init)(key)
    return built["model"], params


def _batches(arrays: dict, batch_size: int) -> list[dict]:
    n = len(arrays["y"])
    return [{k: v[s:s + batch_size] for k, v in arrays.items()} for s in range(0, n, batch_size)]


def _timed(fn, *args, **kwargs) -> tuple[Any, float, CompileLog]:
    """(result, wall seconds, compilations) of one call; the result is ready (block_until_ready)."""
    with CompileLog() as compiles:
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        seconds = time.perf_counter() - start
    return out, seconds, compiles


def make_ekfac_scorer(model, params, layers: dict, batch_size: int):
    """scores(factors, queries, train) -> (Q, N) float32 numpy: pairwise EK-FAC influence of every
    training example against every query, in batches of `batch_size` (the last one zero-padded to the
    batch shape, so one compilation serves every batch)."""
    apply_fn = model.apply
    task = model.task

    @jax.jit
    def query_grads(p, batch):
        return ekfac.per_example_layer_grads(apply_fn, p, batch, layers, task)

    @jax.jit
    def batch_scores(p, batch, preconditioned):
        acts, _ = ekfac.layer_activations(apply_fn, p, batch, layers, task)
        return ekfac.influence_scores(preconditioned, acts)

    def scores(factors, queries: dict, train: dict) -> np.ndarray:
        preconditioned = factors.ihvp(query_grads(params, queries))
        n = len(train["y"])
        out = []
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in train.items()}
            b = len(batch["y"])
            if b < batch_size:
                batch = {k: np.concatenate([v, np.zeros((batch_size - b,) + v.shape[1:], v.dtype)])
                         for k, v in batch.items()}
            out.append(np.asarray(batch_scores(params, batch, preconditioned))[:, :b])
        return np.concatenate(out, axis=1)

    return scores


def run_ekfac(config, workdir, log) -> tuple[dict, list[str]]:
    e = config.ekfac
    train, test, description = augmented_digits(config.seed, e.num_train, e.noise, e.max_shift)
    queries = {k: v[:e.num_queries] for k, v in test.items()}
    key = jax.random.key(config.seed)
    model, params = build_random_model("mlp", key, {k: v[:2] for k, v in train.items()},
                                       hidden=tuple(e.hidden), num_classes=10)
    loss_fn = models_lib.make_loss_fns(model).loss_fn
    if e.train_steps:
        optimizer = train_lib.make_optimizer("adam", e.learning_rate, e.train_steps)
        params = train_lib.train(loss_fn, params, optimizer, train_lib.batch_fn(train, e.train_batch_size, config.seed),
                                 e.train_steps, quiet=True, log_every=max(e.train_steps, 1)).params
    accuracy = float(np.mean(np.asarray(models_lib.per_example_correct(model, params, test))))
    batches = _batches(train, e.batch_size)
    fit = functools.partial(ekfac.fit_ekfac, model.apply, params, task="classification", layers=(r".*",),
                            seed=config.seed, labels=e.labels, progress=False)
    factors, fit1_s, fit1_c = _timed(fit, batches)
    _, fit2_s, fit2_c = _timed(fit, batches)
    scorer = make_ekfac_scorer(model, params, factors.layers, e.batch_size)
    scores1, score1_s, score1_c = _timed(scorer, factors, queries, train)
    scores2, score2_s, score2_c = _timed(scorer, factors, queries, train)
    if not np.array_equal(scores1, scores2):
        raise RuntimeError("EK-FAC scores differ between two identical scoring calls")
    if not np.all(np.isfinite(scores1)):
        raise RuntimeError("EK-FAC scores are not finite")
    summary = {
        "ekfac/num_train": e.num_train, "ekfac/num_queries": e.num_queries,
        "ekfac/num_params": models_lib.count_params(params), "ekfac/test_accuracy": accuracy,
        "ekfac/layers": ", ".join(f"{p} ({i.rows}×{i.out_dim})" for p, i in factors.layers.items()),
        "ekfac/batch_size": e.batch_size, "ekfac/num_batches": len(batches),
        "ekfac/fit_first_s": fit1_s, "ekfac/fit_second_s": fit2_s,
        "ekfac/score_first_s": score1_s, "ekfac/score_second_s": score2_s,
        "ekfac/fit_first_compiles": fit1_c.count, "ekfac/fit_second_compiles": fit2_c.count,
        "ekfac/fit_first_compile_s": fit1_c.seconds, "ekfac/fit_second_compile_s": fit2_c.seconds,
        "ekfac/score_first_compiles": score1_c.count, "ekfac/score_second_compiles": score2_c.count,
        "ekfac/score_first_compile_s": score1_c.seconds, "ekfac/score_second_compile_s": score2_c.seconds,
        "ekfac/scores_shape": f"{scores1.shape[0]}×{scores1.shape[1]}",
        "ekfac/reference_s": e.reference_s,
    }
    summary["ekfac/fit_steady_s"] = fit2_s - fit2_c.seconds  # the second fit without its compilations
    summary["ekfac/total_first_s"] = fit1_s + score1_s
    summary["ekfac/total_second_s"] = fit2_s + score2_s
    summary["ekfac/speedup_first"] = e.reference_s / summary["ekfac/total_first_s"]
    summary["ekfac/speedup_second"] = e.reference_s / summary["ekfac/total_second_s"]
    summary["ekfac/target_met"] = bool(summary["ekfac/speedup_first"] >= e.target_speedup)
    ragged_note = ""
    if e.ragged_batch_size:
        ragged = _batches(train, e.ragged_batch_size)
        shapes = sorted({len(b["y"]) for b in ragged})
        _, ragged_s, ragged_c = _timed(fit, ragged)
        summary.update({"ekfac/ragged_batch_size": e.ragged_batch_size, "ekfac/ragged_batch_shapes": len(shapes),
                        "ekfac/fit_ragged_s": ragged_s, "ekfac/fit_ragged_compiles": ragged_c.count,
                        "ekfac/fit_ragged_compile_s": ragged_c.seconds})
        ragged_note = (f"| fit, batch {e.ragged_batch_size} ({len(ragged)} batches, {len(shapes)} shapes: "
                       f"{', '.join(map(str, shapes))}) | {ragged_s:.2f} | {ragged_c.count} | {ragged_c.seconds:.2f} |")
    log("ekfac", **summary)
    s = summary
    lines = [
        "## EK-FAC fit + pairwise scores on digits",
        "",
        f"Data: {description}. Queries: the first {e.num_queries} test digits. Model: MLP "
        f"{' → '.join(map(str, (64, *e.hidden, 10)))} (ReLU; {s['ekfac/num_params']} parameters), Adam "
        f"{e.train_steps} steps, test accuracy {accuracy:.3f}. EK-FAC on every Dense layer ({s['ekfac/layers']}), "
        f"labels '{e.labels}', batches of {e.batch_size}; scores: all {e.num_train} training examples × "
        f"{e.num_queries} queries ({s['ekfac/scores_shape']}), as kronfluence's pairwise scores.",
        "",
        "| call | wall (s) | XLA compilations | compile (s) |",
        "|---|---|---|---|",
        f"| fit, first call | {fit1_s:.2f} | {fit1_c.count} | {fit1_c.seconds:.2f} |",
        f"| fit, second call | {fit2_s:.2f} | {fit2_c.count} | {fit2_c.seconds:.2f} |",
        f"| scores, first call | {score1_s:.2f} | {score1_c.count} | {score1_c.seconds:.2f} |",
        f"| scores, second call | {score2_s:.2f} | {score2_c.count} | {score2_c.seconds:.2f} |",
    ] + ([ragged_note] if ragged_note else []) + [
        "",
        f"fit + scores: **{s['ekfac/total_first_s']:.2f} s** first call (compilation included), "
        f"**{s['ekfac/total_second_s']:.2f} s** second call (its fit without compilation: "
        f"{s['ekfac/fit_steady_s']:.2f} s). kronfluence on the same workload, measured once on "
        f"this machine: {e.reference_s:g} s (quoted; kronfluence is not a dependency). Speed-up: "
        f"**{s['ekfac/speedup_first']:.1f}×** (first call), {s['ekfac/speedup_second']:.1f}× (second call); "
        f"target ≥ {e.target_speedup:g}×: **{'met' if s['ekfac/target_met'] else 'NOT met'}** (first call).",
    ]
    if fit2_c.count:
        lines += ["", f"`fit_ekfac` compiles again on a second call with the same shapes ({fit2_c.count} "
                      f"compilations, {fit2_c.seconds:.2f} s): it builds new jitted closures per call "
                      "(`_make_stats_fns`), so jax's in-memory jit cache never hits across calls (with the "
                      "persistent compilation cache on, these compilations become cheaper loads from disk)."]
    if e.ragged_batch_size and s["ekfac/ragged_batch_shapes"] > 1:
        extra = s["ekfac/fit_ragged_compiles"] - fit2_c.count
        lines += ["", f"A ragged last batch costs {extra:+d} compilations relative to the even second fit "
                      f"({s['ekfac/fit_ragged_compiles']} vs {fit2_c.count}: each jitted statistic is compiled once "
                      "per distinct batch shape); this benchmark's timed fits use batches that divide num_train."]
    return summary, lines


# ------------------------------------------------------------------------------------ index build

def text_batches(config, tokenizer, num: int) -> dict:
    b = config.index_build
    texts = data_lib.make_text_classification(config.seed, num_classes=2, num_train=num, num_test=1)["train"]
    enc = tokenizer(texts["texts"], padding="max_length", truncation=True, max_length=b.seq_len, return_tensors="np")
    return {"tokens": enc["input_ids"].astype(np.int32), "mask": enc["attention_mask"].astype(np.float32),
            "y": texts["labels"].astype(np.int32)}


def run_index_build(config, workdir, log) -> tuple[dict, list[str]]:
    from experiments.common.tokenizers import minilm_tokenizer

    b = config.index_build
    tokenizer = minilm_tokenizer()
    arrays = text_batches(config, tokenizer, b.num_sequences)
    key = jax.random.key(config.seed)
    example = {k: v[:2] for k, v in arrays.items()}
    if b.model == "minilm":
        model, params = models_lib.build_model("minilm", key, example, num_classes=2)
        model_label = "all-MiniLM-L6-v2 + 2-class head"
    else:
        model, params = build_random_model("transformer", key, example, vocab_size=tokenizer.vocab_size,
                                           max_len=b.seq_len, num_classes=2, **b.transformer.to_dict())
        model_label = f"random transformer {b.transformer.to_dict()}"
    num_params = models_lib.count_params(params)
    losses = models_lib.make_loss_fns(model)
    batch = {k: v[:b.batch_size] for k, v in arrays.items()}
    timing = dict(warmup=b.warmup, repeats=b.repeats)
    plain = jax.jit(functools.partial(sketching.per_example_gradients, losses.loss_fn))
    plain_t = median_time(plain, params, batch, **timing)
    summary: dict[str, Any] = {"index_build/model": model_label, "index_build/num_params": num_params,
                               "index_build/seq_len": b.seq_len, "index_build/batch_size": b.batch_size,
                               "index_build/m": b.m, "index_build/plain_s": plain_t["median_s"],
                               "index_build/plain_first_s": plain_t["first_call_s"],
                               "index_build/plain_seq_per_s": b.batch_size / plain_t["median_s"]}
    del plain
    rows = [f"| plain per-example gradients (B×D = {b.batch_size}×{num_params:,} floats) | "
            f"{plain_t['median_s']:.3f} | {plain_t['first_call_s']:.1f} | {b.batch_size / plain_t['median_s']:.2f} | 1× | — |"]
    met_all = True
    for i, name in enumerate(b.sketches):
        sketch = sketching.get(name, b.m)
        state = sketch.init(jax.random.fold_in(key, 100 + i), params)
        sketched = jax.jit(lambda st, p, x, sketch=sketch: sketching.sketch_per_example_gradients(
            sketch, st, losses.loss_fn, p, x, mode=b.mode))  # the state is an argument, as in sketched_features_fn
        t = median_time(sketched, state, params, batch, **timing)
        del sketched
        features = sketched_features_fn(sketch, state, losses.per_example_loss, params, arrays, mode=b.mode)
        features(np.arange(b.batch_size))  # compiles the index's jit (same batch shape as every shard)
        path = workdir.file(f"index_{name}")
        shutil.rmtree(path, ignore_errors=True)
        meta = {"sketch": name, "m": b.m, "sketch_seed": 100 + i, "checkpoint": params_hash(params)}
        start = time.perf_counter()
        build_index(path, features, b.num_sequences, meta=meta, shard_size=b.batch_size, progress=False)
        build_s = time.perf_counter() - start
        shutil.rmtree(path, ignore_errors=True)
        overhead = t["median_s"] / plain_t["median_s"]
        met = overhead <= b.target_overhead
        met_all &= met
        summary.update({f"index_build/{name}/sketched_s": t["median_s"], f"index_build/{name}/first_s": t["first_call_s"],
                        f"index_build/{name}/overhead": overhead,
                        f"index_build/{name}/build_s": build_s,
                        f"index_build/{name}/build_seq_per_s": b.num_sequences / build_s,
                        f"index_build/{name}/target_met": bool(met)})
        log(f"index_build/{name}", **{k: v for k, v in summary.items() if k.startswith(f"index_build/{name}/")})
        rows.append(f"| {name}, m = {b.m} | {t['median_s']:.3f} | {t['first_call_s']:.1f} | "
                    f"{b.batch_size / t['median_s']:.2f} | **{overhead:.2f}×** | {b.num_sequences / build_s:.2f} |")
    summary["index_build/target_met"] = bool(met_all)
    log("index_build", **{k: v for k, v in summary.items() if k.count("/") == 1})
    lines = [
        "## Index build: sketched vs plain per-example gradients",
        "",
        f"Model: {model_label}, D = {num_params:,} parameters; {b.batch_size} sentences per batch, "
        f"{b.seq_len} tokens (padded); sketching mode '{b.mode}'. Median of {b.repeats} timed calls after "
        f"{b.warmup} untimed (the first call compiles). Index build: `build_index` of {b.num_sequences} sequences, "
        f"one shard per batch, jit warmed first.",
        "",
        "| per-example gradients | median per batch (s) | first call (s) | sequences/s | overhead vs plain | index build (seq/s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Target: overhead ≤ {b.target_overhead:g}×: **{'met' if met_all else 'NOT met'}**"
        + ("" if met_all else " (" + ", ".join(f"{n}: {summary[f'index_build/{n}/overhead']:.2f}×"
                                                 for n in b.sketches) + ")") + ".",
    ]
    return summary, lines


# ------------------------------------------------------------------------------------------ top-k

def synthetic_rows(config, start: int, count: int, salt: int = 0) -> np.ndarray:
    """`count` rows (float32, (count, m)) of the configured distribution, a pure function of
    (seed, start, salt): clustered rows c_j + ε (centres ~ N(0, I/m), ‖ε‖ ≈ cluster_noise), or N(0, I/m)."""
    t = config.top_k
    rng = np.random.default_rng([config.seed, salt, start])
    noise = rng.standard_normal((count, t.m), dtype=np.float32) / np.float32(math.sqrt(t.m))
    if t.distribution == "gaussian":
        return noise
    centres = np.random.default_rng([config.seed, 7]).standard_normal((t.num_clusters, t.m), dtype=np.float32)
    centres /= np.float32(math.sqrt(t.m))
    labels = rng.integers(t.num_clusters, size=count)
    return centres[labels] + np.float32(t.cluster_noise) * noise


def run_top_k(config, workdir, log) -> tuple[dict, list[str], dict]:
    t = config.top_k
    path = workdir.file("topk_index")
    meta = {"sketch": "none", "m": t.m, "checkpoint": f"synthetic-{t.distribution}-seed{config.seed}",
            "num_clusters": t.num_clusters, "cluster_noise": t.cluster_noise}
    start = time.perf_counter()
    index = build_index(path, lambda idx: synthetic_rows(config, int(idx[0]), len(idx)), t.num_rows, meta=meta,
                        shard_size=t.shard_size, dtype=t.dtype, progress=not config.get("quiet", False))
    build_s = time.perf_counter() - start
    queries = synthetic_rows(config, 0, t.num_queries, salt=1)
    del index
    fresh = GradientIndex.open(path)
    with PeakRSS() as rss1:
        start = time.perf_counter()
        scores1, rows1 = top_k(fresh, queries, t.k)
        first_s = time.perf_counter() - start
    with PeakRSS() as rss2:  # steady state: the median of `repeats` calls after one more untimed call
        steady = median_time(lambda q: top_k(fresh, q, t.k), queries, warmup=1, repeats=t.repeats)
    second_s = steady["median_s"]
    scores2, rows2 = top_k(fresh, queries, t.k)
    if not (np.array_equal(rows1, rows2) and np.array_equal(scores1, scores2)):
        raise RuntimeError("two identical top_k calls returned different results")
    shard_rows = min(t.shard_size, t.num_rows)
    shard_stored = os.path.getsize(fresh._files[0])
    shard_f32 = shard_rows * t.m * 4
    summary = {
        "top_k/num_rows": t.num_rows, "top_k/m": t.m, "top_k/num_queries": t.num_queries, "top_k/k": t.k,
        "top_k/dtype": t.dtype, "top_k/index_bytes": fresh.nbytes, "top_k/num_shards": fresh.num_shards,
        "top_k/build_s": build_s, "top_k/first_s": first_s, "top_k/second_s": second_s,
        "top_k/first_rss_peak_mb": rss1.peak_delta_bytes / MB, "top_k/second_rss_peak_mb": rss2.peak_delta_bytes / MB,
        "top_k/shard_stored_mb": shard_stored / MB, "top_k/shard_float32_mb": shard_f32 / MB,
        "top_k/rows_per_s": t.num_rows / second_s,
    }
    summary["top_k/target_met"] = bool(second_s <= t.target_s)  # steady state
    summary["top_k/first_target_met"] = bool(first_s <= t.target_s)  # including the checksum pass
    summary["top_k/rss_over_shard_float32"] = max(rss1.peak_delta_bytes, rss2.peak_delta_bytes) / shard_f32
    log("top_k", **summary)
    s = summary
    lines = [
        "## Exact top-k over the stored rows",
        "",
        f"{t.num_rows:,} rows × m = {t.m}, {t.dtype} storage ({fresh.num_shards} shards of {shard_rows:,} rows, "
        f"{s['top_k/index_bytes'] / 2**30:.2f} GiB on disk, written by `build_index` in {build_s:.1f} s), "
        f"{t.distribution} synthetic rows"
        + (f" ({t.num_clusters} clusters, noise {t.cluster_noise:g})" if t.distribution == "clustered" else "")
        + f"; {t.num_queries} queries, k = {t.k}. The shards were just written, so they are read from the page cache.",
        "",
        "| call | wall (s) | peak RSS rise (MB) |",
        "|---|---|---|",
        f"| first (opens the index: every shard's sha256 verified) | {first_s:.2f} | {s['top_k/first_rss_peak_mb']:.0f} |",
        f"| steady state (median of {steady['repeats']} calls after a second untimed one) | {second_s:.2f} | "
        f"{s['top_k/second_rss_peak_mb']:.0f} |",
        "",
        f"One shard: {s['top_k/shard_stored_mb']:.0f} MB stored, {s['top_k/shard_float32_mb']:.0f} MB decoded "
        f"to float32; peak RSS rise / decoded shard = {s['top_k/rss_over_shard_float32']:.2f} (memory is bounded by a "
        f"shard, not by the {s['top_k/index_bytes'] / MB:.0f} MB index). Target ≤ {t.target_s:g} s: steady state "
        f"**{'met' if s['top_k/target_met'] else 'NOT met'}** ({second_s:.2f} s); first call with checksum "
        f"verification **{'met' if s['top_k/first_target_met'] else 'NOT met'}** ({first_s:.2f} s).",
    ]
    if t.num_rows < 1_000_000:
        lines += ["", f"This preset uses {t.num_rows:,} rows instead of the target's 10^6 (the time grows linearly in N)."]
    return summary, lines, {"index": fresh, "queries": queries, "exact_rows": rows1, "exact_s": second_s}


def run_ann(config, workdir, log, exact: dict) -> tuple[dict, list[str]]:
    from attribution import ann as ann_lib

    a, t = config.ann, config.top_k
    try:
        ann_lib.import_faiss()
    except ImportError as error:
        log("ann", **{"ann/skipped": str(error)})
        return {"ann/skipped": str(error)}, ["## Approximate top-k (FAISS)", "", f"Skipped: {error}."]
    index = exact["index"]
    start = time.perf_counter()
    with PeakRSS() as rss:
        ann = ann_lib.build_ann(index, kind=a.kind, nlist=a.nlist, nprobe=a.nprobe, storage=a.storage,
                                train_size=a.train_size, hnsw_m=a.hnsw_m, ef_search=a.ef_search, seed=config.seed)
    build_s = time.perf_counter() - start
    search = median_time(lambda q: ann_lib.ann_top_k(ann, q, t.k), exact["queries"], warmup=1, repeats=3)
    _, rows = ann_lib.ann_top_k(ann, exact["queries"], t.k)
    recall = float(np.mean([len(np.intersect1d(r, e)) / t.k for r, e in zip(rows, exact["exact_rows"])]))
    params = {"ivf": f"nlist = {ann.faiss_index.nlist}, nprobe = {ann.nprobe}, storage {a.storage}",
              "hnsw": f"M = {a.hnsw_m}, efSearch = {a.ef_search}", "flat": "exhaustive"}[a.kind]
    summary = {"ann/kind": a.kind, "ann/params": params, "ann/build_s": build_s, "ann/search_s": search["median_s"],
               "ann/exact_s": exact["exact_s"], "ann/speedup": exact["exact_s"] / search["median_s"],
               f"ann/recall@{t.k}": recall, "ann/memory_mb": rss.peak_delta_bytes / MB,
               "ann/target_met": bool(recall >= a.target_recall)}
    log("ann", **summary)
    lines = [
        "## Approximate top-k (FAISS)",
        "",
        f"`attribution.ann.build_ann` ({a.kind}, inner product; {params}) over the same {t.num_rows:,} rows; "
        f"build (k-means on {min(a.train_size, t.num_rows):,} strided rows + adding every row) {build_s:.1f} s, "
        f"peak RSS rise while building {summary['ann/memory_mb']:.0f} MB.",
        "",
        f"| retrieval | time for {t.num_queries} queries (s) | recall@{t.k} vs exact |",
        "|---|---|---|",
        f"| exact `top_k` (steady state) | {exact['exact_s']:.3f} | 1 |",
        f"| `ann_top_k` (median of {search['repeats']}) | {search['median_s']:.4f} | {recall:.3f} |",
        "",
        f"Speed-up {summary['ann/speedup']:.0f}× at recall@{t.k} = {recall:.3f}; target recall ≥ {a.target_recall:g}: "
        f"**{'met' if summary['ann/target_met'] else 'NOT met'}**. Recall depends on the rows' structure: these are "
        f"{t.distribution} synthetic rows; unclustered rows need nprobe close to nlist for the same recall.",
    ]
    return summary, lines


# --------------------------------------------------------------------------------------- the run

def run(config, workdir) -> dict:
    """Runs the configured sections, writes metrics.jsonl and report.md, prints the report."""
    validate_config(config)
    metrics = workdir.file("metrics.jsonl")
    if os.path.exists(metrics):  # records of an earlier run in this folder must not mix in
        os.remove(metrics)
    steps = iter(range(1000))

    def log(name: str, **values):
        workdir.log(next(steps), section=name, **values)

    cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    summary: dict[str, Any] = {"cpu_count": os.cpu_count(), "device": f"{jax.devices()[0].platform}",
                               "jax_version": jax.__version__, "compilation_cache": cache or "off"}
    cache_note = ("JAX's persistent compilation cache is off, so first calls compile from scratch." if not cache else
                  f"JAX's persistent compilation cache is on ({cache}): a first call may load programs an earlier "
                  "run compiled; for cold compile times run with GRADSKETCH_COMPILATION_CACHE=off.")
    sections = [f"# Attribution benchmark ({jax.devices()[0].platform}, {os.cpu_count()} CPU cores, jax "
                f"{jax.__version__}, preset '{config.preset}')", "",
                "Times are wall-clock on a shared machine (other processes may run at the same time); ratios "
                f"compare times measured in this run. {cache_note}"]
    exact = None
    for name in SECTIONS:
        if name not in config.sections:
            continue
        start = time.perf_counter()
        if name == "ekfac":
            part, lines = run_ekfac(config, workdir, log)
        elif name == "index_build":
            part, lines = run_index_build(config, workdir, log)
        elif name == "top_k":
            part, lines, exact = run_top_k(config, workdir, log)
        else:
            part, lines = run_ann(config, workdir, log, exact)
        part[f"{name}/section_s"] = time.perf_counter() - start
        summary.update(part)
        sections += ["", *lines]
        atomic_write_text(workdir.file("report.md"), "\n".join(sections) + "\n")  # partial report as it goes
    report = "\n".join(sections) + "\n"
    atomic_write_text(workdir.file("report.md"), report)
    print(report)
    print(f"Report: {workdir.file('report.md')}")
    return summary
