"""Experiment `intrinsic_dimension`: d90 by subspace training through each sketch
(landscape/intrinsic_dimension.py), by three searches side by side.

Tasks (config.tasks):
  planted      linear regression whose inputs lie in a random k-dimensional subspace of R^D, so the
               loss depends on θ only through k directions: a subspace of dimension d explains ≈ d/k of
               the target variance (d < k) and all of it for d ≥ k, so d90 ≈ 0.9 k (metric: test R²).
  digits_mlp   MLP on scikit-learn's 8×8 digits, trained from its random init (metric: test accuracy).
  digits_cnn   LeNet-style CNN on digits.
  text_minilm  all-MiniLM-L6-v2 + head on the generated C-class text set, subspace fine-tuning from the
               pretrained weights (Aghajanyan et al.'s DID setting).
For each task: a full-space baseline (Adam on θ for `search.num_steps` steps; its steps and wall time
are recorded), target τ90 = target_fraction × its metric, then for each sketch the searches in
config.searches:
  doubling     a fresh subspace run per candidate d (d0, 2d0, … then log-space bisection), every
               trained (d, seed) kept in `search_<task>_<sketch>.json` so a rerun resumes;
  binary       plain integer bisection on [0, d_max] over the same log;
  single_run   the paper's search inside ONE training run (Schioppa 2024 Sec. 4, App. B.5 Listing 9):
               one D_max-dimensional subspace, coordinates ≥ d frozen, d doubled every c steps while
               the metric improves by < δ, resumable from `single_run_<task>_<sketch>.npz`; then the
               verification run at D*/2 (`verify_<task>_<sketch>.json`).
Every log and checkpoint carries a fingerprint of the settings that made it (task section, sketch,
steps per d, learning rates, c, δ, …); reusing one made with other settings raises
`artifacts.FingerprintMismatchError` instead of reporting a stale d90.
Wall time per subspace-training step is measured for every sketch at one common d (`timing_d`).

summary.json, per task: `<task>/full_metric`, `<task>/full/steps`, `<task>/full/seconds`,
`<task>/num_params`, `<task>/d90/<sketch>` (doubling), `<task>/d90_binary/<sketch>`,
`<task>/<search>/steps/<sketch>` and `<task>/<search>/seconds/<sketch>` (optimiser steps and training
wall time of the whole search), `<task>/single_run/d_star/<sketch>`, `.../verify_metric/<sketch>`,
`.../verified/<sketch>` (1 when the D*/2 run stays below τ90), `.../steps_over_full/<sketch>`,
`.../seconds_over_full/<sketch>`, `.../sec_per_step/<sketch>`, `<task>/sec_per_step/<sketch>`,
`<task>/step_time_ratio_ffd_over/<sketch>`, `<task>/full/sec_per_step`; the planted task also writes
`planted_dim` and `d90/<sketch>` at the top level.
Figures: `metric_vs_d_<task>.png` (multi-run searches), `single_run_<task>.png` (metric vs step with
the d schedule below it, one line per sketch).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import artifacts
import sketching
from experiments.common import config_checks as checks
from experiments.common import models as models_lib
from experiments.common import plots
from experiments.common.workdir import Workdir
from experiments.tasks import classifier
from landscape import intrinsic_dimension as idim

TASKS = ("planted", "digits_mlp", "digits_cnn", "text_minilm")
SEARCHES = ("doubling", "binary", "single_run")
_SEARCH_FIELDS = {"target_fraction", "d0", "d_max", "seeds", "num_steps", "learning_rate", "full_learning_rate",
                  "timing_d", "timing_steps"}
_SINGLE_RUN_FIELDS = {"d_min", "d_max", "interval", "delta", "learning_rate", "max_steps", "verify"}


@dataclasses.dataclass
class Task:
    """What a search needs: loss, initial parameters θ0, minibatches, and the evaluation metric."""

    loss_fn: Callable[[Any, Any], jax.Array]
    theta0: Any
    batch_at: Callable[[int], Any]
    metric_fn: Callable[[Any], float]
    metric_name: str


def validate_config(config) -> None:
    checks.require_sections(config, ("search",))
    checks.names_from("config.tasks", config.tasks, TASKS)
    for name in config.tasks:
        if name not in config:
            raise checks.ConfigError(f"config.tasks names {name!r} but config.{name} is missing")
        if name != "planted":
            classifier.validate_config(config[name])
    checks.names_from("config.sketches", config.sketches, sketching.NAMES)
    checks.names_from("config.searches", config.searches, SEARCHES)
    s = config.search
    checks.check_fields("config.search", s, _SEARCH_FIELDS)
    for field in ("d0", "d_max", "num_steps", "timing_d", "timing_steps"):
        checks.integer(f"config.search.{field}", s[field])
    checks.number("config.search.target_fraction", s.target_fraction, 0, 1, low_open=True)
    if not s.seeds:
        raise checks.ConfigError("config.search.seeds is empty; allowed values: a non-empty tuple of ints")
    checks.number("config.search.learning_rate", s.learning_rate, 0, low_open=True)
    checks.number("config.search.full_learning_rate", s.full_learning_rate, 0, low_open=True)
    if "single_run" in config.searches:
        checks.require_sections(config, ("single_run",))
        r = config.single_run
        checks.check_fields("config.single_run", r, _SINGLE_RUN_FIELDS)
        checks.integer("config.single_run.d_min", r.d_min)
        checks.integer("config.single_run.d_max", r.d_max, low=r.d_min)
        checks.integer("config.single_run.interval", r.interval)
        checks.integer("config.single_run.max_steps", r.max_steps, low=r.interval)
        checks.number("config.single_run.delta", r.delta)
        checks.number("config.single_run.learning_rate", r.learning_rate, 0, low_open=True)
        checks.one_of("config.single_run.verify", r.verify, (True, False))
    if "planted" in config.tasks:
        p = config.planted
        checks.integer("config.planted.planted_dim", p.planted_dim, 1, p.num_params - 1)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

def planted_task(config) -> Task:
    """Linear regression y = xᵀθ* + ε with x = B s, B ∈ R^{D×k} orthonormal, s ~ N(0, I_k)."""
    p = config.planted
    rng = np.random.default_rng(config.seed)
    basis, _ = np.linalg.qr(rng.standard_normal((p.num_params, p.planted_dim)))
    theta_star = rng.standard_normal(p.num_params)

    def sample(count):
        x = rng.standard_normal((count, p.planted_dim)) @ basis.T
        y = x @ theta_star + p.noise * rng.standard_normal(count)
        return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}

    train, test = sample(p.num_train), sample(p.num_test)

    def loss_fn(params, batch):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    variance = float(jnp.var(test["y"]))

    def metric_fn(params):  # test R²
        return 1.0 - float(loss_fn(params, test)) / variance

    return Task(loss_fn, {"w": jnp.zeros((p.num_params,), jnp.float32)}, lambda step: train, metric_fn, "test R²")


def classifier_task(section) -> Task:
    setup = classifier.prepare(section)
    loss_fn = models_lib.make_loss_fns(setup.model).loss_fn
    return Task(loss_fn, setup.params, setup.batch_at,
                lambda params: setup.evaluate(params)["test_accuracy"], "test accuracy")


def build_task(name: str, config) -> Task:
    return planted_task(config) if name == "planted" else classifier_task(config[name])


def task_fingerprint(task_name: str, config) -> dict:
    """What determines a task's data, model and θ0 (the config section and the seed)."""
    section = config.planted if task_name == "planted" else config[task_name]
    return {"task": task_name, "task_config": section.to_dict(), "seed": config.seed}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FullRun:
    metric: float
    num_steps: int
    seconds: float          # wall time of the whole run (compilation and evaluation included)
    seconds_per_step: float  # median, first step excluded


