"""Experiment `hessian_spectrum`: Hessian spectra of C-class classifiers over training, with the full and
the sketched Krylov basis (the paper's Fig. 2/5/6 in miniature).

For each study (a classifier config: data, model, train) and each checkpoint step s:
  H   = Hessian of the mean loss over a fixed subset (the first `spectrum.num_examples` training
        examples, in batches; landscape.hvp_fn);
  full     Lanczos (num_iters steps, basis in R^D, float64 Krylov arithmetic) → λ_max, λ_min,
           RNEG = |λ⁻|/λ⁺_1, R(n) = λ⁺_n/λ⁺_1, outliers (R > 20%, and the gap detector), alignment
           ‖P_k g‖²/‖g‖² of the full-subset gradient with the top-k Ritz space (k = C by default;
           a random k-subspace would give k/D);
  sketched Lanczos on Φ H Φᵀ (basis in R^m; the paper's memory trick) → the same metrics, and the
           relative error of its top eigenvalues against the full run.
At the first and last checkpoint: SLQ density (Rademacher probes) and Hutchinson trace.
Class sweep: the model retrained for each C in `class_counts` → outlier count vs C.
Memory benchmark (`memory.enabled`): k Lanczos steps with and without the sketched basis on a
transformer LM (`memory.model_name="transformer"`, random weights) or on all-MiniLM-L6-v2 + a fresh
4-class head (`"minilm"`, pretrained weights, the generated text set) → Krylov-basis bytes (ratio D/m
by construction), measured peak RSS, wall time, residual certificates and the sketched top-10 against
the full-basis top-10 (memory.md, memory.png, one metrics.jsonl record).

Outputs: metrics.jsonl (one record per study/checkpoint), spectrum_<study>.png, outliers_vs_classes.png,
density_<study>.png, and summary.json with flat keys `<study>/step<s>/<metric>` and `<study>/...`.
"""
from __future__ import annotations

import functools
import time

import jax
import ml_collections
import numpy as np

import landscape
import sketching
from configs import finetune_classifier as classifier_configs
from landscape.lanczos import direct_residuals, warm_up
from experiments.common import config_checks as checks
from experiments.common import data as data_lib
from experiments.tasks import classifier
from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common import plots
from experiments.common.plots import Panel, save_panel_grid
from experiments.common.timing import PeakRSS
from experiments.common.workdir import Workdir, atomic_write_npz, atomic_write_text

_SPECTRUM_FIELDS = {"num_examples", "batch_size", "num_iters", "float64", "sketch", "sketch_m", "sketched_iters",
                    "num_ratios", "alignment_k", "slq_probes", "slq_iters", "slq_sigma_squared", "hutchinson_probes",
                    "accuracy_sketches", "accuracy_ms"}
ACCURACY_THRESHOLDS = (0.2, 0.1, 0.05)
_STUDY_EXTRA_FIELDS = {"checkpoints", "class_counts", "spectrum"}
MEMORY_MODELS = ("transformer", "minilm")


