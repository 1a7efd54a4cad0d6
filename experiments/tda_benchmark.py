"""Experiment `tda_benchmark`: every attribution scorer × every sketch and m, with honest evaluation.

Tasks (configs/tda_benchmark.py):
- `digits_logreg`, `digits_mlp`: scikit-learn digits, logistic regression / one-hidden-layer MLP. The
  training objective is L(θ; w) = Σ_i w_i ℓ_i(θ) / Σ_i w_i + (c/2)‖θ‖² (w = training-subset mask),
  minimised by full-batch Adam with cosine decay in float64 from a fixed initialisation, so a retrained
  model is a deterministic function of the subset (and, for logreg, the unique optimum).
- `facts_lm`: the tiny transformer LM on planted facts (experiments/train_lm.py); the query output is
  f_q = −log p(answer | prompt) and the planting documents are the relevant training examples.

Scorers (attribution/scorers.py; sign: higher = more helpful), on exact gradients (`none`) and on the
features Φg of every sketch at every m (the index of attribution/index.py, built and timed):
- dot, cosine, unit: gradient similarity at the final model.
- tracin: Σ_t η_t ⟨g_t(z), g_t(x)⟩ over checkpoints t (digits: η_t = Σ of the scheduled learning rates
  since the previous checkpoint; LM: the kept training checkpoints).
- trak: the mean over an ensemble of E models of φ(z)(ΦᵀΦ + λI)⁻¹φ(x)ᵀ(1 − p(x)) with φ the output
  (margin) gradient. For softmax classification ∇ℓ = −(1 − p)∇f for the margin f = z_y − log Σ_{k≠y} e^{z_k},
  so φ = (sketched) ∇ℓ / (1 − p) (Park et al. 2023 eqs. 11–13). Digits: E independently initialised
  models; LM: one model and loss gradients (no margin for a sum-over-tokens loss).
- arnoldi: Σ_{i≤p} ⟨u_i, g_z⟩⟨u_i, g_x⟩/λ_i with the top-p Ritz pairs of H (none) or of ΦHΦᵀ (sketched)
  from `landscape.arnoldi` (Schioppa et al. 2022).
- exact_if: ⟨g_z, (H + λI)⁻¹ g_x⟩ by conjugate gradient on HVPs; sketched: ⟨Φg_z, (ΦHΦᵀ + λI)⁻¹ Φg_x⟩
  (the sketched influence extension).

Metrics (attribution/evaluate.py, ground truth cached by attribution/retrain.py):
- lds: R retrainings on random halves, Spearman(Σ_{j∈S} τ(z, x_j), −f_z(θ_S)) per query, averaged.
- loo: Pearson over training examples between τ(z, x_j) and f_z(θ_{−j}) − f_z(θ) for `loo_examples`
  left-out examples, averaged over queries (digits).
- brittle@k: fraction of correctly classified queries whose prediction flips after removing the k
  highest-scored training examples and retraining (Ilyas et al. 2022; digits, `brittleness_scorers`).
- recall@k, mrr: planted-fact retrieval (facts_lm).
- corr_vs_none: Pearson over all (query, train) pairs between a sketched scorer and the same scorer on
  exact gradients (how much the sketch changes the scores, per m).
- index build_s / size_bytes per sketch and m.
- layer selection (Experiment A): Pearson over all pairs between the dot score restricted to one
  layer's parameters and the whole-model dot score (and the exact IF on digits), against the same for a
  whole-model sketch at m = `layer_selection_m`.
Writes summary.json, report.md, tda_benchmark.png and per task the indexes and retraining caches.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


import sketching  # noqa: E402
from attribution import retrain, scorers  # noqa: E402
from attribution.decompose import per_layer_scores  # noqa: E402
from attribution.evaluate import lds, loo_correlation  # noqa: E402
from attribution.index import build_index, params_hash, sketched_features_fn  # noqa: E402
from configs.tda_benchmark import SCORERS, SKETCHES, TASKS  # noqa: E402
from experiments.common import config_checks as checks  # noqa: E402
from experiments.common import data as data_lib  # noqa: E402
from experiments.common import plots  # noqa: E402
from experiments.common import models as models_lib  # noqa: E402
from experiments.common import train as train_lib  # noqa: E402
from experiments.tasks import planted_lm  # noqa: E402
from attribution.evaluate import first_relevant_ranks, retrieval_metrics  # noqa: E402
from experiments.common.workdir import Workdir, atomic_write_text  # noqa: E402
from landscape import arnoldi  # noqa: E402
from landscape.lanczos import cast_to_layout, sketched_operator  # noqa: E402
from landscape.operators import hvp_fn  # noqa: E402
from sketching.gradients import sketch_per_example_gradients  # noqa: E402
from sketching.layout import Layout  # noqa: E402

PyTree = Any


# ----------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------

def validate_config(config) -> None:
    checks.names_from("config.tasks", config.tasks, TASKS)
    checks.names_from("config.scorers", config.scorers, SCORERS)
    checks.names_from("config.sketches", config.sketches, SKETCHES)
    checks.names_from("config.brittleness_scorers", config.brittleness_scorers, config.scorers)
    checks.names_from("config.layer_selection_sketches", config.layer_selection_sketches, SKETCHES)
    for m in tuple(config.sketch_dims) + tuple(config.facts_sketch_dims):
        checks.integer("config.sketch_dims[...]", m, 2)
    for name in ("sketch_dims", "facts_sketch_dims"):
        if config.sketch_dim not in tuple(config[name]):
            raise ValueError(f"config.sketch_dim={config.sketch_dim} must be one of {name}={tuple(config[name])}")
    if not 0 < config.cg_tol < 1:
        raise ValueError(f"config.cg_tol must be in (0, 1), got {config.cg_tol!r}")
    for name in ("tracin_checkpoints", "trak_models", "arnoldi_iters", "arnoldi_top", "cg_iters", "retrain_chunk",
                 "loo_examples", "layer_selection_m", "index_shard_size"):
        checks.integer(f"config.{name}", config[name])
    checks.integer("config.lds_subsets", config.lds_subsets, 2)
    checks.integer("config.brittleness_queries", config.brittleness_queries, 0)
    if config.facts_lds_subsets not in (0,) and (not isinstance(config.facts_lds_subsets, int) or config.facts_lds_subsets < 2):
        raise ValueError(f"config.facts_lds_subsets must be 0 (off) or an int >= 2, got {config.facts_lds_subsets!r}")
    if not 0 < config.lds_fraction < 1:
        raise ValueError(f"config.lds_fraction must be in (0, 1), got {config.lds_fraction!r}")
    if config.trak_ridge < 0:
        raise ValueError(f"config.trak_ridge must be >= 0, got {config.trak_ridge!r}")
    for task in TASKS:
        if config.if_damping.get(task, 0.0) < 0:
            raise ValueError(f"config.if_damping.{task} must be >= 0, got {config.if_damping[task]!r}")
    d = config.digits
    for name in ("num_train", "num_queries", "num_steps"):
        checks.integer(f"config.digits.{name}", d[name])
    if d.num_train > 1438 or d.num_queries > 359:
        raise ValueError(f"config.digits.num_train <= 1438 and num_queries <= 359 (the digits split), got "
                         f"{d.num_train}, {d.num_queries}")
    if "facts_lm" in config.tasks:
        planted_lm.validate_config(config.facts)


# ----------------------------------------------------------------------------------------------
# Tasks: a trained model plus everything the scorers and the ground truth need
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    name: str
    per_example_loss: Callable[[PyTree, dict], jax.Array]   # (params, batch) -> (B,)
    params: PyTree                                          # the model being explained
    train: dict                                             # training arrays (N examples)
    queries: dict                                           # query arrays (Q examples)
    checkpoints: list[tuple[PyTree, float]]                 # (params_t, η_t) for TracIn
    ensemble: list[PyTree]                                  # TRAK models (ensemble[0] is `params`)
    hvp: Callable[[PyTree], PyTree]                         # H of the training objective at `params`
    margin_weights: Callable[[PyTree, dict], jax.Array] | None  # 1 − p(y|x) (classification) or None
    outcomes: Callable[[np.ndarray], np.ndarray] | None     # masks (c, N) -> (c, 2Q): [losses, correct]
    relevant: list[tuple[int, ...]] | None                  # planting documents per query (facts)
    fingerprint: dict

    @property
    def num_train(self) -> int:
        return int(jax.tree_util.tree_leaves(self.train)[0].shape[0])

    @property
    def num_queries(self) -> int:
        return int(jax.tree_util.tree_leaves(self.queries)[0].shape[0])


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(tree))


def _digits_task(config, name: str) -> Task:
    """Digits + logreg/MLP, trained (and retrained on any subset mask) by full-batch Adam in float64."""
    d = config.digits
    data = data_lib.load_digits(config.seed)
    train = data_lib.take(data["train"], np.arange(d.num_train))
    queries = data_lib.take(data["test"], np.arange(d.num_queries))
    options = {"num_classes": 10} if name == "digits_logreg" else {"num_classes": 10, "hidden": tuple(d.mlp_hidden)}
    model_name = "logreg" if name == "digits_logreg" else "mlp"

    def init(seed):
        model, params = models_lib.build_model(model_name, jax.random.key(seed), data_lib.take(train, np.arange(2)),
                                               **options)
        return model, jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)

    model, params0 = init(config.seed)
    per_example_loss = models_lib.make_loss_fns(model).per_example_loss
    train_j = jax.tree_util.tree_map(jnp.asarray, train)
    queries_j = jax.tree_util.tree_map(jnp.asarray, queries)
    schedule = optax.cosine_decay_schedule(d.learning_rate, d.num_steps)
    optimizer = optax.adam(schedule)
    every = max(1, d.num_steps // config.tracin_checkpoints)
    ckpt_steps = np.arange(every, d.num_steps + 1, every)[: config.tracin_checkpoints]

    def objective(p, w):
        return jnp.sum(w * per_example_loss(p, train_j)) / jnp.sum(w) + 0.5 * d.weight_decay * _sq_norm(p)

    def fit(p_init, w):
        """Returns the final params and the params after every step in ckpt_steps (leading axis)."""
        def step(carry, _):
            p, s = carry
            updates, s = optimizer.update(jax.grad(objective)(p, w), s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p
        (p, _), trajectory = jax.lax.scan(step, (p_init, optimizer.init(p_init)), None, length=d.num_steps)
        return p, jax.tree_util.tree_map(lambda a: a[ckpt_steps - 1], trajectory)

    def query_outcome(p):
        losses = per_example_loss(p, queries_j)
        correct = models_lib.per_example_correct(model, p, queries_j).astype(jnp.float64)
        return jnp.concatenate([losses, correct])

    retrain_batch = jax.jit(jax.vmap(lambda w: query_outcome(fit(params0, w)[0])))

    ones = jnp.ones(d.num_train, jnp.float64)
    fit_all = jax.jit(fit)
    params, trajectory = fit_all(params0, ones)
    lr_per_step = np.asarray([schedule(t) for t in range(d.num_steps)], np.float64)
    bounds = np.concatenate([[0], ckpt_steps])
    checkpoints = [(jax.tree_util.tree_map(lambda a: a[i], trajectory), float(lr_per_step[bounds[i]:bounds[i + 1]].sum()))
                   for i in range(len(ckpt_steps))]
    ensemble = [params] + [fit_all(init(config.seed + 1000 * e)[1], ones)[0] for e in range(1, config.trak_models)]
    grad_norm = float(jnp.sqrt(_sq_norm(jax.grad(objective)(params, ones))))
    hessian_vp = jax.jit(lambda v: jax.jvp(lambda p: jax.grad(objective)(p, ones), (params,), (v,))[1])

    def margin_weights(p, batch):
        probs = jax.nn.softmax(model.apply(p, batch), axis=-1)
        return 1.0 - jnp.take_along_axis(probs, batch["y"][:, None], axis=1)[:, 0]

    fingerprint = {"task": name, "digits": config.digits.to_dict(), "seed": config.seed,
                   "params0": params_hash(params0)}
    print(f"[{name}] D={models_lib.count_params(params)}, N={d.num_train}, Q={d.num_queries}, "
          f"‖∇L(θ*)‖={grad_norm:.2e}")
    return Task(name, per_example_loss, params, train, queries, checkpoints, ensemble, hessian_vp, margin_weights,
                lambda masks: np.asarray(retrain_batch(jnp.asarray(masks))), None, fingerprint)


def _facts_task(config, wd: Workdir) -> Task:
    """The tiny LM on planted facts (trained or resumed in the workdir; TracIn on its kept checkpoints)."""
    cfg = config.facts
    folder = Workdir(wd.file("facts_lm/model"))
    s, result = planted_lm.setup_and_train(cfg, folder, quiet=config.get("quiet", False))
    loss_fns = models_lib.make_loss_fns(s.model)
    per_example_loss = loss_fns.per_example_loss
    opt_state = train_lib.optimizer_from_config(cfg.train).init(s.params)  # the checkpoints' template
    checkpoints = []
    previous = 0
    for step, path in train_lib.list_checkpoints(folder.file("checkpoints")):
        _, p, _ = train_lib.restore_checkpoint(path, s.params, opt_state)
        checkpoints.append((p, float(cfg.train.learning_rate) * (step - previous)))
        previous = step
    queries_j = jax.tree_util.tree_map(jnp.asarray, s.queries)
    correct = jax.jit(functools.partial(models_lib.per_example_correct, s.model))

    def outcomes(masks):
        rows = []
        for mask in masks:
            p = planted_lm.train_on_subset(cfg, s, np.flatnonzero(mask))
            rows.append(np.concatenate([np.asarray(per_example_loss(p, queries_j)),
                                        np.asarray(correct(p, queries_j), np.float64)]))
        return np.stack(rows)

    fingerprint = {"task": "facts_lm", "facts": cfg.to_dict(), "params0": params_hash(s.params)}
    print(f"[facts_lm] D={models_lib.count_params(result.params)}, N={len(s.corpus.documents)}, "
          f"Q={len(s.corpus.queries)}, query accuracy {result.eval_metrics.get('query_accuracy', float('nan')):.2f}")
    return Task("facts_lm", per_example_loss, result.params, s.train, s.queries, checkpoints, [result.params],
                jax.jit(hvp_fn(loss_fns.loss_fn, result.params, [s.train])), None,
                outcomes if config.facts_lds_subsets else None, [q.documents for q in s.corpus.queries], fingerprint)


# ----------------------------------------------------------------------------------------------
# Features: exact flattened gradients or sketched ones (through the on-disk index)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Features:
    """Per-example features of one representation (`none` or a sketch at m)."""
    train: np.ndarray                      # (N, m) at the final model
    queries: np.ndarray                    # (Q, m)
    per_checkpoint: list[tuple[np.ndarray, np.ndarray]]   # TracIn (queries, train) per checkpoint
    per_model: list[tuple[np.ndarray, np.ndarray]]        # TRAK (queries, train) per ensemble model
    operator: Callable[[jax.Array], jax.Array]            # H (none) or ΦHΦᵀ (sketched) on R^m (vmappable)
    arnoldi_sketch: Any                    # `sketch=` argument of landscape.arnoldi
    index_build: tuple[float, int] | None  # (build seconds, bytes) of the sketched index; None for `none`


def _loss_one(per_example_loss):
    """ℓ(θ, z) of one example (no batch axis), from the batched per-example loss."""
    def loss_one(p, example):
        return jnp.sum(per_example_loss(p, jax.tree_util.tree_map(lambda a: a[None], example)))
    return loss_one


def _blocks(fn, arrays, size: int = 256) -> np.ndarray:
    """fn over blocks of `size` examples, concatenated (bounds the memory of per-example gradients)."""
    n = int(jax.tree_util.tree_leaves(arrays)[0].shape[0])
    return np.concatenate([np.asarray(fn(data_lib.take(arrays, np.arange(i, min(i + size, n)))), np.float64)
                           for i in range(0, n, size)])


def _features(task: Task, sketch_name: str, m: int | None, wd: Workdir, config) -> Features:
    """Exact flattened gradients (`none`) or sketched ones; the final model's training features of a
    sketch go through the on-disk index (its build is timed and sized)."""
    layout = Layout.from_template(task.params)
    loss_one = _loss_one(task.per_example_loss)
    if sketch_name == "none":
        flat_grads = jax.jit(lambda p, batch: jax.vmap(lambda z: layout.flatten(jax.grad(loss_one)(p, z)))(batch))
        state = sketch = None
    else:
        sketch = sketching.get(sketch_name, m)
        state = sketch.init(jax.random.key(config.seed + 17), task.params)
        def loss_of_batch_of_one(p, batch):
            return jnp.sum(task.per_example_loss(p, batch))

        sketched = jax.jit(lambda st, p, batch: sketch_per_example_gradients(sketch, st, loss_of_batch_of_one, p, batch))

    def featurize(p, arrays, model: int = 0):
        """Features of `arrays` at params p; TRAK ensemble member `model` gets its own projection."""
        if sketch is None:
            return _blocks(lambda batch: flat_grads(p, batch), arrays)
        st = state if model == 0 else sketch.init(jax.random.key(config.seed + 17 + model), task.params)
        return _blocks(lambda batch: sketched(st, p, batch), arrays)

    if sketch is None:
        train = featurize(task.params, task.train)
        flat_hvp = jax.jit(lambda v: layout.flatten(task.hvp(layout.unflatten(v))))
        operator, arnoldi_sketch, index_build = flat_hvp, None, None
    else:
        path = wd.file(f"{task.name}/index/{sketch_name}_m{m}")
        timing_file = os.path.join(path, "build_time.json")
        start = time.perf_counter()
        index = build_index(path, sketched_features_fn(sketch, state, task.per_example_loss, task.params, task.train),
                            task.num_train, shard_size=config.index_shard_size, progress=False,
                            meta={"sketch": sketch_name, "m": m, "checkpoint": params_hash(task.params),
                                  "sketch_seed": config.seed + 17})
        if not os.path.exists(timing_file):  # a fresh build (a reopened index keeps its measured time)
            atomic_write_text(timing_file, json.dumps({"build_s": time.perf_counter() - start}))
        with open(timing_file) as f:
            index_build = (json.load(f)["build_s"], index.nbytes)
        train = index.load().astype(np.float64)
        operator, arnoldi_sketch = sketched_operator(task.hvp, sketch, state, layout), (sketch, state)
    queries = featurize(task.params, task.queries)
    per_model = [(queries, train)] + [(featurize(p, task.queries, e), featurize(p, task.train, e))
                                      for e, p in enumerate(task.ensemble[1:], start=1)]
    per_checkpoint = [(featurize(p, task.queries), featurize(p, task.train)) for p, _ in task.checkpoints]
    return Features(train=train, queries=queries, per_checkpoint=per_checkpoint, per_model=per_model,
                    operator=operator, arnoldi_sketch=arnoldi_sketch, index_build=index_build)


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def _arnoldi_pairs(task: Task, feats: Features, config) -> tuple[np.ndarray, np.ndarray]:
    dim = feats.train.shape[1]
    template = jnp.zeros(dim) if feats.arnoldi_sketch is None else task.params
    matvec = feats.operator if feats.arnoldi_sketch is None else task.hvp
    result = arnoldi(matvec, template, min(config.arnoldi_iters, dim - 1), jax.random.key(config.seed + 3),
                     sketch=feats.arnoldi_sketch)
    vectors = np.asarray(result.ritz_vectors(), np.float64)
    top = min(config.arnoldi_top, len(result.eigenvalues))
    return result.eigenvalues[:top], vectors[:top]


def _score_all(task: Task, feats: Features, config) -> dict[str, np.ndarray]:
    """{scorer: (Q, N) scores} for the configured scorers on one representation."""
    q, t = jnp.asarray(feats.queries), jnp.asarray(feats.train)
    out: dict[str, np.ndarray] = {}
    need_pairs = {"arnoldi", "exact_if"} & set(config.scorers)
    pairs = _arnoldi_pairs(task, feats, config) if need_pairs else None
    for name in config.scorers:
        if name in ("dot", "cosine", "unit"):
            out[name] = scorers.SCORERS[name](q, t)
        elif name == "tracin":
            out[name] = scorers.tracin_scores([c[0] for c in feats.per_checkpoint], [c[1] for c in feats.per_checkpoint],
                                              [lr for _, lr in task.checkpoints])
        elif name == "trak":
            out[name] = _trak(task, feats, config)
        elif name == "arnoldi":
            out[name] = scorers.arnoldi_influence_scores(q, t, *pairs)
        else:  # exact_if on (H + λI) in R^D, or on (ΦHΦᵀ + λI) in R^m for a sketch
            damping = config.if_damping.get(task.name, 0.0) * float(max(pairs[0][0], 0.0))
            out[name] = _inverse_operator(feats.operator, q, damping, config) @ t.T
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


_DENSE_LIMIT = 4096
_PINV_RTOL = 1e-10
_MATVEC_BATCH = 16  # HVPs vmapped at once (bounds the memory of batched HVPs through a network)


def _inverse_operator(operator, vectors: jax.Array, damping: float, config) -> jax.Array:
    """Rows of (A + λI)⁻¹ v: for dim ≤ 4096 A is formed from dim batched matvecs and inverted densely
    by eigendecomposition (a pseudo-inverse, safe for a singular or indefinite A); above that,
    conjugate gradient on blocks of rows."""
    dim = vectors.shape[1]
    if dim > _DENSE_LIMIT:
        return scorers.inverse_hvp(operator, vectors, damping=damping, tol=config.cg_tol, max_iters=config.cg_iters,
                                   batch_size=_MATVEC_BATCH)
    batched = jax.jit(jax.vmap(operator))
    eye = jnp.eye(dim, dtype=vectors.dtype)
    matrix = jnp.concatenate([batched(eye[i:i + _MATVEC_BATCH]) for i in range(0, dim, _MATVEC_BATCH)])
    matrix = np.asarray(0.5 * (matrix + matrix.T) + damping * eye, np.float64)
    # Pseudo-inverse: a sketch may leave directions of R^m unused (e.g. an SJLT row no coordinate
    # hashes to, or FJL rows that are dependent after truncating the padded transform), making
    # ΦHΦᵀ singular; those directions carry no gradient component and are dropped.
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    keep = np.abs(eigenvalues) > _PINV_RTOL * np.abs(eigenvalues).max()
    inverse = (eigenvectors[:, keep] / eigenvalues[keep]) @ eigenvectors[:, keep].T
    return jnp.asarray(np.asarray(vectors, np.float64) @ inverse)


def _trak(task: Task, feats: Features, config) -> np.ndarray:
    """TRAK with output-gradient features φ = g/(1 − p) and Q = diag(1 − p) (module docstring)."""
    queries, train, weights = [], [], []
    for (fq, ft), p in zip(feats.per_model, task.ensemble):
        if task.margin_weights is not None:
            wq = np.asarray(task.margin_weights(p, task.queries))
            wt = np.asarray(task.margin_weights(p, task.train))
            wq, wt = np.maximum(wq, 1e-12), np.maximum(wt, 1e-12)
            fq, ft = fq / wq[:, None], ft / wt[:, None]
        else:
            wt = np.ones(ft.shape[0])
        queries.append(jnp.asarray(fq))
        train.append(jnp.asarray(ft))
        weights.append(jnp.asarray(wt))
    ridge = config.trak_ridge * float(np.mean([np.sum(np.square(np.asarray(t))) for t in train])) / train[0].shape[1]
    return np.asarray(scorers.trak_scores(queries, train, damping=ridge, train_weights_per_model=weights))


def _pearson_all(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ----------------------------------------------------------------------------------------------
# Ground truth and metrics
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GroundTruth:
    lds_masks: np.ndarray | None = None
    lds_losses: np.ndarray | None = None       # (R, Q)
    loo_examples: np.ndarray | None = None
    loo_change: np.ndarray | None = None       # (Q, L) f_z(θ_{−j}) − f_z(θ)
    full_outcome: np.ndarray | None = None     # (2Q,) losses and correctness of the model trained on all


def _ground_truth(task: Task, config, wd: Workdir) -> GroundTruth:
    if task.outcomes is None:
        return GroundTruth()
    quiet = config.get("quiet", False)
    n, nq = task.num_train, task.num_queries
    folder = wd.file(f"{task.name}/retrain")
    subsets = config.lds_subsets if task.name != "facts_lm" else config.facts_lds_subsets
    masks = retrain.random_subset_masks(n, subsets, config.lds_fraction, seed=config.seed)
    outcome = retrain.retrain_outcomes(f"{folder}/lds", masks, task.outcomes, fingerprint=task.fingerprint,
                                       chunk_size=config.retrain_chunk, progress=not quiet,
                                       description=f"{task.name} LDS retraining")
    truth = GroundTruth(lds_masks=masks, lds_losses=outcome[:, :nq])
    if task.name == "facts_lm":
        return truth
    full = retrain.retrain_outcomes(f"{folder}/full", np.ones((1, n)), task.outcomes, fingerprint=task.fingerprint)[0]
    left_out = np.random.default_rng([config.seed, 5]).choice(n, min(config.loo_examples, n), replace=False)
    loo = retrain.retrain_outcomes(f"{folder}/loo", retrain.leave_one_out_masks(n, left_out), task.outcomes,
                                   fingerprint=task.fingerprint, chunk_size=config.retrain_chunk, progress=not quiet,
                                   description=f"{task.name} leave-one-out")
    truth.loo_examples = left_out
    truth.loo_change = (loo[:, :nq] - full[None, :nq]).T
    truth.full_outcome = full
    return truth


def _brittleness(task: Task, scores: dict, truth: GroundTruth, config, wd: Workdir) -> dict:
    """brittle@k per scorer: share of correctly classified queries flipped by removing their top-k."""
    nq = task.num_queries
    correct = np.flatnonzero(truth.full_outcome[nq:] > 0.5)[: config.brittleness_queries]
    ks = [k for k in config.brittleness_ks if k < task.num_train]
    out = {}
    if not len(correct) or not ks:
        return out
    for name in config.brittleness_scorers:
        masks = retrain.top_k_removal_masks(scores[name][correct], ks)
        outcome = retrain.retrain_outcomes(wd.file(f"{task.name}/retrain/brittle_{name}"), masks, task.outcomes,
                                           fingerprint={**task.fingerprint, "queries": correct.tolist()},
                                           chunk_size=config.retrain_chunk, progress=not config.get("quiet", False),
                                           description=f"{task.name} brittleness {name}")
        still_correct = outcome[:, nq:].reshape(len(correct), len(ks), nq)[np.arange(len(correct)), :, correct]
        for i, k in enumerate(ks):
            out[f"{name}/none/brittle@{k}"] = float(np.mean(still_correct[:, i] < 0.5))
    return out


def _metrics(task: Task, scores: np.ndarray, truth: GroundTruth) -> dict:
    out = {}
    if truth.lds_masks is not None:
        out["lds"] = lds(scores, truth.lds_masks, truth.lds_losses)
    if truth.loo_change is not None:
        out["loo"] = loo_correlation(scores[:, truth.loo_examples], truth.loo_change)
    if task.relevant is not None:
        out.update(retrieval_metrics(first_relevant_ranks(scores, task.relevant), (1, 10)))
    return out


# ----------------------------------------------------------------------------------------------
# Layer selection vs whole-model sketches (Experiment A)
# ----------------------------------------------------------------------------------------------

def _layer_selection(task: Task, exact_queries: np.ndarray, exact_train: np.ndarray, reference: dict[str, np.ndarray],
                     config) -> dict:
    """Pearson over all (query, train) pairs of single-layer dot scores and whole-model sketched dot
    scores against the whole-model references (dot, and exact IF where computed); the per-example
    gradients are the exact features, unflattened into parameter PyTrees."""
    layout = Layout.from_template(task.params)
    unflatten = jax.jit(jax.vmap(lambda flat: cast_to_layout(layout.unflatten(flat), layout)))
    train_grads = unflatten(jnp.asarray(exact_train))
    query_grads = unflatten(jnp.asarray(exact_queries))
    depth = 2 if task.name == "facts_lm" else 1
    per_layer = per_layer_scores(query_grads, train_grads, depth=depth)
    out = {}
    for layer, s in per_layer.items():
        for ref_name, ref in reference.items():
            out[f"layer_selection/{layer}/pearson_{ref_name}"] = _pearson_all(np.asarray(s), ref)
    m = config.layer_selection_m
    if m < layout.size:
        for name in config.layer_selection_sketches:
            sketch = sketching.get(name, m)
            state = sketch.init(jax.random.key(config.seed + 29), task.params)
            apply = jax.jit(jax.vmap(lambda g: sketch.apply(state, g)))
            s = np.asarray(apply(query_grads)) @ np.asarray(apply(train_grads)).T
            for ref_name, ref in reference.items():
                out[f"layer_selection/whole_{name}_m{m}/pearson_{ref_name}"] = _pearson_all(s, ref)
    return out


# ----------------------------------------------------------------------------------------------
# Driver, plots, report
# ----------------------------------------------------------------------------------------------

def _run_task(task: Task, config, wd: Workdir) -> dict:
    out: dict[str, float] = {}
    d = Layout.from_template(task.params).size
    truth = _ground_truth(task, config, wd)
    dims = config.facts_sketch_dims if task.name == "facts_lm" else config.sketch_dims
    representations = [("none", None)] + [(s, m) for s in config.sketches for m in dims if m < d]
    exact_scores: dict[str, np.ndarray] = {}
    exact_gradients = None  # (queries, train) flattened exact gradients, for the layer-selection study
    for sketch_name, m in representations:
        start = time.perf_counter()
        feats = _features(task, sketch_name, m, wd, config)

        def record(key: str, value: float) -> None:
            """`key@m<m>` for every sketched m, plus the bare key for `none` and the headline m."""
            if m is not None:
                out[f"{key}@m{m}"] = value
            if m in (None, config.sketch_dim):
                out[key] = value

        scores = _score_all(task, feats, config)
        for scorer, s in scores.items():
            metrics = _metrics(task, s, truth)
            if sketch_name == "none":
                exact_scores[scorer] = s
            else:
                metrics["corr_vs_none"] = _pearson_all(s, exact_scores[scorer])
            for metric, value in metrics.items():
                record(f"{scorer}/{sketch_name}/{metric}", value)
        if feats.index_build is None:
            exact_gradients = (feats.queries, feats.train)
        else:
            record(f"index/{sketch_name}/build_s", feats.index_build[0])
            record(f"index/{sketch_name}/size_bytes", feats.index_build[1])
        suffix = "" if m is None else f"@m{m}"
        print(f"[{task.name}] {sketch_name}{'' if m is None else f' m={m}'}: "
              + ", ".join(f"{k}={out.get(f'{k}/{sketch_name}/{_headline(task)}{suffix}', float('nan')):.3f}"
                          for k in scores) + f" ({time.perf_counter() - start:.1f} s)")
    if truth.full_outcome is not None and config.brittleness_queries:
        out.update(_brittleness(task, exact_scores, truth, config, wd))
    references = {"dot": exact_scores["dot"]} if "dot" in exact_scores else {}
    if "exact_if" in exact_scores:
        references["exact_if"] = exact_scores["exact_if"]
    if references:
        out.update(_layer_selection(task, *exact_gradients, references, config))
    return {f"{task.name}/{k}": float(v) for k, v in out.items()}


def _headline(task: Task) -> str:
    return "mrr" if task.relevant is not None else "lds"


def _plot(path: str, summary: dict, config) -> None:
    tasks = [t for t in config.tasks]
    fig, axes = plots.figure(len(tasks), 3, size=(18, 4.6 * len(tasks)))
    names = {"lds": "LDS", "mrr": "MRR"}
    for row, task in enumerate(tasks):
        metric = "mrr" if task == "facts_lm" else "lds"
        ax = axes[row, 0]
        reps = ["none"] + list(config.sketches)
        width = 0.8 / len(reps)
        for i, rep in enumerate(reps):
            values = [summary.get(f"{task}/{s}/{rep}/{metric}", np.nan) for s in config.scorers]
            ax.bar(np.arange(len(config.scorers)) + i * width, values, width,
                   label="exact gradients" if rep == "none" else rep)
        ax.set_xticks(np.arange(len(config.scorers)) + 0.4 - width / 2, config.scorers, rotation=30, ha="right")
        ax.set_ylabel(names[metric])
        ax.set_title(f"{task}: {names[metric]} per scorer (sketches at m = {config.sketch_dim})")
        plots.legend(ax, ncol=2)
        ax = axes[row, 1]
        curves = {}
        for sketch in config.sketches:
            ms = [m for m in sorted(set(config.sketch_dims) | set(config.facts_sketch_dims))
                  if f"{task}/dot/{sketch}/corr_vs_none@m{m}" in summary]
            curves[sketch] = (ms, [summary[f"{task}/dot/{sketch}/corr_vs_none@m{m}"] for m in ms])
        if max((len(ms) for ms, _ in curves.values()), default=0) >= 2:
            for i, (sketch, (ms, values)) in enumerate(curves.items()):
                ax.plot(ms, values, marker=plots.MARKERS[i % len(plots.MARKERS)], label=sketch, alpha=0.85)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sketch dimension m")
            ax.set_ylabel("Pearson(sketched dot, exact dot)")
            ax.set_title(f"{task}: sketch fidelity vs m")
            plots.legend(ax)
        else:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{task}: one sketch dimension only in this preset\n(fidelity per sketch: report.md)",
                    ha="center", va="center", transform=ax.transAxes)
        ax = axes[row, 2]
        prefix = f"{task}/layer_selection/"
        keys = sorted(k for k in summary if k.startswith(prefix) and k.endswith("/pearson_dot"))
        if len(keys) >= 2:
            ax.barh([k[len(prefix):-len("/pearson_dot")] for k in keys], [summary[k] for k in keys])
            ax.set_xlabel("Pearson with the whole-model exact dot")
            ax.set_title(f"{task}: single layer vs whole-model sketch")
        else:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{task}: layer selection not compared in this preset", ha="center", va="center",
                    transform=ax.transAxes)
    plots.save(fig, path)


def _report(summary: dict, config) -> str:
    lines = ["# TDA benchmark", "",
             f"Scorers on exact gradients (`none`) and sketches at m = {config.sketch_dim}. Higher is better for "
             "every metric. LDS: Spearman over retrainings on random halves; LOO: Pearson with leave-one-out "
             "loss changes; recall@10 / MRR: planted-fact retrieval.", ""]
    for task in config.tasks:
        metrics = ["recall@10", "mrr"] + (["lds"] if config.facts_lds_subsets else []) if task == "facts_lm" \
            else ["lds", "loo"]
        lines += [f"## {task}", "", "| scorer | sketch | " + " | ".join(metrics) + " | corr_vs_none |",
                  "|---|---|" + "---|" * (len(metrics) + 1)]
        for scorer in config.scorers:
            for rep in ["none"] + list(config.sketches):
                if f"{task}/{scorer}/{rep}/{metrics[0]}" not in summary:
                    continue
                vals = [summary.get(f"{task}/{scorer}/{rep}/{k}") for k in metrics + ["corr_vs_none"]]
                cells = ["—" if v is None or not np.isfinite(v) else f"{v:.3f}" for v in vals]
                if rep == "none":
                    cells[-1] = "(reference)"
                lines.append(f"| {scorer} | {rep} | " + " | ".join(cells) + " |")
        brittle = sorted(k for k in summary if k.startswith(f"{task}/") and "/brittle@" in k)
        if brittle:
            lines += ["", "Brittleness (share of correct queries flipped by removing the top-k and retraining): "
                      + ", ".join(f"{k[len(task) + 1:]} = {summary[k]:.2f}" for k in brittle)]
        layer = sorted(k for k in summary if k.startswith(f"{task}/layer_selection/"))
        if layer:
            lines += ["", "Layer selection (Pearson over all pairs with the whole-model reference): "
                      + ", ".join(f"{k[len(task) + 17:]} = {summary[k]:.3f}" for k in layer)]
        index = sorted(k for k in summary if k.startswith(f"{task}/index/") and "@" not in k)
        if index:
            lines += ["", "Index at the headline m: " + ", ".join(f"{k[len(task) + 7:]} = {summary[k]:.3g}" for k in index)]
        lines.append("")
    return "\n".join(lines)


def run(config, workdir: Workdir) -> dict:
    summary: dict[str, float] = {}
    for name in config.tasks:
        start = time.perf_counter()
        if name == "facts_lm":
            task = _facts_task(config, workdir)
            summary.update(_run_task(task, config, workdir))
        else:
            with jax.enable_x64(True):
                task = _digits_task(config, name)
                summary.update(_run_task(task, config, workdir))
        summary[f"{name}/wall_time_s"] = time.perf_counter() - start
    _plot(workdir.file("tda_benchmark.png"), summary, config)
    atomic_write_text(workdir.file("report.md"), _report(summary, config))
    print(f"report: {workdir.file('report.md')}; plot: {workdir.file('tda_benchmark.png')}")
    return summary