def full_training(task: Task, num_steps: int, learning_rate: float, quiet: bool = True) -> FullRun:
    """The direct baseline: Adam on all of θ with the same step budget."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(task.loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = time.perf_counter()
    params, opt_state = task.theta0, optimizer.init(task.theta0)
    times = []
    for i in _progress(range(num_steps), quiet, "full training"):
        t0 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, task.batch_at(i))
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    metric = float(task.metric_fn(params))
    steady = times[1:] if len(times) > 1 else times
    return FullRun(metric, num_steps, time.perf_counter() - start, float(np.median(steady)))


def full_training_metric(task: Task, num_steps: int, learning_rate: float) -> float:
    return full_training(task, num_steps, learning_rate).metric


def _progress(iterable, quiet: bool, description: str):
    if quiet:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=description, leave=False)


def subspace_trainer(task: Task, sketch: str, config) -> Callable[[int, int], float]:
    s = config.search

    def train_at(d: int, seed: int) -> float:
        subspace = idim.make_subspace(sketch, d, task.theta0, jax.random.key(1000 + seed))
        run = idim.train_subspace(task.loss_fn, subspace, optax.adam(s.learning_rate), task.batch_at,
                                  s.num_steps, task.metric_fn)
        return run.metric

    return train_at


def step_time(task: Task, sketch: str, config) -> float:
    """Median seconds per subspace-training step at d = timing_d (compilation excluded)."""
    s = config.search
    d = idim.accepted_dimension(sketch, min(s.timing_d, models_lib.count_params(task.theta0)), task.theta0)
    subspace = idim.make_subspace(sketch, d, task.theta0, jax.random.key(0))
    run = idim.train_subspace(task.loss_fn, subspace, optax.adam(s.learning_rate), task.batch_at,
                              s.timing_steps + 1, lambda params: 0.0)
    return run.seconds_per_step


# ----------------------------------------------------------------------------------------------
# The single-run search and its verification
# ----------------------------------------------------------------------------------------------

def single_run(task: Task, task_name: str, sketch: str, target: float, config, workdir: Workdir) -> dict:
    """The paper's single-run search through `sketch`, then the verification run at D*/2."""
    r = config.single_run
    num_params = models_lib.count_params(task.theta0)
    d_max = idim.accepted_dimension(sketch, min(r.d_max, num_params), task.theta0)
    subspace = idim.make_subspace(sketch, d_max, task.theta0, jax.random.key(2000))
    fingerprint = {**task_fingerprint(task_name, config), "learning_rate": r.learning_rate, "optimizer": "adam",
                   "key": 2000}
    result = idim.single_run_search(
        task.loss_fn, subspace, optax.adam(r.learning_rate), task.batch_at, task.metric_fn, target,
        d_min=min(r.d_min, d_max), interval=r.interval, delta=r.delta, max_steps=r.max_steps,
        checkpoint_path=workdir.file(f"single_run_{task_name}_{sketch}.npz"), fingerprint=fingerprint,
        quiet=config.get("quiet", True))
    out = {"d_star": result.d_star, "status": result.status, "d_max": d_max, "steps": result.num_steps,
           "seconds": result.seconds_total, "sec_per_step": result.seconds_per_step, "history": result.history,
           "schedule": result.schedule, "resumed_from": result.resumed_from}
    if r.verify and result.d_star is not None and result.d_star >= 2:
        out.update(_verification(task, task_name, sketch, subspace, result, fingerprint, target, config, workdir))
    return out