def validate_config(config) -> None:
    for name in config.studies:
        if name not in config:
            raise ValueError(f"config.studies names {name!r} but config.{name} is missing")
        study = config[name]
        checkpoints = tuple(study.checkpoints)
        if not checkpoints or list(checkpoints) != sorted(set(checkpoints)) or checkpoints[0] < 0:
            raise ValueError(f"config.{name}.checkpoints must be increasing steps >= 0, got {checkpoints}")
        if checkpoints[-1] > study.train.num_steps:
            raise ValueError(f"config.{name}.checkpoints ends at {checkpoints[-1]} > train.num_steps={study.train.num_steps}")
        for count in study.class_counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 2:
                raise ValueError(f"config.{name}.class_counts must hold ints >= 2, got {tuple(study.class_counts)}")
        plain = ml_collections.ConfigDict({key: value for key, value in study.to_dict().items()
                                            if key not in _STUDY_EXTRA_FIELDS})
        classifier.validate_config(plain)
        unknown = sorted(set(study.get("spectrum", {})) - _SPECTRUM_FIELDS)
        if unknown:
            raise ValueError(f"config.{name}.spectrum has unknown fields {unknown}; allowed fields: {sorted(_SPECTRUM_FIELDS)}")
        _validate_spectrum(study_spectrum(config, name), f"config.{name}.spectrum")
    unknown = sorted(set(config.spectrum) - _SPECTRUM_FIELDS)
    if unknown:
        raise ValueError(f"config.spectrum has unknown fields {unknown}; allowed fields: {sorted(_SPECTRUM_FIELDS)}")
    _validate_spectrum(config.spectrum, "config.spectrum")
    if config.memory.enabled:
        m = config.memory
        checks.integer("config.memory.num_iters", m.num_iters)
        checks.integer("config.memory.sketch_m", m.sketch_m)
        if isinstance(m.full_num_iters, bool) or not isinstance(m.full_num_iters, int) or m.full_num_iters < 0:
            raise ValueError(f"config.memory.full_num_iters must be an int >= 0 (0: no full-basis run), got {m.full_num_iters!r}")
        if m.num_iters > m.sketch_m:
            raise ValueError(f"config.memory.num_iters={m.num_iters} exceeds config.memory.sketch_m={m.sketch_m}")
        if m.sketch not in sketching.NAMES:
            raise ValueError(f"config.memory.sketch={m.sketch!r}; allowed values: {list(sketching.NAMES)}")
        checks.one_of("config.memory.model_name", m.model_name, MEMORY_MODELS)
        if m.model_name == "transformer":
            models_lib.validate_model_config("transformer", m.model.to_dict())


def study_spectrum(config, name: str):
    """config.spectrum with the study's own `spectrum` overrides (e.g. smaller budgets for MiniLM)."""
    merged = ml_collections.ConfigDict(config.spectrum.to_dict())
    merged.update(config[name].get("spectrum", {}))
    return merged


def _validate_spectrum(s, where: str) -> None:
    for field in ("num_examples", "batch_size", "num_iters", "sketch_m", "sketched_iters", "num_ratios",
                  "slq_probes", "slq_iters", "hutchinson_probes"):
        checks.integer(f"{where}.{field}", s[field])
    if s.sketch != "none" and s.sketch not in sketching.NAMES:
        raise ValueError(f"{where}.sketch={s.sketch!r}; allowed values: {list(sketching.NAMES) + ['none']}")
    if isinstance(s.alignment_k, bool) or not isinstance(s.alignment_k, int) or s.alignment_k < 0:
        raise ValueError(f"{where}.alignment_k must be an int >= 0 (0: the number of classes), got {s.alignment_k!r}")
    for name in s.accuracy_sketches:
        if name not in sketching.NAMES:
            raise ValueError(f"{where}.accuracy_sketches has {name!r}; allowed values: {list(sketching.NAMES)}")
    for m in s.accuracy_ms:
        checks.integer(f"{where}.accuracy_ms entries", m)


# ----------------------------------------------------------------------------------------------
# One spectrum
# ----------------------------------------------------------------------------------------------

def _subset_batches(arrays: dict, num_examples: int, batch_size: int) -> list[dict]:
    count = min(num_examples, len(arrays["y"]))
    return [data_lib.take(arrays, np.arange(start, min(start + batch_size, count)))
            for start in range(0, count, batch_size)]


GHOST_RTOL = 1e-8  # two Ritz values closer than this (relative to λ_max) count as a ghost pair


def ghost_pairs(values: np.ndarray, scale: float, rtol: float = GHOST_RTOL) -> int:
    """Adjacent pairs among `values` (descending Ritz values) equal to rtol · scale: the duplicated
    converged eigenvalues ("ghosts") that Lanczos without re-orthogonalisation produces."""
    return int(np.sum(np.abs(np.diff(np.asarray(values))) <= rtol * abs(scale)))


