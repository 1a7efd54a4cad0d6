"""Experiment `pbrf_benchmark`: every attribution method against the proximal Bregman response function.

Grosse et al. 2023 ("G23", §5.1, App. C) validate influence approximations by their correlation with
the PBRF (Bae et al. 2022; attribution/pbrf.py), which is what influence functions approximate for
networks not trained to convergence. Per task (the digits MLP `digits_mlp`; the tiny transformer LM on
planted facts `facts_lm`):

1. Train the model (digits: full-batch Adam on the L2-regularised mean loss, float64, deliberately
   not to convergence; LM: experiments/tasks/planted_lm.py). Everything below runs in float64.
   The parameters studied are all of them (digits) or the MLP matrices of every block (LM, G23 §3.1);
   the other parameters are held fixed by every method, the PBRF included.
2. Ground truth: the PBRF influence S(f_q, z_m) = −d f_q(θˢ(ε))/dε of `pbrf.num_candidates` training
   examples on the query losses f_q (`num_queries` held-out points / planted-fact queries), solved per
   example for ±ε (attribution/pbrf.py; heavy-ball SGD warm-started at θˢ with learning rate
   `lr_factor`/(λ_max(G) + λ), settings per task in `pbrf.<task>`; full-batch Bregman terms by
   default), stored per example in the workdir (a rerun resumes). One damping
   λ = `damping` × λ_max(G) (G the Gauss–Newton matrix of the mean training loss, top eigenvalue by
   power iteration) is used by the PBRF and by every damped method.
3. Methods, scored on the same (query, candidate) pairs, each timed (wall seconds on top of the shared
   per-example gradients, whose time is reported separately):
   gnh_if (∇fᵀ(G+λI)⁻¹∇L by CG: the PBRF's first-order value), exact_if (the Hessian H of the
   training loss instead of G, CG), lissa (attribution/lissa.py on mini-batch GNH products),
   ekfac / kfac (attribution/ekfac.py, damping λ), ekfac_heuristic (G23's 0.1 × mean Λ per layer),
   trak (one model, projected loss gradients, ridge), tracin (checkpoints along training),
   grad_dot / grad_cosine, sketched_cosine (`sketch` at `sketch_dim`), repr_dot / repr_cosine
   (final hidden state, Hanawa et al. 2021; attribution/baselines.py), ngram_cosine (LM only:
   bag-of-{1,2}-grams of the text).
4. Metrics: per query the Pearson and Spearman correlation with the PBRF over the candidates, averaged
   over queries (G23 App. C averages Pearson over 10 test points). The PBRF solves' relative
   residuals are reported, and gnh_if vs PBRF checks that the solves converged.
5. Beside the PBRF, the retraining ground truths on the same candidates (`counterfactual`, cached per
   run by attribution/retrain.py): leave-one-out of each candidate (Pearson / Spearman of the scores
   with f_q(θ_{−m}) − f_q(θ)) and the LDS of subsets that drop a random half of the candidates; the
   PBRF's own LOO correlation and LDS are reported as the reference (Bae et al. 2022: for networks
   not trained to convergence the two criteria differ). Digits retrains by full-batch Adam from the
   same initialisation; the LM retrains every parameter with the full run's batch order and the
   left-out documents weighted 0 (experiments/tasks/planted_lm.py `weighted_trainer`).
Writes summary.json (`<task>/<method>/{pearson,spearman,loo_pearson,loo_spearman,lds,seconds}`,
`<task>/pbrf/...`, `<task>/retrain/...`), report.md and pbrf_benchmark.png.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import sketching
import landscape
from attribution import baselines, ekfac, lissa, pbrf, retrain, scorers
from attribution.evaluate import lds, loo_correlation, spearman
from attribution.index import params_hash
from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import plots
from experiments.common import train as train_lib
from experiments.common.workdir import Workdir, atomic_write_text
from experiments.tasks import planted_lm

TASKS = ("digits_mlp", "facts_lm")
METHODS = ("gnh_if", "exact_if", "lissa", "ekfac", "kfac", "ekfac_heuristic", "trak", "tracin", "grad_dot",
           "grad_cosine", "sketched_cosine", "repr_dot", "repr_cosine", "ngram_cosine")
LM_LAYERS = (r"(.*/)?mlp_(in|out)",)
PyTree = Any

_TOP = {"experiment", "seed", "quiet", "tasks", "methods", "damping", "num_queries", "pbrf", "digits", "facts",
        "lissa", "cg_iters", "cg_tol", "trak_dim", "trak_ridge", "sketch", "sketch_dim", "power_iters",
        "ekfac_batch", "counterfactual"}
_PBRF = {"num_candidates", "epsilon", "num_steps", "optimizer", "lr_factor", "momentum", "batch_size",
         "chunk_size"}
_DIGITS = {"num_train", "hidden", "num_steps", "learning_rate", "weight_decay", "tracin_checkpoints"}
_LISSA = {"depth", "repeats", "batch_size", "scale_factor"}
_COUNTERFACTUAL = {"loo", "lds_subsets", "lds_fraction", "chunk_size"}


def validate_config(config) -> None:
    checks.check_fields("config", config, _TOP)
    checks.names_from("config.tasks", config.tasks, TASKS)
    checks.names_from("config.methods", config.methods, METHODS)
    checks.number("config.damping", config.damping, 0.0, low_open=True)
    checks.integer("config.num_queries", config.num_queries, 1)
    checks.check_fields("config.pbrf", config.pbrf, TASKS)
    for task in config.tasks:
        where, pc = f"config.pbrf.{task}", config.pbrf[task]
        checks.check_fields(where, pc, _PBRF)
        checks.integer(f"{where}.num_candidates", pc.num_candidates, 2)
        checks.number(f"{where}.epsilon", pc.epsilon, 0.0, low_open=True)
        checks.integer(f"{where}.num_steps", pc.num_steps, 1)
        checks.one_of(f"{where}.optimizer", pc.optimizer, ("sgd", "adam"))
        checks.number(f"{where}.lr_factor", pc.lr_factor, 0.0, low_open=True)
        checks.number(f"{where}.momentum", pc.momentum, 0.0, 1.0, high_open=True)
        if pc.batch_size is not None:
            checks.integer(f"{where}.batch_size", pc.batch_size, 1)
        checks.integer(f"{where}.chunk_size", pc.chunk_size, 1)
    checks.check_fields("config.digits", config.digits, _DIGITS)
    for name in ("num_train", "num_steps", "tracin_checkpoints"):
        checks.integer(f"config.digits.{name}", config.digits[name], 1)
    checks.check_fields("config.lissa", config.lissa, _LISSA)
    for name in ("depth", "repeats", "batch_size"):
        checks.integer(f"config.lissa.{name}", config.lissa[name], 1)
    checks.number("config.lissa.scale_factor", config.lissa.scale_factor, 0.0, low_open=True)
    for name in ("cg_iters", "trak_dim", "sketch_dim", "power_iters", "ekfac_batch"):
        checks.integer(f"config.{name}", config[name], 1)
    checks.one_of("config.sketch", config.sketch, sketching.names())
    cf = config.counterfactual
    checks.check_fields("config.counterfactual", cf, _COUNTERFACTUAL)
    checks.one_of("config.counterfactual.loo", cf.loo, (True, False))
    if cf.lds_subsets != 0:
        checks.integer("config.counterfactual.lds_subsets", cf.lds_subsets, 2)
    checks.number("config.counterfactual.lds_fraction", cf.lds_fraction, 0.0, 1.0, low_open=True, high_open=True)
    checks.integer("config.counterfactual.chunk_size", cf.chunk_size, 1)
    if "facts_lm" in config.tasks:
        planted_lm.validate_config(config.facts)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    name: str
    kind: str                                   # "classification" | "lm"
    apply: Callable[[PyTree, dict], jax.Array]  # full params -> logits
    params: PyTree                              # full parameters θˢ (float64)
    paths: tuple[str, ...]                      # studied Dense layers ('/'-joined module paths)
    train: dict
    queries: dict
    checkpoints: list[tuple[PyTree, float]]     # (full params, summed learning rate) for TracIn
    repr_module: tuple[str, str]                # (module path, 'input' | 'output') of the final hidden state
    texts: tuple[list[str], list[str]] | None   # (query texts, document texts) for n-grams
    fingerprint: dict
    retrain: Callable[[np.ndarray], np.ndarray]  # masks (K, N) -> query losses (K, Q) of K retrained models


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating)
                                  else jnp.asarray(a), tree)


def _output_loss(kind: str):
    """Per-example summed loss from logits (the matching loss of G23 §2.3)."""
    def loss(logits, batch):
        if kind == "classification":
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["tokens"][:, 1:])
        return jnp.sum(token * batch["loss_mask"][:, 1:], axis=1)
    return loss


def _digits_task(config) -> Task:
    d = config.digits
    data = data_lib.load_digits(config.seed)
    train = _to64(data_lib.take(data["train"], np.arange(d.num_train)))
    queries = _to64(data_lib.take(data["test"], np.arange(config.num_queries)))
    model, params0 = models_lib.build_model("mlp", jax.random.key(config.seed), data_lib.take(train, np.arange(2)),
                                            num_classes=10, hidden=tuple(d.hidden))
    params0 = _to64(params0)
    loss = _output_loss("classification")
    schedule = optax.cosine_decay_schedule(d.learning_rate, d.num_steps)
    opt = optax.adam(schedule)

    def objective(p, w):
        """Σ_j w_j L_j / Σ_j w_j + (wd/2)‖θ‖²: w = 1 is the run, a 0/1 mask a retraining without the zeros."""
        return jnp.sum(w * loss(model.apply(p, train), train)) / jnp.sum(w) + 0.5 * d.weight_decay * sum(
            jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(p))

    every = max(1, d.num_steps // d.tracin_checkpoints)

    def fit(p, w, keep_trajectory):
        def step(carry, _):
            p, s = carry
            updates, s = opt.update(jax.grad(objective)(p, w), s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), p if keep_trajectory else None
        (p, _), traj = jax.lax.scan(step, (p, opt.init(p)), None, length=d.num_steps)
        return p, traj

    ones = jnp.ones(d.num_train, jnp.float64)
    params, traj = jax.jit(fit, static_argnums=2)(params0, ones, True)
    retrain_batch = jax.jit(jax.vmap(lambda w: loss(model.apply(fit(params0, w, False)[0], queries), queries)))
    ckpt_steps = np.arange(every, d.num_steps + 1, every)[: d.tracin_checkpoints]
    lrs = np.asarray([schedule(t) for t in range(d.num_steps)])
    bounds = np.concatenate([[0], ckpt_steps])
    checkpoints = [(jax.tree_util.tree_map(lambda a: a[s - 1], traj), float(lrs[bounds[i]:bounds[i + 1]].sum()))
                   for i, s in enumerate(ckpt_steps)]
    grad_norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(jax.grad(objective)(params, ones)))))
    acc = float(jnp.mean(jnp.argmax(model.apply(params, queries), -1) == queries["y"]))
    print(f"[digits_mlp] D={models_lib.count_params(params)}, N={d.num_train}, ‖∇J(θˢ)‖={grad_norm:.2e}, "
          f"query accuracy {acc:.2f}")
    return Task("digits_mlp", "classification", model.apply, params, tuple(_dense_paths(params)), train, queries,
                checkpoints, ("head", "input"), None,
                {"task": "digits_mlp", "digits": d.to_dict(), "seed": config.seed, "params": params_hash(params)},
                lambda masks: np.asarray(retrain_batch(jnp.asarray(masks, jnp.float64)), np.float64))


def _dense_paths(params, prefix=""):
    for k, v in params.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) and "kernel" in v:
            yield path
        elif isinstance(v, dict):
            yield from _dense_paths(v, path)


def _facts_task(config, wd: Workdir) -> Task:
    cfg = config.facts
    folder = Workdir(wd.file("facts_lm/model"))
    s, result = planted_lm.setup_and_train(cfg, folder, quiet=config.get("quiet", False))
    opt_state = train_lib.optimizer_from_config(cfg.train).init(s.params)
    checkpoints, previous = [], 0
    for step, path in train_lib.list_checkpoints(folder.file("checkpoints")):
        _, p, _ = train_lib.restore_checkpoint(path, s.params, opt_state)
        checkpoints.append((p, float(cfg.train.learning_rate) * (step - previous)))
        previous = step
    q = min(config.num_queries, len(s.corpus.queries))
    paths = tuple(p for p in _dense_paths(result.params) if re.fullmatch(LM_LAYERS[0], p))
    texts = ([f"{x.prompt} {x.answer}" for x in s.corpus.queries[:q]], list(s.corpus.documents))
    per_example_loss = jax.jit(models_lib.make_loss_fns(s.model).per_example_loss)
    queries = data_lib.take(s.queries, np.arange(q))

    train_weighted = planted_lm.weighted_trainer(cfg, s)

    def retrain_lm(masks):
        """Every parameter retrained (float32, as the model was) with the masked documents' loss weighted 0
        and the full run's batch order kept (planted_lm.weighted_trainer)."""
        with jax.enable_x64(False):
            stacked = train_weighted(masks)
            return np.stack([np.asarray(per_example_loss(jax.tree_util.tree_map(lambda a: a[k], stacked), queries),
                                        np.float64) for k in range(len(masks))])
    print(f"[facts_lm] D={models_lib.count_params(result.params)} (all), N={len(s.corpus.documents)}, "
          f"Q={q}, query accuracy {result.eval_metrics.get('query_accuracy', float('nan')):.2f}")
    # trained in float32 (outside the float64 context); `_to64` is applied by `run` inside it
    return Task("facts_lm", "lm", s.model.apply, result.params, paths, s.train,
                queries, checkpoints, ("ln_final", "output"), texts,
                {"task": "facts_lm", "facts": cfg.to_dict(), "params": params_hash(result.params)}, retrain_lm)