def _verification(task, task_name, sketch, subspace, result, fingerprint, target, config, workdir) -> dict:
    """D*/2 trained alone (fixed mask, same subspace, from z = 0) for as many steps as the search took;
    the result is kept in a fingerprinted JSON file so a rerun does not repeat it."""
    d = result.d_star // 2
    fields = {**fingerprint, "sketch": sketch, "d_max": subspace.dimension, "d": d, "num_steps": result.num_steps}
    path = workdir.file(f"verify_{task_name}_{sketch}.json")
    if os.path.exists(path):
        stored = artifacts.read_json(path)
        artifacts.check_fields(path, stored.get("fingerprint"), fields, what="verification run")
        run = stored["result"]
    else:
        start = time.perf_counter()
        trained = idim.verification_run(task.loss_fn, subspace, optax.adam(config.single_run.learning_rate),
                                        task.batch_at, task.metric_fn, d, result.num_steps)
        run = {"metric": trained.metric, "steps": result.num_steps, "seconds": time.perf_counter() - start}
        artifacts.atomic_write_json(path, {"fingerprint": artifacts.normalise(fields), "result": run})
    return {"verify_d": d, "verify_metric": run["metric"], "verify_steps": run["steps"],
            "verify_seconds": run["seconds"], "verified": bool(run["metric"] < target)}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _nan_if_none(value) -> float:
    return float("nan") if value is None else float(value)


