"""Experiment `demo` (`make demo`): planted-fact retrieval with sketched per-example gradients.

    python -m experiments.run --config configs/demo.py --workdir runs/demo     (≤ 5 min, 2 CPU cores)

1. Train the tiny transformer LM on the planted-facts corpus (experiments/train_lm.py) until it
   knows the facts: `query_accuracy` = fraction of planted-fact prompts whose greedy next word is
   the answer (`heldout_query_accuracy` on facts never written is the control, ≈ 0).
2. For every sketch s in config.sketches: Φ_s g_i for all training documents i (g_i = ∇θ ℓ_i,
   ℓ_i the document's summed next-token loss) and Φ_s q_j for every query j (q_j = ∇θ of
   −log p(answer_j | prompt_j)), via `sketching.sketch_per_example_gradients`.
3. Score documents by cosine similarity cos(Φ S q_j, Φ S g_i) and rank them per query, where
   S = diag(1 / (√ν + 1e-8)) with ν Adam's second-moment estimate at the end of training
   (`preconditioner="adam"`, the optimizer second-moment correction of TrackStar, Chang et al. 2024,
   "Scalable Influence and Fact Tracing for Large Language Model Pretraining"; a global factor in ν
   does not change cosines, so ν is used without bias correction) or S = I (`"none"`). S is applied
   by differentiating u ↦ L(θ + S u) at u = 0, whose gradient is S ∇θ L, so every sketch and mode
   sees an ordinary loss function. Without S, the summed-token document gradients are dominated by
   the unpredictable filler words (the memorised answer's gradient is tiny), and retrieval is
   near chance; `raw_exact` reports that case. Against the
   planted truth (the documents stating fact j): recall@k = fraction of queries with at least one
   planting document in the top k; MRR = mean over queries of 1 / (rank of the first planting
   document). `exact` uses the unsketched gradients as the reference.
4. sketch_overhead/s = median time of the jitted sketched per-example gradients of all training
   documents / median time of the jitted plain per-example gradients (the PyTree of all g_i),
   measured in this run with `experiments.common.timing.median_time`.

Writes report.md, training.png, retrieval.png, retrieval.npz (scores' ranks), corpus.json,
tokenizer.json and checkpoints/ to the workdir, and prints the report's path.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import sketching
from attribution.evaluate import first_relevant_ranks, retrieval_metrics
from attribution.scorers import cosine_scores
from experiments.common import config_checks as checks
from experiments.common import models as models_lib
from experiments.common import plots
from experiments.common import train as train_lib
from experiments.common.timing import median_time
from experiments.tasks import planted_lm
from sketching.gradients import flatten_per_example
from experiments.common.workdir import Workdir, atomic_write_npz, atomic_write_text

EXACT = "exact"
RAW_EXACT = "raw_exact"
PRECONDITIONERS = ("adam", "none")


def preconditioned_loss(loss_fn, params, scale):
    """(u, batch) ↦ loss_fn(θ + scale ⊙ u, batch); its gradient at u = 0 is scale ⊙ ∇θ loss_fn."""
    def loss(u, batch):
        return loss_fn(jax.tree_util.tree_map(lambda p, s, x: p + s * x, params, scale, u), batch)

    return loss


def validate_config(config) -> None:
    planted_lm.validate_config(config)
    checks.names_from("config.sketches", config.sketches, sketching.NAMES)
    checks.integer("config.sketch_dim", config.sketch_dim)
    checks.one_of("config.sketch_mode", config.sketch_mode, sketching.MODES)
    ks = list(config.recall_ks)
    for k in ks:
        checks.integer("config.recall_ks entry", k)
    if 10 not in ks:
        raise checks.ConfigError(f"config.recall_ks={ks!r} must include 10 (the headline recall@10)")
    for field in ("timing_repeats", "timing_warmup"):
        checks.integer(f"config.{field}", config.get(field))
    checks.number("config.timing_budget_s", config.timing_budget_s, low=0, low_open=True)
    checks.one_of("config.preconditioner", config.preconditioner, PRECONDITIONERS)
    if config.preconditioner == "adam" and config.train.optimizer not in ("adam", "adamw"):
        raise checks.ConfigError(f"config.preconditioner='adam' needs config.train.optimizer in ['adam', 'adamw'], "
                         f"got {config.train.optimizer!r}")


def _plots(workdir: Workdir, curves: dict[str, np.ndarray], ks: list[int]) -> None:
    records = workdir.read_metrics()
    steps = [r["step"] for r in records if "train/loss" in r]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    evals = [(r["step"], r["eval/query_accuracy"]) for r in records if "eval/query_accuracy" in r]
    fig, axes = plots.figure(1, 2, size=(11, 3.8))
    loss_ax, accuracy_ax = axes[0]
    loss_ax.plot(steps, losses, color="C0")
    loss_ax.set_xlabel("training step")
    loss_ax.set_ylabel("train loss per document")
    loss_ax.set_title("training loss (summed over tokens)")
    if evals:
        accuracy_ax.plot(*zip(*evals), marker="o", color="C2")
    accuracy_ax.set_ylim(-0.03, 1.03)
    accuracy_ax.set_xlabel("training step")
    accuracy_ax.set_ylabel("query accuracy")
    accuracy_ax.set_title("planted facts answered (greedy next word)")
    last = max(steps + [step for step, _ in evals] + [1])
    for ax in (loss_ax, accuracy_ax):
        ax.set_xlim(0, last * 1.03)
        plots.integer_ticks(ax, "x")
    plots.save(fig, workdir.file("training.png"))

    fig, ax = plots.figure(size=(8.2, 4.0))
    grid = np.arange(1, max(ks) + 1)
    for i, (name, ranks) in enumerate(curves.items()):
        reference = name in (EXACT, RAW_EXACT)
        # References (unsketched gradients) drawn on top with hollow markers, so a sketch that matches
        # them exactly stays visible underneath.
        ax.plot(grid, [np.mean(ranks <= k) for k in grid], label=name, marker=plots.MARKERS[i % len(plots.MARKERS)],
                markersize=7 if reference else 4, markerfacecolor="none" if reference else None,
                linestyle="--" if reference else "-", alpha=0.9, zorder=3 if reference else 2)
    ax.set_xlabel("k (documents retrieved per query)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.set_title("planted-fact retrieval by gradient cosine similarity")
    ax.set_xticks([1] + list(range(5, max(ks) + 1, 5)))
    plots.legend(ax, outside=True)
    plots.save(fig, workdir.file("retrieval.png"))


def _report(config, summary: dict, num_params: int, ks: list[int]) -> str:
    names = [EXACT, RAW_EXACT] + list(config.sketches) if config.exact_reference else list(config.sketches)
    lines = [
        "# Demo: planted-fact retrieval with sketched gradients",
        "",
        f"Tiny LM ({config.model.num_layers} layers, d={config.model.d_model}, {num_params} parameters) trained "
        f"{config.train.num_steps} steps on {summary['num_documents']} documents "
        f"({config.data.num_facts} planted facts × {config.data.docs_per_fact} documents + "
        f"{config.data.num_distractors} distractors, order={config.data.order}).",
        "",
        f"- query accuracy (planted facts): **{summary['query_accuracy']:.3f}**",
        f"- query accuracy (held-out facts, never written): {summary['heldout_query_accuracy']:.3f}",
        "",
        f"Retrieval of the planting documents by cosine similarity of per-example gradients "
        f"(sketch dimension m={config.sketch_dim}, mode={config.sketch_mode}, preconditioner="
        f"{config.preconditioner}; `exact`: unsketched, `raw_exact`: unsketched without preconditioner):",
        "",
        "| gradients | " + " | ".join(f"recall@{k}" for k in ks) + " | MRR | overhead vs plain per-example grads |",
        "|---|" + "---|" * (len(ks) + 2),
    ]
    for name in names:
        overhead = summary.get(f"sketch_overhead/{name}")
        cells = [f"{summary[f'recall@{k}/{name}']:.3f}" for k in ks] + [f"{summary[f'mrr/{name}']:.3f}"]
        cells.append(f"{overhead:.2f}×" if overhead is not None else "1 (reference)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Plain per-example gradients of all documents: {summary['per_example_grad_time_s'] * 1e3:.1f} ms "
        "(median, jitted); overhead = sketched time / that time, measured in this run.",
        "",
        "![training](training.png)",
        "",
        "![retrieval](retrieval.png)",
        "",
    ]
    return "\n".join(lines)


def run(config, workdir: Workdir) -> dict:
    s = planted_lm.setup(config)
    for name in config.sketches:  # the sketches' own constraints (e.g. powers of two), before training
        checks.sketch_fits("config.sketch_dim", name, config.sketch_dim, s.params)
    result = planted_lm.train_model(config, workdir, s)
    params = result.params
    raw_loss_fn = models_lib.make_loss_fns(s.model).loss_fn
    if config.preconditioner == "adam":
        scale = jax.tree_util.tree_map(lambda v: 1.0 / (jnp.sqrt(v) + 1e-8), train_lib.adam_second_moment(result.opt_state))
    else:
        scale = jax.tree_util.tree_map(jnp.ones_like, params)
    loss_fn = preconditioned_loss(raw_loss_fn, params, scale)
    origin = jax.tree_util.tree_map(jnp.zeros_like, params)  # u = 0
    ks = sorted(set(config.recall_ks))
    relevant = [q.documents for q in s.corpus.queries]
    summary = {
        "query_accuracy": result.eval_metrics["query_accuracy"],
        "heldout_query_accuracy": result.eval_metrics["heldout_query_accuracy"],
        "train_loss": result.eval_metrics["loss"],
        "num_documents": len(s.corpus.documents),
        "num_queries": len(relevant),
        "num_params": models_lib.count_params(params),
    }
    timing = dict(warmup=config.timing_warmup, repeats=config.timing_repeats, budget_s=config.timing_budget_s)
    plain = jax.jit(functools.partial(sketching.per_example_gradients, loss_fn))
    plain_time = median_time(plain, origin, s.train, **timing)["median_s"]
    summary["per_example_grad_time_s"] = plain_time

    ranks: dict[str, np.ndarray] = {}
    references = [(EXACT, plain, origin),
                  (RAW_EXACT, functools.partial(sketching.per_example_gradients, raw_loss_fn), params)]
    steps = ([f"exact gradients ({name})" for name, _, _ in references] if config.exact_reference else []) + \
        [f"sketch {name}: gradients + timing" for name in config.sketches]
    bar = tqdm(total=len(steps), desc="retrieval", disable=config.get("quiet", False), dynamic_ncols=True)
    if config.exact_reference:
        for (name, fn, at), label in zip(references, steps):
            bar.set_postfix_str(label)
            scores = np.asarray(cosine_scores(flatten_per_example(fn(at, s.queries)), flatten_per_example(fn(at, s.train))))
            ranks[name] = first_relevant_ranks(scores, relevant)
            bar.update()
    for i, name in enumerate(config.sketches):
        bar.set_postfix_str(f"sketch {name}")
        sketch = sketching.get(name, config.sketch_dim)
        state = sketch.init(jax.random.fold_in(jax.random.key(config.seed), 1000 + i), params)
        sketched = jax.jit(lambda p, b, sketch=sketch, state=state: sketching.sketch_per_example_gradients(
            sketch, state, loss_fn, p, b, mode=config.sketch_mode))
        scores = np.asarray(cosine_scores(sketched(origin, s.queries), sketched(origin, s.train)))
        ranks[name] = first_relevant_ranks(scores, relevant)
        summary[f"sketch_overhead/{name}"] = median_time(sketched, origin, s.train, **timing)["median_s"] / plain_time
        bar.update()
    bar.close()
    for name, r in ranks.items():
        for key, value in retrieval_metrics(r, ks).items():
            summary[f"{key}/{name}"] = value
        workdir.log(result.step, **{f"retrieval/{key}/{name}": v for key, v in retrieval_metrics(r, ks).items()})
    atomic_write_npz(workdir.file("retrieval.npz"), {f"ranks_{name}": r for name, r in ranks.items()})

    _plots(workdir, ranks, ks)
    report_path = workdir.file("report.md")
    atomic_write_text(report_path, _report(config, summary, summary["num_params"], ks))
    if not config.get("quiet", False):
        print(_report(config, summary, summary["num_params"], ks).split("\n\n![")[0])
    print(f"Report: {os.path.abspath(report_path)}")
    print(f"Plots:  {workdir.file('training.png')}\n        {workdir.file('retrieval.png')}")
    return summary