# ----------------------------------------------------------------------------------------------
# The studied parameters as a pytree of their own
# ----------------------------------------------------------------------------------------------

def _get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _subset(task: Task, full=None) -> dict:
    full = task.params if full is None else full
    return {p: _get(full, p) for p in task.paths}


def _merge(task: Task, sub: dict, full=None) -> PyTree:
    full = task.params if full is None else full
    out = jax.tree_util.tree_map(lambda a: a, full)  # a copy of the containers
    out = _unfreeze(out)
    for p, v in sub.items():
        node = out
        keys = p.split("/")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = v
    return out


def _unfreeze(tree):
    return {k: _unfreeze(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _gnh_product(task: Task, sub, batch, v_tree, scale: float):
    """G v = scale · Σ_i J_iᵀ H_ŷ J_i v on `batch` (softmax cross-entropy; LM: masked tokens)."""
    def logits_fn(s):
        out = task.apply(_merge(task, s), batch)
        return out if task.kind == "classification" else out[:, :-1]

    logits, jv = jax.jvp(logits_fn, (sub,), (v_tree,))
    p = jax.nn.softmax(logits, axis=-1)
    hjv = p * jv - p * jnp.sum(p * jv, axis=-1, keepdims=True)
    if task.kind == "lm":
        hjv = hjv * batch["loss_mask"][:, 1:, None]
    _, vjp = jax.vjp(logits_fn, sub)
    return jax.tree_util.tree_map(lambda a: scale * a, vjp(hjv)[0])


# ----------------------------------------------------------------------------------------------
# One task: PBRF, every method, correlations
# ----------------------------------------------------------------------------------------------

def _timed(fn):
    start = time.perf_counter()
    out = np.asarray(fn(), np.float64)
    return out, time.perf_counter() - start


def _counterfactual_truth(task: Task, config, candidates: np.ndarray, wd: Workdir) -> dict:
    """Retraining ground truths on the PBRF's candidates, cached per run (attribution/retrain.py):
    leave-one-out f_q(θ_{−m}) − f_q(θ) for every candidate m (Q, C), and the LDS subsets: each keeps every
    non-candidate and a random `lds_fraction` of the candidates (masks (R, C) over the candidates, the
    query losses (R, Q)). Non-candidates are in every subset, so Σ_{j∈S} τ_j over the candidates is the
    LDS prediction up to a constant (Park et al. 2023 §2.2 restricted to the scored pool)."""
    cf = config.counterfactual
    n = int(jax.tree_util.tree_leaves(task.train)[0].shape[0])
    folder = wd.file(f"{task.name}/retrain")
    quiet = config.get("quiet", False)
    options = dict(fingerprint=task.fingerprint, chunk_size=cf.chunk_size, progress=not quiet)
    start = time.perf_counter()
    full = retrain.retrain_outcomes(f"{folder}/full", np.ones((1, n)), task.retrain, fingerprint=task.fingerprint)[0]
    out: dict = {"full": full}
    if cf.loo:
        loo = retrain.retrain_outcomes(f"{folder}/loo", retrain.leave_one_out_masks(n, candidates), task.retrain,
                                       description=f"{task.name} leave-one-out retraining", **options)
        out["loo_change"] = (loo - full[None]).T
    if cf.lds_subsets:
        keep = retrain.random_subset_masks(len(candidates), cf.lds_subsets, cf.lds_fraction, seed=config.seed)
        masks = np.ones((cf.lds_subsets, n))
        masks[:, candidates] = keep
        out["lds_masks"] = keep
        out["lds_losses"] = retrain.retrain_outcomes(f"{folder}/lds", masks, task.retrain,
                                                     description=f"{task.name} LDS retraining", **options)
    out["seconds"] = time.perf_counter() - start
    return out


def _counterfactual_metrics(scores: np.ndarray, truth: dict) -> dict:
    """Pearson / Spearman with the leave-one-out changes and the LDS of (Q, C) scores."""
    out = {}
    if "loo_change" in truth:
        out["loo_pearson"] = loo_correlation(scores, truth["loo_change"])
        out["loo_spearman"] = loo_correlation(scores, truth["loo_change"], method="spearman")
    if "lds_masks" in truth:
        out["lds"] = lds(scores, truth["lds_masks"], truth["lds_losses"])
    return out


def _correlations(scores: np.ndarray, truth: np.ndarray) -> dict:
    pearson = [np.corrcoef(a, b)[0, 1] if np.std(a) > 0 and np.std(b) > 0 else np.nan for a, b in zip(scores, truth)]
    rho = np.asarray(spearman(scores, truth), np.float64)
    return {"pearson": float(np.nanmean(pearson)), "spearman": float(np.nanmean(rho)),
            "pearson_sem": float(np.nanstd(pearson) / math.sqrt(max(1, np.isfinite(pearson).sum())))}


def _run_task(task: Task, config, wd: Workdir) -> dict:
    quiet = config.get("quiet", False)
    loss = _output_loss(task.kind)
    n = int(jax.tree_util.tree_leaves(task.train)[0].shape[0])
    rng = np.random.default_rng([config.seed, 11])
    pc = config.pbrf[task.name]
    candidates = np.sort(rng.choice(n, min(pc.num_candidates, n), replace=False))
    cand = data_lib.take(task.train, candidates)
    sub = _subset(task)
    flat0, unravel = ravel_pytree(sub)
    dim = int(flat0.size)
    out: dict = {"num_params": dim, "num_train": n, "num_candidates": len(candidates),
                 "num_queries": int(task.queries[next(iter(task.queries))].shape[0])}

    def per_example_grads(full, batch, block=32):
        g = jax.jit(jax.vmap(jax.grad(lambda s, ex: jnp.sum(loss(task.apply(_merge(task, s, full),
                                                                            jax.tree_util.tree_map(lambda a: a[None], ex)),
                                                                 jax.tree_util.tree_map(lambda a: a[None], ex)))),
                             (None, 0)))
        m = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
        rows = []
        for i in range(0, m, block):
            tree = g(_subset(task, full), data_lib.take(batch, np.arange(i, min(i + block, m))))
            rows.append(np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree)))
        return np.concatenate(rows)

    start = time.perf_counter()
    gq, gt = per_example_grads(task.params, task.queries), per_example_grads(task.params, cand)
    out["shared_gradients_seconds"] = time.perf_counter() - start

    gnh_full = jax.jit(lambda v: ravel_pytree(_gnh_product(task, sub, task.train, unravel(v), 1.0 / n))[0])
    lam_max = landscape.top_eigenvalue(gnh_full, dim, num_iters=config.power_iters, key=jax.random.key(config.seed),
                                       estimate="rayleigh", dtype=jnp.float64)
    lam = float(config.damping * lam_max)
    out.update(lambda_max_gnh=lam_max, damping=lam)
    print(f"[{task.name}] λ_max(G)={lam_max:.3g}, λ={lam:.3g}, D={dim}, candidates={len(candidates)}")

    # Ground truth: the PBRF, stored per example.
    outputs_fn = lambda s, b: task.apply(_merge(task, s), b)  # noqa: E731

    def measurement(s):
        return loss(outputs_fn(s, task.queries), task.queries)

    start = time.perf_counter()
    res = pbrf.pbrf_influence(outputs_fn, loss, sub, task.train, measurement, candidates, damping=lam,
                              epsilon=pc.epsilon, num_steps=pc.num_steps, optimizer=pc.optimizer,
                              learning_rate=pc.lr_factor / (lam_max + lam) if pc.optimizer == "sgd" else pc.lr_factor,
                              momentum=pc.momentum, batch_size=None if pc.batch_size is None else min(pc.batch_size, n),
                              chunk_size=pc.chunk_size,
                              seed=config.seed, store=wd.file(f"{task.name}/pbrf"), fingerprint=task.fingerprint,
                              quiet=quiet)
    out["pbrf/seconds"] = time.perf_counter() - start
    out["pbrf/residual_median"] = float(np.median(res.residuals))
    out["pbrf/residual_max"] = float(np.max(res.residuals))
    truth = res.scores
    counterfactual: dict = {}
    if config.counterfactual.loo or config.counterfactual.lds_subsets:
        counterfactual = _counterfactual_truth(task, config, candidates, wd)
        out["retrain/seconds"] = counterfactual["seconds"]
        if "loo_change" in counterfactual:
            out["retrain/loo_change_rms"] = float(np.sqrt(np.mean(counterfactual["loo_change"] ** 2)))
        for k, v in _counterfactual_metrics(truth, counterfactual).items():
            out[f"pbrf/{k}"] = v

    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    methods = [m for m in config.methods if not (m == "ngram_cosine" and task.texts is None)]
    qv = jnp.asarray(gq)
    shared_kfac = None  # the fit and the layer gradients / activations serve ekfac, kfac and ekfac_heuristic
    for method in methods:
        if method == "gnh_if":
            fn = lambda: scorers.influence_scores(qv, gt, gnh_full, damping=lam, tol=config.cg_tol,  # noqa: E731
                                                  max_iters=config.cg_iters)
        elif method == "exact_if":
            def hvp(v):
                g = jax.grad(lambda s: jnp.mean(loss(outputs_fn(s, task.train), task.train)))
                return ravel_pytree(jax.jvp(g, (sub,), (unravel(v),))[1])[0]
            fn = lambda: scorers.influence_scores(qv, gt, jax.jit(hvp), damping=lam, tol=config.cg_tol,  # noqa: E731
                                                  max_iters=config.cg_iters)
        elif method == "lissa":
            lc = config.lissa
            bsz = min(lc.batch_size, n)

            def sample_hvp(key, v):
                idx = jax.random.choice(key, n, (bsz,), replace=False)
                batch = jax.tree_util.tree_map(lambda a: a[idx], task.train)
                return ravel_pytree(_gnh_product(task, sub, batch, unravel(v), 1.0 / bsz))[0]

            fn = lambda: scorers.influence_scores(  # noqa: E731
                qv, gt, gnh_full, damping=lam, solver="lissa",
                lissa={"scale": lc.scale_factor * (lam_max + lam), "depth": lc.depth, "repeats": lc.repeats,
                       "sample_hvp": sample_hvp, "seed": config.seed})
        elif method in ("ekfac", "kfac", "ekfac_heuristic"):
            if shared_kfac is None:  # timed once, charged to each of the three (its compilation included)
                start = time.perf_counter()
                shared_kfac = _ekfac_shared(task, config, cand)
                out["kfac_shared/seconds"] = time.perf_counter() - start
            fn = _ekfac_fn(shared_kfac, lam, method)
        elif method == "trak":
            def fn():
                proj = np.random.default_rng([config.seed, 5]).normal(size=(dim, config.trak_dim)) / math.sqrt(
                    config.trak_dim)
                pq, pt = gq @ proj, gt @ proj
                ridge = config.trak_ridge * np.trace(pt.T @ pt) / config.trak_dim
                return scorers.trak_scores([pq], [pt], damping=ridge)
        elif method == "tracin":
            def fn():
                return sum(lr * per_example_grads(p, task.queries) @ per_example_grads(p, cand).T
                           for p, lr in task.checkpoints)
        elif method == "grad_dot":
            fn = lambda: scorers.dot_scores(gq, gt)  # noqa: E731
        elif method == "grad_cosine":
            fn = lambda: scorers.cosine_scores(gq, gt)  # noqa: E731
        elif method == "sketched_cosine":
            def fn():
                sk = sketching.get(config.sketch, config.sketch_dim)
                st = sk.init(jax.random.fold_in(jax.random.key(config.seed), 3), sub)
                apply_all = jax.jit(jax.vmap(lambda v: sk.apply(st, unravel(v))))
                return scorers.cosine_scores(apply_all(jnp.asarray(gq)), apply_all(jnp.asarray(gt)))
        elif method in ("repr_dot", "repr_cosine"):
            def fn(kind=method.split("_")[1]):
                module, which = task.repr_module
                rq = baselines.hidden_states(task.apply, task.params, task.queries, module, which=which)
                rt = baselines.hidden_states(task.apply, task.params, cand, module, which=which)
                return baselines.representation_scores(rq, rt, kind=kind)
        else:  # ngram_cosine
            def fn():
                qt, docs = task.texts
                return baselines.ngram_scores(qt, [docs[i] for i in candidates], n=(1, 2))
        try:
            scores[method], seconds[method] = _timed(fn)
            if method in ("ekfac", "kfac", "ekfac_heuristic"):
                out[f"{method}/own_seconds"] = seconds[method]
                seconds[method] += out["kfac_shared/seconds"]
        except lissa.LiSSADivergenceError as error:
            out[f"{method}/error"] = str(error).split(".")[0]
            print(f"[{task.name}] {method}: {out[f'{method}/error']}")
            continue
        for k, v in _correlations(scores[method], truth).items():
            out[f"{method}/{k}"] = v
        for k, v in _counterfactual_metrics(scores[method], counterfactual).items():
            out[f"{method}/{k}"] = v
        out[f"{method}/seconds"] = seconds[method]
        if not quiet:
            extra = "".join(f" {k} {out[f'{method}/{k}']:+.3f}" for k in ("loo_pearson", "lds") if f"{method}/{k}" in out)
            print(f"[{task.name}] {method:16s} pearson {out[f'{method}/pearson']:+.3f} spearman "
                  f"{out[f'{method}/spearman']:+.3f}{extra}  {seconds[method]:.2f} s")
    return out