def _spectrum_metrics(result: landscape.KrylovResult, gradient, k: int, num_ratios: int, matvec) -> dict:
    """RNEG, R(n), outliers (R > 20%, gap detector), gradient alignment with the top-k (k = C) and with
    the outlier subspace (its dimension = the outlier count, the paper's gradient–outlier alignment),
    and the convergence certificates of the top-10 Ritz pairs: residual ‖A y − θ y‖ = β_k|s_k| relative
    to |λ_max|, how many are below 1e-6 relative, ghost pairs among them, and the same residuals computed
    directly with one operator application each (the check that includes rounding)."""
    values = result.eigenvalues
    scale = abs(float(values[0]))
    top = min(10, values.size)
    outliers = landscape.outlier_count(values)
    relative = result.residual_norms[:top] / max(scale, np.finfo(np.float64).tiny)
    metrics = {
        "lambda_max": float(values[0]),
        "lambda_min": float(values[-1]),
        "rneg": landscape.rneg(values),
        "outliers": outliers,
        "gap_outliers": landscape.gap_outlier_count(values),
        f"alignment_top{k}": landscape.gradient_alignment(result, gradient, k),
        "alignment_outliers": landscape.gradient_alignment(result, gradient, max(1, min(outliers, result.num_iters))),
        "max_residual_top5": float(np.max(result.residual_norms[:5])),
        f"max_rel_residual_top{top}": float(np.max(relative)),
        f"converged_top{top}": int(np.sum(relative <= 1e-6)),
        f"ghost_pairs_top{top}": ghost_pairs(values[:top], scale),
        f"max_rel_direct_residual_top{top}": float(np.max(direct_residuals(result, matvec, np.arange(top))) / scale),
        "krylov_steps": int(result.num_iters),
    }
    for n, ratio in enumerate(landscape.r_ratios(values, num_ratios), start=1):
        if n > 1:
            metrics[f"R{n}"] = float(ratio)
    return metrics


@functools.lru_cache(maxsize=None)
def cached_sketch(name: str, m: int) -> sketching.Sketch:
    """One Sketch object per (name, m): the compiled Krylov program is keyed on the sketch's functions,
    so reusing the object at every checkpoint reuses the program (a new `sketching.get` recompiles)."""
    return sketching.get(name, m)


def _krylov_context(spectrum):
    return jax.enable_x64(True) if spectrum.float64 else _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def spectrum_at(loss_fn, params, batches, spectrum, k: int, key) -> dict:
    """Full and sketched Lanczos at one parameter point; flat metrics (`sketched/...` for the latter)."""
    matvec = landscape.hvp_fn(loss_fn, params, batches)
    gradient = landscape.mean_gradient(loss_fn, params, batches)
    num_params = models_lib.count_params(params)
    out = {"num_params": num_params, "random_alignment": k / num_params}
    with _krylov_context(spectrum):
        start = time.perf_counter()
        full = landscape.lanczos(matvec, params, min(spectrum.num_iters, num_params), key)
        out["seconds_full"] = time.perf_counter() - start
        out.update(_spectrum_metrics(full, gradient, k, spectrum.num_ratios, matvec))
        if spectrum.sketch != "none":
            sketch = cached_sketch(spectrum.sketch, spectrum.sketch_m)
            start = time.perf_counter()
            with PeakRSS() as peak:
                sketched = landscape.lanczos(matvec, params, min(spectrum.sketched_iters, spectrum.sketch_m), key,
                                             sketch=sketch)
            out["seconds_sketched"] = time.perf_counter() - start
            out["sketched/peak_rss_delta_mb"] = peak.peak_delta_bytes / 2 ** 20
            out["sketched/basis_mb"] = sketched.basis.size * sketched.basis.dtype.itemsize / 2 ** 20
            for name, value in _spectrum_metrics(sketched, gradient, k, spectrum.num_ratios, matvec).items():
                out[f"sketched/{name}"] = value
            top = min(10, full.num_iters, sketched.num_iters)
            errors = landscape.relative_errors(sketched.eigenvalues, full.eigenvalues, top)
            out[f"sketched/top{top}_max_rel_err"] = float(errors.max())
            out[f"sketched/top{top}_mean_rel_err"] = float(errors.mean())
    return out