def run(config, workdir: Workdir) -> dict:
    s = config.search
    quiet = config.get("quiet", True)
    summary: dict[str, float] = {}
    for task_name in config.tasks:
        task = build_task(task_name, config)
        num_params = models_lib.count_params(task.theta0)
        full = full_training(task, s.num_steps, s.full_learning_rate, quiet)
        target = s.target_fraction * full.metric
        summary.update({f"{task_name}/num_params": num_params, f"{task_name}/full_metric": full.metric,
                        f"{task_name}/full/steps": full.num_steps, f"{task_name}/full/seconds": full.seconds,
                        f"{task_name}/full/sec_per_step": full.seconds_per_step})
        workdir.log(0, task=task_name, full_metric=full.metric, target=target, num_params=num_params,
                    full_seconds=full.seconds)
        curves, single_runs = {}, {}
        for sketch in config.sketches:
            train_at = subspace_trainer(task, sketch, config)

            def adjust(d, sketch=sketch):
                return idim.accepted_dimension(sketch, d, task.theta0)

            d_max = min(s.d_max, num_params)
            fingerprint = {**task_fingerprint(task_name, config), "sketch": sketch, "num_steps": s.num_steps,
                           "learning_rate": s.learning_rate, "optimizer": "adam", "key": "1000+seed"}
            for search in config.searches:
                start = time.perf_counter()
                if search == "single_run":
                    out = single_run(task, task_name, sketch, target, config, workdir)
                    single_runs[sketch] = out
                    prefix = f"{task_name}/single_run"
                    summary.update({
                        f"{prefix}/d_star/{sketch}": _nan_if_none(out["d_star"]),
                        f"{prefix}/steps/{sketch}": out["steps"], f"{prefix}/seconds/{sketch}": out["seconds"],
                        f"{prefix}/sec_per_step/{sketch}": out["sec_per_step"],
                        f"{prefix}/steps_over_full/{sketch}": out["steps"] / full.num_steps,
                        f"{prefix}/seconds_over_full/{sketch}": out["seconds"] / full.seconds,
                        f"{prefix}/d_max/{sketch}": out["d_max"]})
                    if "verify_metric" in out:
                        summary.update({f"{prefix}/verify_metric/{sketch}": out["verify_metric"],
                                        f"{prefix}/verified/{sketch}": float(out["verified"]),
                                        f"{prefix}/verify_seconds/{sketch}": out["verify_seconds"]})
                    workdir.log(0, task=task_name, sketch=sketch, search=search, d_star=out["d_star"],
                                status=out["status"], steps=out["steps"], seconds=out["seconds"],
                                schedule=[list(x) for x in out["schedule"]], resumed_from=out["resumed_from"],
                                verify_metric=out.get("verify_metric"), seconds_now=time.perf_counter() - start)
                    continue
                log_path = workdir.file(f"search_{task_name}_{sketch}.json")
                if search == "doubling":
                    result = idim.doubling_search(train_at, target, d0=s.d0, d_max=d_max, seeds=tuple(s.seeds),
                                                  log_path=log_path, adjust=adjust, fingerprint=fingerprint)
                    key = "d90"
                else:
                    result = idim.binary_search(train_at, target, lo=0, hi=d_max, seeds=tuple(s.seeds),
                                                log_path=log_path, adjust=adjust, fingerprint=fingerprint)
                    key = "d90_binary"
                summary[f"{task_name}/{key}/{sketch}"] = _nan_if_none(result.d90)
                summary[f"{task_name}/{search}/steps/{sketch}"] = result.num_runs * s.num_steps
                summary[f"{task_name}/{search}/seconds/{sketch}"] = result.seconds
                workdir.log(0, task=task_name, sketch=sketch, search=search, d90=result.d90, bracket=list(result.bracket),
                            points={str(d): v for d, v in sorted(result.points.items())},
                            trained_now=result.num_trained, steps=result.num_runs * s.num_steps,
                            seconds=result.seconds, seconds_now=time.perf_counter() - start)
                curves[sketch] = result.points if search == "doubling" else {**result.points, **curves.get(sketch, {})}
            summary[f"{task_name}/sec_per_step/{sketch}"] = step_time(task, sketch, config)
        if "ffd" in config.sketches:
            for sketch in config.sketches:
                summary[f"{task_name}/step_time_ratio_ffd_over/{sketch}"] = (
                    summary[f"{task_name}/sec_per_step/ffd"] / summary[f"{task_name}/sec_per_step/{sketch}"])
        if task_name == "planted":
            summary["planted_dim"] = config.planted.planted_dim
            for sketch in config.sketches:
                if f"planted/d90/{sketch}" in summary:
                    summary[f"d90/{sketch}"] = summary[f"planted/d90/{sketch}"]
        if curves:
            _plot(task_name, task.metric_name, curves, full.metric, target, workdir)
        if single_runs:
            plot_single_runs(workdir.file(f"single_run_{task_name}.png"), task_name, task.metric_name, single_runs,
                             full.metric, target, full.num_steps)
    return summary