@dataclasses.dataclass
class _KFACShared:
    fit: ekfac.EKFACFactors
    query_grads: dict    # per studied layer, the queries' per-example layer gradients
    activations: Any     # the candidates' layer inputs / output gradients


def _ekfac_shared(task: Task, config, cand: dict) -> _KFACShared:
    """What ekfac, kfac and ekfac_heuristic share: the fit (K-FAC factors, float64 eigendecompositions and
    the EK-FAC Λ of the studied layers; exact GGN labels for the classifier, sampled labels for the LM,
    G23 §2.3), the queries' layer gradients and the candidates' layer activations."""
    n = int(jax.tree_util.tree_leaves(task.train)[0].shape[0])
    chunks = np.array_split(np.arange(n), max(1, math.ceil(n / config.ekfac_batch)))
    batches = [data_lib.take(task.train, c) for c in chunks]
    labels = "exact" if task.kind == "classification" else "sampled"
    layers = tuple(f"^{re.escape(p)}$" for p in task.paths)
    fit = ekfac.fit_ekfac(task.apply, task.params, batches, task=task.kind, layers=layers, seed=config.seed,
                          labels=labels, damping=0.0, folder=None, progress=False)
    qgrads = ekfac.per_example_layer_grads(task.apply, task.params, task.queries, fit.layers, task.kind)
    acts, _ = ekfac.layer_activations(task.apply, task.params, cand, fit.layers, task.kind)
    return _KFACShared(fit, jax.block_until_ready(qgrads), jax.block_until_ready(acts))