def sketch_accuracy(loss_fn, params, batches, spectrum, reference: np.ndarray, key) -> dict:
    """The paper's Table 7 protocol: relative error of the top-10 eigenvalues of Φ H Φᵀ against the
    full-basis Lanczos values, for each sketch and m; plus the smallest m reaching mean error < 0.2,
    0.1, 0.05 (log2, NaN when none of the m values does)."""
    matvec = landscape.hvp_fn(loss_fn, params, batches)
    top = min(10, reference.size)
    out = {}
    with _krylov_context(spectrum):
        for name in spectrum.accuracy_sketches:
            errors = {}
            for m in spectrum.accuracy_ms:
                result = landscape.lanczos(matvec, params, min(spectrum.sketched_iters, m), key,
                                           sketch=sketching.get(name, m))
                errors[m] = float(landscape.relative_errors(result.eigenvalues, reference, top).mean())
                out[f"{name}/m{m}/top{top}_mean_rel_err"] = errors[m]
            for threshold in ACCURACY_THRESHOLDS:
                reached = [m for m in sorted(errors) if errors[m] < threshold]
                out[f"{name}/min_log2m_err<{threshold}"] = float(np.log2(reached[0])) if reached else float("nan")
    return out


def density_at(loss_fn, params, batches, spectrum, key) -> tuple[landscape.SpectralDensity, landscape.TraceEstimate]:
    matvec = landscape.hvp_fn(loss_fn, params, batches)
    num_params = models_lib.count_params(params)
    with _krylov_context(spectrum):
        density = landscape.slq(matvec, params, min(spectrum.slq_iters, num_params), spectrum.slq_probes, key)
        trace = landscape.hutchinson(matvec, params, spectrum.hutchinson_probes, key)
    return density, trace


# ----------------------------------------------------------------------------------------------
# Studies
# ----------------------------------------------------------------------------------------------

