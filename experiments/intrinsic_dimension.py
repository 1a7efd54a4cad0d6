"""Experiment `intrinsic_dimension`: d90 by subspace training through each sketch (SPEC §4.3,
LANDSCAPE.md §7; landscape/intrinsic_dimension.py).

Tasks (config.tasks):
  planted      linear regression whose inputs lie in a random k-dimensional subspace of R^D, so the
               loss depends on θ only through k directions: a subspace of dimension d explains ≈ d/k of
               the target variance (d < k) and all of it for d ≥ k, so d90 ≈ 0.9 k (metric: test R²).
  digits_mlp   MLP on scikit-learn's 8×8 digits, trained from its random init (metric: test accuracy).
  digits_cnn   LeNet-style CNN on digits.
  text_minilm  all-MiniLM-L6-v2 + head on the generated C-class text set, subspace fine-tuning from the
               pretrained weights (Aghajanyan et al.'s DID setting).
For each task: a full-space baseline (the same optimiser budget on θ directly), target = 0.9 × its
metric, then for each sketch the paper's doubling-then-bisection search (and, if asked, the plain
binary search), every trained (d, seed) recorded in `search_<task>_<sketch>.json` so a rerun resumes
without retraining. Wall time per subspace-training step is measured for every sketch at one common
d (`timing_d`), after compilation.
summary.json: `<task>/full_metric`, `<task>/d90/<sketch>`, `<task>/d90_binary/<sketch>`,
`<task>/sec_per_step/<sketch>`, `<task>/step_time_ratio_ffd_over/<sketch>`, `<task>/num_params`;
the planted task also writes `planted_dim` and `d90/<sketch>` at the top level.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sketching
from experiments.tasks import classifier
from experiments.common import models as models_lib
from experiments.common.plots import Panel, save_panel_grid
from experiments.common.workdir import Workdir
from landscape import intrinsic_dimension as idim

TASKS = ("planted", "digits_mlp", "digits_cnn", "text_minilm")
SEARCHES = ("doubling", "binary")


@dataclasses.dataclass
class Task:
    """What a search needs: loss, initial parameters θ0, minibatches, and the evaluation metric."""

    loss_fn: Callable[[Any, Any], jax.Array]
    theta0: Any
    batch_at: Callable[[int], Any]
    metric_fn: Callable[[Any], float]
    metric_name: str


def validate_config(config) -> None:
    for name in config.tasks:
        if name not in TASKS:
            raise ValueError(f"config.tasks has {name!r}; allowed values: {list(TASKS)}")
        if name not in config:
            raise ValueError(f"config.tasks names {name!r} but config.{name} is missing")
    for name in config.sketches:
        if name not in sketching.NAMES:
            raise ValueError(f"config.sketches has {name!r}; allowed values: {list(sketching.NAMES)}")
    for name in config.searches:
        if name not in SEARCHES:
            raise ValueError(f"config.searches has {name!r}; allowed values: {list(SEARCHES)}")
    s = config.search
    for field in ("d0", "d_max", "num_steps", "timing_d", "timing_steps"):
        value = s[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.search.{field} must be a positive int, got {value!r}")
    if not 0 < s.target_fraction <= 1:
        raise ValueError(f"config.search.target_fraction must be in (0, 1], got {s.target_fraction!r}")
    if not s.seeds:
        raise ValueError("config.search.seeds must be a non-empty tuple of ints")
    if not s.learning_rate > 0:
        raise ValueError(f"config.search.learning_rate must be > 0, got {s.learning_rate!r}")
    if "planted" in config.tasks:
        p = config.planted
        if not 1 <= p.planted_dim < p.num_params:
            raise ValueError(f"config.planted.planted_dim must be in [1, num_params), got {p.planted_dim!r}")


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


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def full_training_metric(task: Task, num_steps: int, learning_rate: float) -> float:
    """The direct baseline: Adam on all of θ with the same step budget."""
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(task.loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = task.theta0, optimizer.init(task.theta0)
    for i in range(num_steps):
        params, opt_state = step(params, opt_state, task.batch_at(i))
    return float(task.metric_fn(params))


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
    d = idim.accepted_dimension(sketch, s.timing_d, task.theta0)
    subspace = idim.make_subspace(sketch, d, task.theta0, jax.random.key(0))
    run = idim.train_subspace(task.loss_fn, subspace, optax.adam(s.learning_rate), task.batch_at,
                              s.timing_steps + 1, lambda params: 0.0)
    return run.seconds_per_step


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def run(config, workdir: Workdir) -> dict:
    s = config.search
    summary: dict[str, float] = {}
    for task_name in config.tasks:
        task = build_task(task_name, config)
        num_params = models_lib.count_params(task.theta0)
        full = full_training_metric(task, s.num_steps, s.full_learning_rate)
        target = s.target_fraction * full
        summary[f"{task_name}/num_params"] = num_params
        summary[f"{task_name}/full_metric"] = full
        workdir.log(0, task=task_name, full_metric=full, target=target, num_params=num_params)
        curves = {}
        for sketch in config.sketches:
            train_at = subspace_trainer(task, sketch, config)

            def adjust(d, sketch=sketch):
                return idim.accepted_dimension(sketch, d, task.theta0)

            d_max = min(s.d_max, num_params)
            for search in config.searches:
                log_path = workdir.file(f"search_{task_name}_{sketch}.json")
                start = time.perf_counter()
                if search == "doubling":
                    result = idim.doubling_search(train_at, target, d0=s.d0, d_max=d_max, seeds=tuple(s.seeds),
                                                  log_path=log_path, adjust=adjust)
                    key = "d90"
                else:
                    result = idim.binary_search(train_at, target, lo=0, hi=d_max, seeds=tuple(s.seeds),
                                                log_path=log_path, adjust=adjust)
                    key = "d90_binary"
                summary[f"{task_name}/{key}/{sketch}"] = float(result.d90) if result.d90 is not None else float("nan")
                workdir.log(0, task=task_name, sketch=sketch, search=search, d90=result.d90, bracket=list(result.bracket),
                            points={str(d): v for d, v in sorted(result.points.items())},
                            trained_now=result.num_trained, seconds=time.perf_counter() - start)
                curves[sketch] = result.points if search == "doubling" else {**result.points, **curves.get(sketch, {})}
            summary[f"{task_name}/sec_per_step/{sketch}"] = step_time(task, sketch, config)
        if "ffd" in config.sketches:
            for sketch in config.sketches:
                summary[f"{task_name}/step_time_ratio_ffd_over/{sketch}"] = (
                    summary[f"{task_name}/sec_per_step/ffd"] / summary[f"{task_name}/sec_per_step/{sketch}"])
        if task_name == "planted":
            summary["planted_dim"] = config.planted.planted_dim
            for sketch in config.sketches:
                summary[f"d90/{sketch}"] = summary[f"planted/d90/{sketch}"]
        _plot(task_name, task.metric_name, curves, full, target, workdir)
    return summary


def _plot(task_name: str, metric_name: str, curves: dict, full: float, target: float, workdir: Workdir) -> None:
    series = {sketch: (sorted(points), [points[d] for d in sorted(points)]) for sketch, points in curves.items()}
    all_d = sorted({d for points in curves.values() for d in points})
    if all_d:
        series["full training"] = ([all_d[0], all_d[-1]], [full, full])
        series["90% target"] = ([all_d[0], all_d[-1]], [target, target])
    save_panel_grid(workdir.file(f"metric_vs_d_{task_name}.png"),
                    [[Panel(f"{task_name}: subspace training", "subspace dimension d", metric_name, series,
                            logy=False)]], suptitle="intrinsic dimension (d90 = first d on the target line)",
                    panel_size=(8.0, 4.8))