def _ekfac_fn(shared: _KFACShared, lam: float, method: str):
    """Scores with damping λ (ekfac, kfac) or G23's 0.1 × mean Λ per layer (ekfac_heuristic)."""
    kind = "kfac" if method == "kfac" else "ekfac"
    fit = shared.fit

    def fn():
        pre = {p: fit.factors[p].ihvp(shared.query_grads[p], kind, damping=(
            ekfac.DEFAULT_DAMPING_FACTOR * float(np.mean(fit.factors[p].Lambda)) if method == "ekfac_heuristic"
            else lam)) for p in fit.layers}
        return ekfac.influence_scores(pre, shared.activations)
    return fn


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _plot(path: str, summary: dict, config) -> None:
    """Per task (columns): top, each method's Pearson correlation with the PBRF against its wall time, the
    PBRF's own cost as a reference line; bottom (when retraining ran), the same correlation against the
    Pearson correlation with leave-one-out retraining, the PBRF itself as a point."""
    tasks = [t for t in config.tasks if f"{t}/num_params" in summary]
    with_loo = any(f"{t}/pbrf/loo_pearson" in summary for t in tasks)
    rows = 2 if with_loo else 1
    fig, axes = plots.figure(rows, len(tasks), size=(6.8 * len(tasks), 5.2 * rows))
    axes = np.asarray([[axes]]) if rows == len(tasks) == 1 else axes
    for column, task in enumerate(tasks):
        ax = axes[0][column]
        methods = [m for m in config.methods if f"{task}/{m}/pearson" in summary]
        x = np.asarray([summary[f"{task}/{m}/seconds"] for m in methods])
        y = np.asarray([summary[f"{task}/{m}/pearson"] for m in methods])
        ax.scatter(x, y, s=30, color="C0", zorder=3)
        plots.reference_line(ax, x=summary[f"{task}/pbrf/seconds"], label="PBRF cost")
        ax.set_xscale("log")
        plots.label_points(ax, methods, x, y)
        ax.set_xlabel("wall seconds (log scale; shared gradients excluded)")
        ax.set_ylabel("Pearson correlation with the PBRF")
        ax.set_title(f"{task} (D = {summary[f'{task}/num_params']}, {summary[f'{task}/num_candidates']} candidates)")
        plots.legend(ax)
        if rows == 1:
            continue
        ax = axes[1][column]
        loo = [m for m in methods if f"{task}/{m}/loo_pearson" in summary]
        if f"{task}/pbrf/loo_pearson" not in summary or not loo:
            ax.set_axis_off()
            continue
        x = np.asarray([summary[f"{task}/{m}/pearson"] for m in loo])
        y = np.asarray([summary[f"{task}/{m}/loo_pearson"] for m in loo])
        ax.scatter(x, y, s=30, color="C0", zorder=3)
        plots.reference_line(ax, y=summary[f"{task}/pbrf/loo_pearson"], label="the PBRF's own correlation with LOO")
        plots.label_points(ax, loo, x, y)
        ax.set_xlabel("Pearson correlation with the PBRF")
        ax.set_ylabel("Pearson correlation with leave-one-out retraining")
        ax.set_title(f"{task}: the PBRF criterion vs leave-one-out")
        plots.legend(ax)
    plots.save(fig, path)