def _plot(task_name: str, metric_name: str, curves: dict, full: float, target: float, workdir: Workdir) -> None:
    """Multi-run searches: the metric of every trained d (log2 axis), one line per sketch."""
    fig, ax = plots.figure(size=(8.0, 4.8))
    for i, (sketch, points) in enumerate(curves.items()):
        ds = sorted(points)
        ax.plot(ds, [points[d] for d in ds], marker=plots.MARKERS[i % len(plots.MARKERS)], color=f"C{i % 10}",
                linestyle=plots.LINESTYLES[i % len(plots.LINESTYLES)], label=sketch)
    plots.reference_line(ax, y=full, label=f"full training ({full:.3f})", color="0.25")
    plots.reference_line(ax, y=target, label=f"τ90 target ({target:.3f})", color="0.55")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{task_name}: one subspace training per d (d90 = first d on the target line)")
    plots.legend(ax, outside=True)
    plots.save(fig, workdir.file(f"metric_vs_d_{task_name}.png"))


def plot_single_runs(path: str, task_name: str, metric_name: str, runs: dict, full: float, target: float,
                     full_steps: int) -> str:
    """Top: the metric at every evaluation (every c steps) of each sketch's single run, with the full
    training metric, τ90 and the step budget of one full training; bottom: the d schedule (log2 axis)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, axes = plots.figure(2, 1, size=(9.0, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    top, bottom = axes[0][0], axes[1][0]
    last_step = max([full_steps] + [h["step"] for run in runs.values() for h in run["history"]])
    all_d = set()
    for i, (sketch, run) in enumerate(runs.items()):
        color, marker = f"C{i % 10}", plots.MARKERS[i % len(plots.MARKERS)]
        steps = [h["step"] for h in run["history"]]
        found = run["d_star"] if run["d_star"] is not None else "not reached"
        top.plot(steps, [h["metric"] for h in run["history"]], marker=marker, markersize=3.5, color=color,
                 linestyle=plots.LINESTYLES[i % len(plots.LINESTYLES)], label=f"{sketch}: D* = {found}")
        xs, ys = [], []
        for j, (step, d) in enumerate(run["schedule"]):
            nxt = run["schedule"][j + 1][0] if j + 1 < len(run["schedule"]) else steps[-1]
            xs += [step, nxt]
            ys += [d, d]
            all_d.add(d)
        bottom.plot(xs, ys, color=color, linewidth=2, linestyle=plots.LINESTYLES[i % len(plots.LINESTYLES)],
                    label=sketch)
    plots.reference_line(top, y=full, label=f"full training ({full:.3f})", color="0.25")
    plots.reference_line(top, y=target, label=f"τ90 target ({target:.3f})", color="0.55")
    for ax in (top, bottom):
        ax.axvline(full_steps, color="k", linestyle=(0, (1, 3)), linewidth=1.0,
                   label=f"one full training ({full_steps} steps)" if ax is top else None)
    top.set_ylabel(metric_name)
    top.set_title(f"{task_name}: the single-run search (metric every c steps)")
    plots.legend(top, outside=True)
    bottom.set_yscale("log", base=2)
    ticks = sorted(all_d)
    bottom.yaxis.set_major_locator(FixedLocator(ticks))
    bottom.yaxis.set_minor_locator(NullLocator())
    bottom.set_yticklabels([f"{d:,}" for d in ticks])
    bottom.set_ylim(min(ticks) / 1.5, max(ticks) * 1.5)
    bottom.set_ylabel("trained coordinates d")
    bottom.set_xlabel("optimiser step")
    plots.integer_ticks(bottom, "x")
    bottom.set_xlim(0, last_step * 1.02)
    plots.legend(bottom, outside=True)
    return plots.save(fig, path)