def _train_to(setup, loss_fn, params, step: int, folder: Workdir, quiet: bool, name: str):
    if step == 0:
        return params
    result = train_lib.train(loss_fn, params, setup.optimizer, setup.batch_at, step, workdir=folder,
                             keep_checkpoints=1, log_every=max(1, step // 10), quiet=quiet,
                             description=f"train {name} to {step}")
    return result.params


def _save_density(path: str, density: landscape.SpectralDensity) -> None:
    """SLQ nodes and weights as (probes, steps) arrays (NaN node / 0 weight past an early stop), atomically."""
    steps = max(len(nodes) for nodes in density.nodes)
    nodes = np.full((density.num_probes, steps), np.nan)
    weights = np.zeros((density.num_probes, steps))
    for row, (theta, tau) in enumerate(zip(density.nodes, density.weights)):
        nodes[row, :len(theta)], weights[row, :len(tau)] = theta, tau
    atomic_write_npz(path, {"nodes": nodes, "weights": weights, "dimension": density.dimension})


def _run_study(name: str, study, config, workdir: Workdir, quiet: bool) -> tuple[dict, list[dict]]:
    spectrum = study_spectrum(config, name)
    setup = classifier.prepare(study)
    num_classes = int(np.max(setup.train_arrays["y"])) + 1
    k = spectrum.alignment_k or num_classes
    loss_fn = models_lib.make_loss_fns(setup.model).loss_fn
    batches = _subset_batches(setup.train_arrays, spectrum.num_examples, spectrum.batch_size)
    key = jax.random.key(config.seed)
    folder = Workdir(workdir.file(f"{name}_train"))
    summary, records, densities = {}, [], {}
    params = setup.params
    checkpoints = tuple(study.checkpoints)
    for step in checkpoints:
        params = _train_to(setup, loss_fn, setup.params, step, folder, quiet, name)
        record = {"study": name, "checkpoint": step, **setup.evaluate(params),
                  **spectrum_at(loss_fn, params, batches, spectrum, k, key)}
        workdir.log(step, **record)
        records.append(record)
        for metric, value in record.items():
            if metric not in ("study", "checkpoint") and isinstance(value, (int, float)):
                summary[f"{name}/step{step}/{metric}"] = value
        if step in (checkpoints[0], checkpoints[-1]):
            density, trace = density_at(loss_fn, params, batches, spectrum, key)
            densities[step] = density
            _save_density(workdir.file(f"slq_{name}_step{step}.npz"), density)
            summary[f"{name}/step{step}/slq_negative_mass"] = density.negative_mass()
            summary[f"{name}/step{step}/slq_near_zero_mass"] = density.near_zero_mass()
            summary[f"{name}/step{step}/slq_trace"] = density.trace()
            summary[f"{name}/step{step}/hutchinson_trace"] = trace.mean
            summary[f"{name}/step{step}/hutchinson_trace_stderr"] = trace.stderr
    if spectrum.accuracy_sketches and spectrum.accuracy_ms:
        reference = landscape.lanczos(landscape.hvp_fn(loss_fn, params, batches), params,
                                      min(spectrum.num_iters, models_lib.count_params(params)), key).eigenvalues
        accuracy = sketch_accuracy(loss_fn, params, batches, spectrum, reference, key)
        summary.update({f"{name}/sketch_accuracy/{metric}": value for metric, value in accuracy.items()})
        _plot_accuracy(name, accuracy, spectrum, workdir)
    for count in study.class_counts:
        sweep = classifier.prepare(study, num_classes=count)
        sweep_loss = models_lib.make_loss_fns(sweep.model).loss_fn
        sweep_params = _train_to(sweep, sweep_loss, sweep.params, checkpoints[-1],
                                 Workdir(workdir.file(f"{name}_C{count}_train")), quiet, f"{name} C={count}")
        sweep_batches = _subset_batches(sweep.train_arrays, spectrum.num_examples, spectrum.batch_size)
        num_params = models_lib.count_params(sweep_params)
        with _krylov_context(spectrum):
            result = landscape.lanczos(landscape.hvp_fn(sweep_loss, sweep_params, sweep_batches), sweep_params,
                                       min(spectrum.num_iters, num_params), key)
        summary[f"{name}/C{count}/outliers"] = landscape.outlier_count(result.eigenvalues)
        summary[f"{name}/C{count}/gap_outliers"] = landscape.gap_outlier_count(result.eigenvalues)
        summary[f"{name}/C{count}/rneg"] = landscape.rneg(result.eigenvalues)
        summary[f"{name}/C{count}/test_accuracy"] = sweep.evaluate(sweep_params)["test_accuracy"]
    _plot_study(name, records, densities, spectrum, workdir)
    return summary, records


# ----------------------------------------------------------------------------------------------
# Memory benchmark
# ----------------------------------------------------------------------------------------------

def _memory_problem(config):
    """(loss_fn, params, batch, description) of the memory benchmark's model: the random-weight
    transformer LM of `memory.model` on random tokens, or all-MiniLM-L6-v2 + a fresh head (pretrained
    weights, loaded offline) on the first `memory.num_examples` texts of the generated 4-class set."""
    m = config.memory
    if m.model_name == "minilm":
        study = classifier_configs.get_config(None)
        study.max_len = m.max_len
        study.data.update(num_train=m.num_examples, num_test=8)
        setup = classifier.prepare(study)
        batch = data_lib.take(setup.train_arrays, np.arange(m.num_examples))
        description = (f"all-MiniLM-L6-v2 + a fresh {study.data.num_classes}-class head (pretrained weights), "
                       f"{m.num_examples} generated texts × {m.max_len} tokens")
        return models_lib.make_loss_fns(setup.model).loss_fn, setup.params, batch, description
    rng = np.random.default_rng(config.seed)
    options = m.model.to_dict()
    tokens = rng.integers(0, options["vocab_size"], (m.num_examples, options["max_len"])).astype(np.int32)
    batch = data_lib.lm_arrays(tokens, np.ones(tokens.shape, np.float32))
    model, params = models_lib.build_model("transformer", jax.random.key(config.seed), batch, **options)
    description = (f"transformer LM (random weights, {options['num_layers']} layers, d_model {options['d_model']}), "
                   f"{m.num_examples} random sequences × {options['max_len']} tokens")
    return models_lib.make_loss_fns(model).loss_fn, params, batch, description


def _run_memory(config) -> dict:
    m = config.memory
    loss_fn, params, batch, description = _memory_problem(config)
    matvec = landscape.hvp_fn(loss_fn, params, [batch])
    num_params = models_lib.count_params(params)
    key = jax.random.key(config.seed)
    out = {"memory/num_params": num_params, "memory/num_iters": m.num_iters, "memory/sketch_m": m.sketch_m}
    runs = [("sketched", sketching.get(m.sketch, m.sketch_m), m.num_iters)]
    if m.full_num_iters:  # the full basis holds k·D numbers: fewer steps where k·D does not fit
        runs.append(("full", None, m.full_num_iters))
    with _krylov_context(config.spectrum):
        jax.block_until_ready(matvec(params))  # compile the HVP outside the measured window
        for label, sketch, num_iters in runs:  # sketched first: its small peak is not hidden by the full run's pages
            # Compile every program first (one Krylov step), so the measured window holds only the
            # Krylov state and the HVP's working memory (D·O(1)), not XLA's compiler.
            progress = not config.get("quiet", False)
            warm_up(matvec, params, num_iters, key, sketch=sketch, progress=progress)
            with PeakRSS() as peak:
                start = time.perf_counter()
                result = landscape.lanczos(matvec, params, num_iters, key, sketch=sketch, progress=progress)
                jax.block_until_ready(result.basis)
                seconds = time.perf_counter() - start
            out[f"memory/{label}/num_iters"] = num_iters
            out[f"memory/{label}/seconds"] = seconds
            out[f"memory/{label}/peak_rss_delta_bytes"] = peak.peak_delta_bytes
            out[f"memory/{label}/basis_bytes"] = int(result.basis.size * result.basis.dtype.itemsize)
            out[f"memory/{label}/lambda_max"] = float(result.eigenvalues[0])
            scale = abs(float(result.eigenvalues[0]))
            for top in (10, 100):
                if top <= result.num_iters:
                    out[f"memory/{label}/max_rel_residual_top{top}"] = float(np.max(result.residual_norms[:top]) / scale)
                    out[f"memory/{label}/converged_top{top}"] = int(np.sum(result.residual_norms[:top] <= 1e-6 * scale))
            out[f"memory/{label}/ghost_pairs_top10"] = ghost_pairs(result.eigenvalues[:10], scale)
            out[f"memory/{label}/top10"] = [float(v) for v in result.eigenvalues[:10]]
            out[f"memory/{label}/rneg"] = landscape.rneg(result.eigenvalues)
            del result
    if m.full_num_iters:
        per_step = {label: out[f"memory/{label}/basis_bytes"] / (out[f"memory/{label}/num_iters"] + 1)
                    for label, _, _ in runs}
        out["memory/basis_ratio_full_over_sketched_per_step"] = per_step["full"] / per_step["sketched"]
        out["memory/peak_ratio_full_over_sketched"] = (out["memory/full/peak_rss_delta_bytes"]
                                                       / max(out["memory/sketched/peak_rss_delta_bytes"], 1))
        out["memory/time_per_step_ratio_full_over_sketched"] = (
            (out["memory/full/seconds"] / m.full_num_iters) / (out["memory/sketched/seconds"] / m.num_iters))
        top = min(10, m.full_num_iters, m.num_iters)
        errors = landscape.relative_errors(np.asarray(out["memory/sketched/top10"]), np.asarray(out["memory/full/top10"]), top)
        out[f"memory/sketched/top{top}_mean_rel_err_vs_full"] = float(errors.mean())
        out[f"memory/sketched/top{top}_max_rel_err_vs_full"] = float(errors.max())
        out[f"memory/sketched/top{top}_affine_rel_err_vs_full"] = landscape.affine_relative_error(
            np.asarray(out["memory/sketched/top10"]), np.asarray(out["memory/full/top10"]), top)
    out["memory/D_over_m"] = num_params / m.sketch_m
    out["memory/description"] = description
    return out


# ----------------------------------------------------------------------------------------------
# Plots and entry point
# ----------------------------------------------------------------------------------------------

def _plot_study(name: str, records: list[dict], densities: dict, spectrum, workdir: Workdir) -> None:
    steps = [r["checkpoint"] for r in records]  # symmetric-log step axis: step 0 is drawn at 0
    k_key = next(key for key in records[0] if key.startswith("alignment_top"))
    has_sketch = any(key.startswith("sketched/") for key in records[0])

    def series(metric):
        out = {"full basis": (steps, [r[metric] for r in records])}
        if has_sketch:
            out[f"sketched ({spectrum.sketch}, m={spectrum.sketch_m})"] = (steps, [r[f"sketched/{metric}"] for r in records])
        return out

    alignment = series(k_key)
    alignment["random subspace (k/D)"] = (steps, [r["random_alignment"] for r in records])
    ratio_series = {f"step {r['checkpoint']}": (list(range(2, spectrum.num_ratios + 1)),
                                                [r.get(f"R{n}", np.nan) for n in range(2, spectrum.num_ratios + 1)])
                    for r in records}
    row1 = [Panel("RNEG = |λ⁻| / λ⁺₁", "training step", "RNEG", series("rneg"), step_axis=True),
            Panel("λ_max", "training step", "λ_max", series("lambda_max"), step_axis=True),
            Panel(f"gradient alignment with top-{k_key[len('alignment_top'):]}", "training step",
                  "‖P_k g‖² / ‖g‖²", alignment, step_axis=True)]
    row2 = [Panel("R(n) = λ⁺ₙ / λ⁺₁ (one curve per step)", "n", "R(n)", ratio_series, logx=False, own_legend=True),
            Panel("outliers (R > 20%)", "training step", "count", series("outliers"), logy=False, step_axis=True,
                  integer_y=True),
            Panel("test accuracy", "training step", "accuracy",
                  {"model": (steps, [r["test_accuracy"] for r in records])}, logy=False, step_axis=True)]
    save_panel_grid(workdir.file(f"spectrum_{name}.png"), [row1, row2], suptitle=f"Hessian spectrum over training: {name}")
    density_series = {}
    for step, density in densities.items():
        grid, phi = density.density(sigma_squared=spectrum.slq_sigma_squared, num_points=2000)
        keep = np.arange(0, grid.size, 10)
        shown = np.where(phi[keep] >= 1e-6 * phi.max(), phi[keep], np.nan)  # below: not drawn (no floor)
        density_series[f"step {step}"] = (grid[keep], shown)
    save_panel_grid(workdir.file(f"density_{name}.png"),
                    [[Panel(f"SLQ spectral density ({spectrum.slq_probes} probes, {spectrum.slq_iters} steps)",
                            "eigenvalue", "density (≥ 1e-6 of its peak)", density_series, logx=False)]],
                    suptitle=f"{name}", panel_size=(7.0, 4.5))


def _plot_accuracy(name: str, accuracy: dict, spectrum, workdir: Workdir) -> None:
    series = {}
    for sketch in spectrum.accuracy_sketches:
        ms = list(spectrum.accuracy_ms)
        series[sketch] = (ms, [next(v for k, v in accuracy.items() if k.startswith(f"{sketch}/m{m}/")) for m in ms])
    save_panel_grid(workdir.file(f"sketch_accuracy_{name}.png"),
                    [[Panel("top-10 eigenvalues of ΦHΦᵀ vs full Lanczos", "sketch dimension m",
                            "mean relative error", series)]], suptitle=f"{name}, last checkpoint (paper Table 7 protocol)",
                    panel_size=(6.0, 4.2))


def _plot_outliers(summary: dict, config, workdir: Workdir) -> None:
    series = {}
    for name in config.studies:
        counts = tuple(config[name].class_counts)
        if counts:
            series[f"{name} (R > 20%)"] = (list(counts), [summary[f"{name}/C{c}/outliers"] for c in counts])
            series[f"{name} (gap)"] = (list(counts), [summary[f"{name}/C{c}/gap_outliers"] for c in counts])
    if series:
        counts = sorted({c for name in config.studies for c in config[name].class_counts})
        save_panel_grid(workdir.file("outliers_vs_classes.png"),
                        [[Panel("Outlier count vs number of classes", "classes C", "outliers", series,
                                logx=False, logy=False, integer_y=True, dodge=True,
                                references={"outliers = C (conjecture)": (counts, counts)})]], panel_size=(7.0, 4.5))


def run(config, workdir: Workdir) -> dict:
    quiet = config.get("quiet", False)
    summary = {}
    for name in config.studies:
        study_summary, _ = _run_study(name, config[name], config, workdir, quiet)
        summary.update(study_summary)
    _plot_outliers(summary, config, workdir)
    if config.memory.enabled:
        memory = _run_memory(config)
        summary.update(memory)
        workdir.log(0, **{k: v for k, v in memory.items() if not isinstance(v, list)})
        _memory_report(memory, config, workdir)
    return summary


def _memory_report(memory: dict, config, workdir: Workdir) -> None:
    """memory.md (full vs sketched Krylov basis: steps, time, peak memory, accuracy) and memory.png."""
    labels = [label for label in ("full", "sketched") if f"memory/{label}/seconds" in memory]
    rows = ["| basis | Krylov steps | seconds | basis (MB) | peak RSS rise (MB) | λ_max | RNEG | top-10 certified "
            "(β_k·|s_k| ≤ 1e-6·λ_max) | ghost pairs in top-10 |", "|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        get = lambda field, default=float("nan"): memory.get(f"memory/{label}/{field}", default)  # noqa: E731
        rows.append(f"| {label} | {get('num_iters')} | {get('seconds'):.1f} | {get('basis_bytes') / 2**20:.3g} | "
                    f"{get('peak_rss_delta_bytes') / 2**20:.1f} | {get('lambda_max'):.4g} | {get('rneg'):.3g} | "
                    f"{get('converged_top10', 'n/a')} | {get('ghost_pairs_top10')} |")
    lines = ["# Lanczos memory: full vs sketched Krylov basis", "",
             f"{memory['memory/description']}: D = {memory['memory/num_params']:,} parameters; sketched basis in R^m "
             f"with m = {config.memory.sketch_m} ({config.memory.sketch}), D/m = {memory['memory/D_over_m']:.0f}.", ""] + rows
    errors = sorted(key for key in memory if key.endswith("_rel_err_vs_full"))
    if errors:
        lines += ["", "Sketched top eigenvalues against the full basis: " + "; ".join(
            f"{key.split('/')[-1].removesuffix('_vs_full').replace('_', ' ')} {memory[key]:.3g}" for key in errors) + "."]
    if "memory/peak_ratio_full_over_sketched" in memory:
        lines += ["", f"Basis bytes per step, full / sketched: {memory['memory/basis_ratio_full_over_sketched_per_step']:.0f}× "
                  f"(= D/m by construction); peak RSS rise, full / sketched: {memory['memory/peak_ratio_full_over_sketched']:.1f}×; "
                  f"time per step, full / sketched: {memory['memory/time_per_step_ratio_full_over_sketched']:.2f}×."]
    atomic_write_text(workdir.file("memory.md"), "\n".join(lines) + "\n")
    fig, axes = plots.figure(1, 2, size=(10, 3.6))
    for ax, (field, title) in zip(axes[0], (("basis_bytes", "Krylov basis"), ("peak_rss_delta_bytes", "peak RSS rise"))):
        values = [memory[f"memory/{label}/{field}"] / 2**20 for label in labels]
        bars = ax.bar(labels, values, color=["C0", "C1"][: len(labels)])
        ax.bar_label(bars, labels=[f"{v:.1f} MB" if v >= 0.1 else f"{v * 1024:.0f} KB" for v in values])
        ax.set_ylabel("MB")
        ax.set_title(title)
    plots.save(fig, workdir.file("memory.png"))