def _reading(s: dict) -> list[str]:
    """The checks of G23's claim and the caveats, from the numbers of one task."""
    out = []
    if s["pbrf/residual_median"] > 0.05:
        out.append(f"Caveat: the PBRF solves are not converged to the full-batch optimum (median relative residual "
                   f"{s['pbrf/residual_median']:.2g}; mini-batch noise and few steps), so the ground truth itself is "
                   "noisy; gnh_if, its first-order value, bounds how well any method can agree with it.")
    if "ekfac/pearson" in s and "gnh_if/pearson" in s:
        best = max(("ekfac", "ekfac_heuristic"), key=lambda m: s.get(f"{m}/pearson", -2.0))
        gap = s["gnh_if/pearson"] - s[f"{best}/pearson"]
        ratio = s[f"{best}/seconds"] / max(s["gnh_if/seconds"], 1e-9)
        similarity = [m for m in ("grad_dot", "grad_cosine", "sketched_cosine", "trak", "tracin") if f"{m}/pearson" in s]
        beats = [m for m in similarity if s[f"{best}/pearson"] > s[f"{m}/pearson"]]
        out.append(
            f"G23's claim (EK-FAC ≈ exact IF on the PBRF criterion at a fraction of the cost): the better EK-FAC "
            f"variant ({best}, Pearson {s[f'{best}/pearson']:+.3f}) is {'within 0.05 of' if gap <= 0.05 else f'{gap:.3f} below'} "
            f"the damped Gauss–Newton IF ({s['gnh_if/pearson']:+.3f}) at {ratio:.2f}× its wall time "
            f"({'cheaper' if ratio < 1 else 'not cheaper: at this D the exact solve is small and compile/fit overheads dominate'}); "
            f"it beats {len(beats)} of {len(similarity)} gradient-similarity / TRAK / TracIn baselines"
            + (f" ({', '.join(beats)})." if beats else "."))
    if "lissa/pearson" in s and "gnh_if/pearson" in s:
        out.append(f"LiSSA: {s['lissa/pearson']:+.3f} vs {s['gnh_if/pearson']:+.3f} for the exact solve it approximates.")
    if "exact_if/pearson" in s and "gnh_if/pearson" in s:
        out.append(f"The Hessian-based IF (exact_if, {s['exact_if/pearson']:+.3f}) vs the Gauss–Newton IF "
                   f"({s['gnh_if/pearson']:+.3f}); the PBRF linearises to the latter.")
    if "pbrf/loo_pearson" in s:
        scored = [m for m in METHODS if f"{m}/loo_pearson" in s and f"{m}/pearson" in s]
        best_pbrf = max(scored, key=lambda m: s[f"{m}/pearson"], default=None)
        best_loo = max(scored, key=lambda m: s[f"{m}/loo_pearson"], default=None)
        text = (f"Retraining: the PBRF itself correlates with leave-one-out at Pearson {s['pbrf/loo_pearson']:+.3f}"
                + (f" and has LDS {s['pbrf/lds']:+.3f}" if "pbrf/lds" in s else "") + ".")
        largest = max((abs(s[f"{m}/loo_pearson"]) for m in scored), default=0.0)
        if scored and largest < 0.2:
            text += (f" No method predicts leave-one-out (every |Pearson| ≤ {largest:.2f}, the PBRF's included): "
                     f"removing one of {s['num_train']} examples changes the query losses (RMS "
                     f"{s['retrain/loo_change_rms']:.3g}) in a way no first-order estimate at θˢ follows, as Bae et al. "
                     "2022 describe for networks not trained to convergence.")
        elif best_pbrf is not None:
            text += (f" The method closest to the PBRF ({best_pbrf}, {s[f'{best_pbrf}/pearson']:+.3f}) has LOO "
                     f"Pearson {s[f'{best_pbrf}/loo_pearson']:+.3f}; the method closest to LOO is {best_loo} "
                     f"({s[f'{best_loo}/loo_pearson']:+.3f}).")
        if len(scored) >= 3 and largest >= 0.2:  # a ranking by near-zero correlations says nothing
            agree = float(spearman(np.asarray([s[f"{m}/pearson"] for m in scored]),
                                   np.asarray([s[f"{m}/loo_pearson"] for m in scored])))
            text += (f" Ranking the {len(scored)} methods by the PBRF criterion and by LOO agrees at Spearman "
                     f"{agree:+.2f}" + (": here the two criteria rank the methods alike." if agree >= 0.5 else
                                        ": the criteria disagree on which method is best."))
        out.append(text)
    return [" ".join(out), ""] if out else []


