"""Experiment `simfluence`: fit and evaluate the Simfluence loss simulator on real training runs.

1. A fixed subset of `num_train` digits training examples and `num_test` test examples; one model
   initialisation (seed). Each of `num_runs` runs trains that initialisation with plain SGD
   (learning rate `learning_rate`, batch `batch_size`, `num_steps` steps) on its own random
   curriculum (batches drawn uniformly with replacement), recording the test losses L_t(z) before
   training and after every step (one jitted `lax.scan` per run).
2. Simfluence (Guu et al. 2023; attribution/simfluence.py) is fitted by ridge least squares on the
   first num_runs − num_heldout runs, for each variant in `variants` ('linear': L_t = α(c_t) L_{t−1}
   + β(c_t); 'additive': α = 1).
3. On the held-out runs, trajectories are simulated from their true L_0 and curricula only:
   `<variant>/mse` (all steps and test examples), `<variant>/spearman_final` (across test examples,
   final step) and `<variant>/spearman_steps` (over steps, mean over test examples). Baseline
   `constant/mse`: predicting each test loss by the mean trajectory of the training runs.

Writes summary.json, simfluence.png (predicted vs actual curves on a held-out run), report.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from attribution import simfluence as sf
from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import plots
from experiments.common.workdir import Workdir, atomic_write_text


def validate_config(config) -> None:
    for field in ("num_train", "num_test", "num_steps", "batch_size", "num_runs", "num_heldout", "plot_examples"):
        checks.integer(f"config.{field}", config.get(field))
    if config.num_heldout >= config.num_runs:
        raise ValueError(f"config.num_heldout={config.num_heldout} must be < config.num_runs={config.num_runs}")
    checks.one_of("config.model.name", config.model.name, ("logreg", "mlp"))
    if not config.learning_rate > 0 or not config.ridge > 0:
        raise ValueError("config.learning_rate and config.ridge must be > 0")
    checks.names_from("config.variants", config.variants, sf.VARIANTS)


def _train_runs(config, quiet=False):
    digits = data_lib.load_digits(config.seed)
    rng = np.random.default_rng(config.seed)
    tr = rng.choice(len(digits["train"]["y"]), config.num_train, replace=False)
    te = rng.choice(len(digits["test"]["y"]), config.num_test, replace=False)
    train = {k: jnp.asarray(v[tr]) for k, v in digits["train"].items()}
    test = {k: jnp.asarray(v[te]) for k, v in digits["test"].items()}
    options = {"num_classes": 10}
    if config.model.name == "mlp":
        options["hidden"] = tuple(config.model.get("hidden", (32,)))
    model, params = models_lib.build_model(config.model.name, jax.random.key(config.seed), test, **options)
    loss_fns = models_lib.make_loss_fns(model)

    @jax.jit
    def run(curriculum):
        def step(p, idx):
            batch = jax.tree_util.tree_map(lambda a: a[idx], train)
            g = jax.grad(loss_fns.loss_fn)(p, batch)
            p = jax.tree_util.tree_map(lambda w, d: w - config.learning_rate * d, p, g)
            return p, loss_fns.per_example_loss(p, test)

        _, losses = jax.lax.scan(step, params, curriculum)
        return jnp.concatenate([loss_fns.per_example_loss(params, test)[None], losses])

    curricula, losses = [], []
    for r in tqdm(range(config.num_runs), desc="simfluence runs", disable=quiet):
        c = np.random.default_rng([config.seed, r]).integers(0, config.num_train, (config.num_steps, config.batch_size))
        curricula.append(c)
        losses.append(np.asarray(run(jnp.asarray(c)), np.float64))
    return curricula, losses


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    quiet = bool(config.get("quiet", False))
    wd = workdir
    curricula, losses = _train_runs(config, quiet)
    k = config.num_runs - config.num_heldout
    fit_c, fit_l, held_c, held_l = curricula[:k], losses[:k], curricula[k:], losses[k:]
    summary, preds = {}, {}
    mean_traj = np.mean(fit_l, axis=0)
    summary["constant/mse"] = float(np.mean([np.mean((mean_traj[1:] - l[1:]) ** 2) for l in held_l]))
    for variant in config.variants:
        model = sf.fit_simfluence(fit_c, fit_l, config.num_train, variant=variant, ridge=config.ridge)
        ev = sf.evaluate(model, held_c, held_l)
        preds[variant] = ev.pop("predictions")
        summary.update({f"{variant}/{m}": v for m, v in ev.items()})
        fit_ev = sf.evaluate(model, fit_c, fit_l)
        summary[f"{variant}/train_mse"] = fit_ev["mse"]
        wd.log(0, **{f"{variant}/{m}": v for m, v in ev.items()})
    summary["loss_variance_across_runs"] = float(np.mean(np.var(np.stack(losses)[:, 1:], axis=0)))

    _plot_curves(wd.file("simfluence.png"), held_l[0], {v: preds[v][0] for v in config.variants}, config)

    lines = ["# Simfluence on digits", "",
             f"{config.model.name}, {config.num_train} training / {config.num_test} test examples, SGD lr "
             f"{config.learning_rate}, batch {config.batch_size}, {config.num_steps} steps; fitted on {k} runs "
             f"with random curricula, evaluated on {config.num_heldout} held-out runs.", "",
             "| simulator | MSE (held-out) | Spearman final | Spearman over steps | MSE (fit runs) |", "|---|---|---|---|---|"]
    for v in config.variants:
        lines.append(f"| {v} | {summary[f'{v}/mse']:.3g} | {summary[f'{v}/spearman_final']:.3f} | "
                     f"{summary[f'{v}/spearman_steps']:.3f} | {summary[f'{v}/train_mse']:.3g} |")
    lines += [f"| mean trajectory of fit runs | {summary['constant/mse']:.3g} | | | |", "",
              f"Mean variance of a test loss across runs (same init, other curricula): "
              f"{summary['loss_variance_across_runs']:.3g}.", "", "![curves](simfluence.png)", ""]
    atomic_write_text(wd.file("report.md"), "\n".join(lines))
    return summary


def _plot_curves(path: str, actual: np.ndarray, predicted: dict[str, np.ndarray], config) -> None:
    """Actual vs simulated test-loss curves on one held-out run, one panel per test example (shared axes,
    one legend beside the grid)."""
    shown = min(config.plot_examples, config.num_test)
    ncols = (shown + 1) // 2
    fig, axes = plots.figure(2, ncols, size=(3.4 * ncols + 1.8, 5.6), sharex=True, sharey=True)
    steps = np.arange(actual.shape[0])
    for q, ax in enumerate(axes.flat):
        if q >= shown:
            ax.set_visible(False)
            continue
        ax.plot(steps, actual[:, q], color="black", linewidth=2.0, label="actual")
        for k, (variant, curve) in enumerate(predicted.items()):
            ax.plot(steps, curve[:, q], color=f"C{k}", linestyle=plots.LINESTYLES[k + 1],
                    label=f"Simfluence-{variant}")
        ax.set_title(f"test example {q}")
        plots.integer_ticks(ax, "x")
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("test loss")
    plots.legend(axes.flat[ncols - 1], outside=True)
    fig.suptitle("Held-out run: simulated vs actual test-loss curves")
    plots.save(fig, path)
