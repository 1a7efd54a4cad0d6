"""Experiment `influence_llm`: EK-FAC influence vs TRAK vs gradient similarity on planted facts.

For each task (`facts_lm`: facts written in the order they are queried; `facts_lm_reversed`: the
same facts written answer-first, Grosse et al. 2023 ("G23") §5.3.3):
1. Train the tiny transformer LM (experiments/train_lm.py) on the corpus.
2. Score every (query, training document) pair, query loss f_q = −log p(answer | prompt):
   - `ekfac/none`: ⟨(Ĝ + λI)⁻¹ ∇f_q, ∇L_i⟩ over the MLP layers (attribution/ekfac.py; G23 eq. 30),
     `kfac/none`: the same with K-FAC eigenvalues;
   - `grad_dot/none`, `grad_cosine/none`: unpreconditioned dot / cosine on the same MLP layers;
   - `cosine/{none,qk,afjl,logra}`: cosine of all-parameter gradients, exact or sketched at equal m
     (`sketch_dim`; LoGra = sketching/logra.py, per-layer Kronecker projections);
   - `trak/dense`: single-checkpoint TRAK, φ = Φ∇L (dense Gaussian, `trak_dim`), score
     φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_i with λ = trak_ridge · tr(ΦᵀΦ)/m (Park et al. 2023 eq. 13 without the
     ensemble and the 1−p reweighting; `attribution.scorers.trak_scores`).
3. Metrics per scorer against the planted truth (the documents stating the queried fact):
   recall@k (a planting document in the top k) and MRR, `planted_ratio` =
   mean over queries of (mean score of planting documents) / (mean |score| of all documents), and
   the LDS (`lds_subsets` retrainings on random `lds_fraction` halves from the same initialisation:
   mean over queries of Spearman(Σ_{i∈S} score_qi, −f_q(θ_S))).
4. EK-FAC diagnostics: query batching (`qb_rel_error@k`, `qb_pearson@k`: rank-k SVD of the
   preconditioned query gradients vs full rank; attribution/query_batching.py), TF-IDF filtering
   (`tfidf_recall@N`, `tfidf_mass@N`: fraction of the true top-10 EK-FAC influence (count and |score|
   mass) among the N BM25 candidates; `tfidf_planted@N`: a planting document among them), heavy
   tail (`top5pct_mass`: share of Σ|score| held by the top 5% of documents; `tail_exponent`: median
   slope a of log score ≈ c − a log rank over the top positive scores, G23 §5.2.1), and per-layer
   shares of the score.
Writes summary.json, report.md, influence_llm.png, and per task a folder with the LM checkpoints,
EK-FAC factors and scores.npz.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import sketching
from sketching.gradients import flatten_per_example
from attribution import ekfac
from attribution import query_batching as qb
from attribution import retrain
from attribution import tfidf
from attribution.scorers import cosine_scores, trak_scores
from attribution.evaluate import lds
from attribution.index import params_hash
from configs.influence_llm import TASKS
from experiments.common import data as data_lib
from experiments.common import models as models_lib
from experiments.common import plots
from experiments.tasks import planted_lm
from attribution.evaluate import first_relevant_ranks, retrieval_metrics
from experiments.common.workdir import Workdir, atomic_write_npz, atomic_write_text

SKETCHES = ("qk", "afjl", "logra")


def validate_config(config) -> None:
    planted_lm.validate_config(config)
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"config.tasks has {task!r}; allowed values: {list(TASKS)}")
    for name in config.sketches:
        if name not in SKETCHES:
            raise ValueError(f"config.sketches has {name!r}; allowed values: {list(SKETCHES)}")
    if config.ekfac.labels not in ("sampled", "data"):
        raise ValueError(f"config.ekfac.labels={config.ekfac.labels!r}; allowed values: ['sampled', 'data']")
    for field in ("sketch_dim", "trak_dim"):
        v = config.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"config.{field} must be a positive int, got {v!r}")
    if 10 not in config.recall_ks:
        raise ValueError(f"config.recall_ks must include 10, got {list(config.recall_ks)}")
    if not isinstance(config.lds_subsets, int) or config.lds_subsets < 0 or config.lds_subsets == 1:
        raise ValueError(f"config.lds_subsets must be 0 (off) or an int >= 2, got {config.lds_subsets!r}")
    if not 0 < config.lds_fraction < 1:
        raise ValueError(f"config.lds_fraction must be in (0, 1), got {config.lds_fraction!r}")


def _sketch(name: str, m: int):
    if name == "logra":
        from sketching import logra

        return logra.get(m)
    return sketching.get(name, m)


def _tail_stats(scores: np.ndarray) -> dict:
    n = scores.shape[1]
    top = max(1, math.ceil(0.05 * n))
    mass, slopes = [], []
    for s in scores:
        a = np.sort(np.abs(s))[::-1]
        mass.append(a[:top].sum() / max(a.sum(), 1e-300))
        pos = np.sort(s[s > 0])[::-1][:20]
        if len(pos) >= 3:
            slopes.append(-np.polyfit(np.log(np.arange(1, len(pos) + 1)), np.log(pos), 1)[0])
    return {"top5pct_mass": float(np.mean(mass)), "tail_exponent": float(np.median(slopes)) if slopes else float("nan")}


def _lds_losses(config, wd: Workdir, s: planted_lm.Setup) -> tuple[np.ndarray, np.ndarray]:
    """Retrains on `lds_subsets` random subsets (cached and resumable, attribution/retrain.py); returns
    the subset masks (J, N) and the query losses (J, Q)."""
    n = len(s.corpus.documents)
    per_example_loss = jax.jit(models_lib.make_loss_fns(s.model).per_example_loss)
    masks = np.zeros((config.lds_subsets, n))
    for j in range(config.lds_subsets):
        rng = np.random.default_rng([config.seed, 7, j])
        masks[j, rng.choice(n, int(round(config.lds_fraction * n)), replace=False)] = 1.0

    def query_losses(chunk: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(per_example_loss(planted_lm.train_on_subset(config, s, np.flatnonzero(mask)),
                                                     s.queries), np.float64) for mask in chunk])

    losses = retrain.retrain_outcomes(wd.file("lds_retraining"), masks, query_losses, chunk_size=1,
                                      fingerprint={"train_lm": config.to_dict(), "params0": params_hash(s.params)},
                                      progress=not config.get("quiet", False), description="LDS retraining")
    return masks, losses


def _run_task(config, wd: Workdir, quiet: bool) -> tuple[dict, dict]:
    s = planted_lm.setup(config)
    result = planted_lm.train_model(config, wd, s)
    params, apply = result.params, s.model.apply
    relevant = [q.documents for q in s.corpus.queries]
    n = len(s.corpus.documents)
    out = {"query_accuracy": result.eval_metrics["query_accuracy"],
           "heldout_query_accuracy": result.eval_metrics["heldout_query_accuracy"], "num_documents": n}

    # EK-FAC / K-FAC on the MLP layers.
    e = config.ekfac
    chunks = np.array_split(np.arange(n), max(1, math.ceil(n / e.batch_size)))
    batches = [data_lib.take(s.train, c) for c in chunks]
    fit = ekfac.fit_ekfac(apply, params, batches, task="lm", layers=tuple(e.layers), seed=config.seed,
                          labels=e.labels, num_samples=e.num_samples, damping_factor=e.damping_factor,
                          folder=wd.file("ekfac"), progress=not quiet)
    qgrads = ekfac.per_example_layer_grads(apply, params, s.queries, fit.layers, "lm")
    acts, _ = ekfac.layer_activations(apply, params, s.train, fit.layers, "lm")
    tgrads = ekfac.per_example_layer_grads(apply, params, s.train, fit.layers, "lm")
    pre = fit.ihvp(qgrads)
    scores = {("ekfac", "none"): np.asarray(ekfac.influence_scores(pre, acts), np.float64),
              ("kfac", "none"): np.asarray(ekfac.influence_scores(fit.ihvp(qgrads, "kfac"), acts), np.float64),
              ("grad_dot", "none"): np.asarray(ekfac.influence_scores(qgrads, acts), np.float64)}
    qflat = np.concatenate([np.asarray(v).reshape(v.shape[0], -1) for v in qgrads.values()], 1)
    tflat = np.concatenate([np.asarray(v).reshape(v.shape[0], -1) for v in tgrads.values()], 1)
    scores[("grad_cosine", "none")] = np.asarray(cosine_scores(qflat, tflat))
    per_layer = {p: np.asarray(v) for p, v in ekfac.influence_scores(pre, acts, per_layer=True).items()}
    total = sum(np.abs(v).sum() for v in per_layer.values())
    for p, v in per_layer.items():
        out[f"ekfac/none/layer_share/{p}"] = float(np.abs(v).sum() / total)
    tokens = np.asarray(ekfac.token_influence({p: v[:1] for p, v in pre.items()}, acts))[0]  # query 0

    # All-parameter gradients: exact and sketched cosine, TRAK.
    loss_fn = models_lib.make_loss_fns(s.model).loss_fn
    pe = jax.jit(lambda p, b: sketching.per_example_gradients(loss_fn, p, b))
    gq, gt = pe(params, s.queries), pe(params, s.train)
    scores[("cosine", "none")] = np.asarray(cosine_scores(flatten_per_example(gq), flatten_per_example(gt)))
    for i, name in enumerate(config.sketches):
        sk = _sketch(name, config.sketch_dim)
        st = sk.init(jax.random.fold_in(jax.random.key(config.seed), 100 + i), params)
        apply_all = jax.jit(jax.vmap(sk.apply, in_axes=(None, 0)))
        scores[("cosine", name)] = np.asarray(cosine_scores(apply_all(st, gq), apply_all(st, gt)))
    dense = sketching.get("dense", config.trak_dim)
    st = dense.init(jax.random.fold_in(jax.random.key(config.seed), 99), params)
    proj = jax.jit(jax.vmap(dense.apply, in_axes=(None, 0)))
    phi_q, phi_t = proj(st, gq), proj(st, gt)
    ridge = config.trak_ridge * float(jnp.sum(phi_t * phi_t)) / phi_t.shape[1]  # trak_ridge · tr(ΦᵀΦ)/m
    scores[("trak", "dense")] = np.asarray(trak_scores([phi_q], [phi_t], damping=ridge), np.float64)

    # Evaluation.
    lds_masks, lds_losses = _lds_losses(config, wd, s) if config.lds_subsets else (None, None)
    ks = sorted(set(config.recall_ks))
    for (scorer, sk_name), sc in scores.items():
        prefix = f"{scorer}/{sk_name}"
        for key, v in retrieval_metrics(first_relevant_ranks(sc, relevant), ks).items():
            out[f"{prefix}/{key}"] = v
        planted = [sc[q, list(docs)].mean() / max(np.abs(sc[q]).mean(), 1e-300) for q, docs in enumerate(relevant)]
        out[f"{prefix}/planted_ratio"] = float(np.mean(planted))
        if lds_losses is not None:
            out[f"{prefix}/lds"] = lds(sc, lds_masks, lds_losses)
        if sk_name not in ("none", "dense") and scorer == "cosine":
            out[f"{prefix}/pearson_vs_exact"] = float(np.mean(
                [np.corrcoef(a, b)[0, 1] for a, b in zip(sc, scores[("cosine", "none")])]))
    out.update({f"ekfac/none/{k}": v for k, v in _tail_stats(scores[("ekfac", "none")]).items()})
    for k in config.query_ranks:
        err = qb.score_error(np.asarray(qb.low_rank_scores(qb.low_rank_queries(pre, k), acts)), scores[("ekfac", "none")])
        out[f"ekfac/none/qb_rel_error@{k}"], out[f"ekfac/none/qb_pearson@{k}"] = err["rel_error"], err["pearson"]
    texts = [f"{q.prompt} {q.answer}" for q in s.corpus.queries]
    bm25 = tfidf.tfidf_scores(texts, list(s.corpus.documents))
    for N in config.tfidf_n:
        if N > n:
            continue
        cand = tfidf.top_candidates(bm25, N)
        fr = tfidf.filter_recall(scores[("ekfac", "none")], cand, k=min(10, n))
        out[f"ekfac/none/tfidf_recall@{N}"], out[f"ekfac/none/tfidf_mass@{N}"] = fr["recall"], fr["mass"]
        out[f"ekfac/none/tfidf_planted@{N}"] = float(np.mean([np.isin(list(d), c).any() for d, c in zip(relevant, cand)]))
    top_doc = int(np.argmax(scores[("ekfac", "none")][0]))
    ids = np.asarray(s.train["tokens"][top_doc])
    words = [s.tokenizer.decode([int(t)]) for t in ids]
    extras = {"tokens": tokens[top_doc], "words": words, "query": texts[0], "top_doc": top_doc,
              "ekfac": scores[("ekfac", "none")], "relevant": relevant}
    atomic_write_npz(wd.file("scores.npz"), {f"{a}__{b}": v for (a, b), v in scores.items()})
    return out, extras


def _plots(path: str, summary: dict, extras: dict, config) -> None:
    """Four panels: EK-FAC's heavy tail, query-batching error vs rank, TF-IDF recall vs candidates, and
    planted-fact recall@10 per scorer (one bar group per task)."""
    fig, axes = plots.figure(1, 4, size=(19, 4.6))
    axes = axes[0]
    tasks = list(extras)
    for t, task in enumerate(tasks):
        style = {"marker": plots.MARKERS[t], "linestyle": plots.LINESTYLES[t], "color": f"C{t}", "label": task}
        mags = np.sort(np.abs(extras[task]["ekfac"]), axis=1)[:, ::-1].mean(0)
        axes[0].plot(np.arange(1, len(mags) + 1), mags, **{**style, "marker": None})
        ranks = list(config.query_ranks)
        axes[1].plot(ranks, [summary[f"{task}/ekfac/none/qb_rel_error@{k}"] for k in ranks], **style)
        ns = [N for N in config.tfidf_n if f"{task}/ekfac/none/tfidf_recall@{N}" in summary]
        axes[2].plot(ns, [summary[f"{task}/ekfac/none/tfidf_recall@{N}"] for N in ns], **style)
    axes[0].set(xlabel="rank of document", ylabel="mean |EK-FAC influence|", title="Heavy tail (log-log)")
    plots.log_scale(axes[0], "x")
    plots.log_scale(axes[0], "y")
    axes[1].set(xlabel="query rank k", ylabel="relative score error", title="Query batching")
    plots.log_scale(axes[1], "x", base=2, ticks=list(config.query_ranks))
    plots.log_scale(axes[1], "y")
    axes[2].set(xlabel="BM25 candidates N", ylabel="share of the top-10 kept", title="TF-IDF filter", ylim=(0, 1.05))
    plots.log_scale(axes[2], "x", ticks=[N for N in config.tfidf_n
                                         if any(f"{task}/ekfac/none/tfidf_recall@{N}" in summary for task in tasks)])
    names = _scorer_names(config)
    width = 0.8 / max(1, len(tasks))
    for t, task in enumerate(tasks):
        axes[3].bar(np.arange(len(names)) + t * width, [summary[f"{task}/{nm}/recall@10"] for nm in names], width,
                    label=task, color=f"C{t}")
    axes[3].set_xticks(np.arange(len(names)) + width * (len(tasks) - 1) / 2, names, rotation=55, ha="right")
    axes[3].set(ylabel="recall@10", title="Planted-fact retrieval", ylim=(0, 1.05))
    axes[3].grid(False, axis="x")
    for ax in axes[:3]:
        plots.legend(ax)
    plots.legend(axes[3], outside=True)
    plots.save(fig, path)


def _scorer_names(config) -> list[str]:
    return ["ekfac/none", "kfac/none", "trak/dense", "grad_dot/none", "grad_cosine/none", "cosine/none"] + \
        [f"cosine/{s}" for s in config.sketches]


def _report(summary: dict, extras: dict, config) -> str:
    names = _scorer_names(config)
    lines = ["# Influence on planted facts: EK-FAC vs TRAK vs gradient similarity", "",
             f"Tiny LM ({config.model.num_layers} layers, d={config.model.d_model}), {config.train.num_steps} steps. "
             f"EK-FAC on layers {list(config.ekfac.layers)}, labels={config.ekfac.labels}, damping "
             f"{config.ekfac.damping_factor}×mean(Λ). Sketched cosines at m={config.sketch_dim}; TRAK: "
             f"single-checkpoint `attribution.scorers.trak_scores`, dense projection m={config.trak_dim}, ridge "
             f"{config.trak_ridge}·tr(ΦᵀΦ)/m. LDS: "
             f"{config.lds_subsets} retrainings on {config.lds_fraction:.0%} subsets.", ""]
    for task in extras:
        lines += [f"## {task}", "",
                  f"query accuracy {summary[f'{task}/query_accuracy']:.3f} (held-out facts "
                  f"{summary[f'{task}/heldout_query_accuracy']:.3f}), {summary[f'{task}/num_documents']} documents.", "",
                  "| scorer/sketch | recall@1 | recall@10 | MRR | LDS | planted ratio |", "|---|---|---|---|---|---|"]
        for nm in names:
            lds = summary.get(f"{task}/{nm}/lds", float("nan"))
            lines.append(f"| {nm} | {summary[f'{task}/{nm}/recall@1']:.3f} | {summary[f'{task}/{nm}/recall@10']:.3f} | "
                         f"{summary[f'{task}/{nm}/mrr']:.3f} | {lds:.3f} | {summary[f'{task}/{nm}/planted_ratio']:.2f} |")
        lines += ["", "Sketched vs exact all-parameter cosine (Pearson over documents, mean over queries): " + ", ".join(
            f"{s}: {summary[f'{task}/cosine/{s}/pearson_vs_exact']:.3f}" for s in config.sketches), "",
            f"Heavy tail: top 5% of documents hold {summary[f'{task}/ekfac/none/top5pct_mass']:.2f} of Σ|influence|; "
            f"median power-law exponent {summary[f'{task}/ekfac/none/tail_exponent']:.2f}.", "",
            "Query batching (rank k): " + ", ".join(
                f"k={k}: rel.err {summary[f'{task}/ekfac/none/qb_rel_error@{k}']:.3g}, Pearson "
                f"{summary[f'{task}/ekfac/none/qb_pearson@{k}']:.4f}" for k in config.query_ranks), "",
            "TF-IDF (BM25) filter, share of the true top-10 EK-FAC documents kept: " + ", ".join(
                f"N={N}: {summary[f'{task}/ekfac/none/tfidf_recall@{N}']:.2f} (mass "
                f"{summary[f'{task}/ekfac/none/tfidf_mass@{N}']:.2f}, planted doc in {summary[f'{task}/ekfac/none/tfidf_planted@{N}']:.2f})"
                for N in config.tfidf_n if f"{task}/ekfac/none/tfidf_recall@{N}" in summary), "",
            "Per-layer share of Σ|EK-FAC score|: " + ", ".join(
                f"{k.split('layer_share/')[1]} {v:.2f}" for k, v in summary.items()
                if k.startswith(f"{task}/ekfac/none/layer_share/")), ""]
        ex = extras[task]
        order = np.argsort(-np.abs(ex["tokens"]))[:5]
        lines += [f"Per-token decomposition, query \"{ex['query']}\", its top EK-FAC document #{ex['top_doc']} "
                  f"(planting: {ex['top_doc'] in ex['relevant'][0]}): largest contributions at "
                  + ", ".join(f"'{ex['words'][t]}' ({ex['tokens'][t]:+.3g})" for t in order), ""]
    lines += ["![plots](influence_llm.png)", ""]
    return "\n".join(lines)


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    quiet = bool(config.get("quiet", False))
    summary, extras = {}, {}
    for task in config.tasks:
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.data.order = TASKS[task]
        out, extras[task] = _run_task(cfg, Workdir(workdir.file(task)), quiet)
        summary.update({f"{task}/{k}": v for k, v in out.items()})
        workdir.log(0, **{f"{task}/{k}": v for k, v in out.items()})
    _plots(workdir.file("influence_llm.png"), summary, extras, config)
    report = _report(summary, extras, config)
    atomic_write_text(workdir.file("report.md"), report)
    if not quiet:
        print(report.split("![plots]")[0])
    return summary