def _cell(s: dict, key: str) -> str:
    return f"{s[key]:+.3f} | " if key in s and np.isfinite(s[key]) else "— | "


def _retraining_sentence(task: str, s: dict, config) -> str:
    cf = config.counterfactual
    how = ("full-batch Adam from the same initialisation, float64" if task == "digits_mlp" else
           "every parameter, float32, the full run's batch order with the left-out documents' loss weighted 0")
    parts = [f"Retraining ground truths on the same candidates ({how}; {s['retrain/seconds']:.1f} s, cached per run):"]
    if "pbrf/loo_pearson" in s:
        parts.append(f"leave-one-out of each candidate (query-loss change RMS {s['retrain/loo_change_rms']:.3g});")
    if "pbrf/lds" in s:
        parts.append(f"LDS over {cf.lds_subsets} subsets, each keeping every other training example and a random "
                     f"{cf.lds_fraction:g} of the candidates (Spearman of Σ scores over the kept candidates with "
                     "−query loss, mean over queries).")
    return " ".join(parts)


def _report(summary: dict, config) -> str:
    lines = ["# PBRF benchmark: attribution methods vs the proximal Bregman response function", "",
             "Ground truth: the PBRF influence −df_q/dε (Bae et al. 2022) of each candidate training example on each "
             "query loss, from ±ε solves of the proximal Bregman objective warm-started at the trained weights "
             "(attribution/pbrf.py). One damping λ (below) is shared by the PBRF and every damped method. "
             "Correlations are per query over the candidates, averaged over queries. Beside the PBRF, the same "
             "scores are compared with leave-one-out retraining and the LDS (below each task's setup). Times are "
             "wall seconds measured in this run, compilation included; per-example gradients shared by several "
             "methods are timed once and excluded.", ""]
    for task in config.tasks:
        if f"{task}/num_params" not in summary:
            continue
        s = {k[len(task) + 1:]: v for k, v in summary.items() if k.startswith(task + "/")}
        lines += [f"## {task}", "",
                  f"D = {s['num_params']} studied parameters, N = {s['num_train']} training examples, "
                  f"{s['num_candidates']} candidates, {s['num_queries']} queries; λ_max(G) = {s['lambda_max_gnh']:.4g}, "
                  f"λ = {s['damping']:.4g}. PBRF: {s['pbrf/seconds']:.1f} s in total; relative residual of the "
                  f"solves median {s['pbrf/residual_median']:.2g}, max {s['pbrf/residual_max']:.2g}; shared "
                  f"gradients {s['shared_gradients_seconds']:.1f} s"
                  + (f"; the K-FAC fit and layer gradients shared by ekfac, kfac and ekfac_heuristic "
                     f"{s['kfac_shared/seconds']:.1f} s, included in each one's seconds" if "kfac_shared/seconds" in s
                     else "") + ".", ""]
        retrained = "pbrf/loo_pearson" in s or "pbrf/lds" in s
        if retrained:
            lines += [_retraining_sentence(task, s, config), ""]
        cf = ["loo_pearson", "loo_spearman", "lds"] if retrained else []
        heads = {"loo_pearson": "Pearson vs LOO", "loo_spearman": "Spearman vs LOO", "lds": "LDS"}
        lines += ["| method | Pearson vs PBRF | ± s.e.m. | Spearman vs PBRF | " + "".join(f"{heads[k]} | " for k in cf)
                  + "seconds |", "|---|---|---|---|" + "---|" * len(cf) + "---|"]
        if retrained:
            lines.append("| PBRF (the ground truth) | | | | " + "".join(_cell(s, f"pbrf/{k}") for k in cf)
                         + f"{s['pbrf/seconds']:.2f} |")
        for m in config.methods:
            if f"{m}/pearson" in s:
                lines.append(f"| {m} | {s[f'{m}/pearson']:+.3f} | {s[f'{m}/pearson_sem']:.3f} | "
                             f"{s[f'{m}/spearman']:+.3f} | " + "".join(_cell(s, f"{m}/{k}") for k in cf)
                             + f"{s[f'{m}/seconds']:.2f} |")
            elif f"{m}/error" in s:
                lines.append(f"| {m} | not scored: {s[f'{m}/error']} |" + " |" * (3 + len(cf)))
        lines.append("")
        lines += _reading(s)
    lines += ["![correlation vs cost](pbrf_benchmark.png)", ""]
    return "\n".join(lines)


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    summary: dict = {}
    for name in config.tasks:
        if name == "digits_mlp":
            with jax.enable_x64(True):
                task = _digits_task(config)
        else:
            task = _facts_task(config, workdir)  # the LM trains in float32
        with jax.enable_x64(True):
            task = dataclasses.replace(task, params=_to64(task.params), train=_to64(task.train),
                                       queries=_to64(task.queries),
                                       checkpoints=[(_to64(p), lr) for p, lr in task.checkpoints])
            for k, v in _run_task(task, config, workdir).items():
                summary[f"{name}/{k}"] = v
    _plot(workdir.file("pbrf_benchmark.png"), summary, config)
    atomic_write_text(workdir.file("report.md"), _report(summary, config))
    return summary
