"""Experiment `gradient_similarity_pitfall`: why a trailing "." changes the whole-gradient cosine.

Seed scenario (T5-small): input "I like to eat", targets "pizza" vs "pizza." give a whole-gradient
cosine of 0.46 although the pairs are nearly identical. No pretrained seq model is loadable offline
here, so this experiment trains the tiny decoder-only transformer (experiments/common/models.py, tied
embedding) on generated (input, target) pairs — "i like to eat" → "pizza", "we want to drink" → "tea .",
… — whose targets end with " ." with probability `data.dot_fraction` (both forms occur). The input is
the prefix, the loss is the T5-style MEAN token NLL over the target tokens plus `<eos>`.

1. Pair (A = "i like to eat" → "pizza", B = → "pizza ."): whole-gradient cosine, norms, per-token
   gradients ∇ℓ_t (attribution.decompose.per_token_gradients) and the token × token decomposition of
   ⟨∇ℓ_A, ∇ℓ_B⟩, per-layer decomposition (attribution.decompose.per_layer_scores), mean vs sum loss,
   the same at initialisation, and the pair cosine under each remedy. Also the distribution of this
   cosine over `num_queries` pairs (every query against its flipped-ending training twin).
2. Ranking: each query is a training pair with its ending flipped; the relevant document is that
   training pair (its only source: the (input, answer) combination occurs once). Rank of the relevant
   document among all training pairs, MRR, recall@1 and what is ranked first instead, for
   dot (mean loss) / dot_sum / cosine / unit / cosine_no_embed / per_token_norm / content_only /
   ekfac (MLP layers, attribution/ekfac.py) / exact_if (all parameters, damped Gauss–Newton by CG).
Writes summary.json, report.md, pair_decomposition.png, ranking.png, ranks.json.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter  # noqa: E402

from attribution import ekfac  # noqa: E402
from attribution.decompose import per_layer_scores, per_token_gradients  # noqa: E402
from attribution.evaluate import rank_of_relevant  # noqa: E402
from attribution.scorers import cosine_scores, inverse_hvp  # noqa: E402
from landscape import softmax_ggn_matvec, top_eigenvalue  # noqa: E402
from experiments.common import config_checks as checks  # noqa: E402
from experiments.common import data as data_lib  # noqa: E402
from experiments.common import plots  # noqa: E402
from experiments.common import models as models_lib  # noqa: E402
from experiments.common import train as train_lib  # noqa: E402
from experiments.common.tokenizers import WordTokenizer  # noqa: E402
from experiments.common.workdir import Workdir, atomic_write_json, atomic_write_text  # noqa: E402

# category: (verb phrase, answers). Two-word answers share a word with a one-word answer on purpose.
CATEGORIES = {
    "food": ("like to eat", ("pizza", "pasta", "soup", "rice", "salad", "bread", "cheese", "noodles", "cake",
                             "tacos", "ice cream", "fried rice")),
    "drink": ("want to drink", ("tea", "coffee", "water", "milk", "juice", "lemonade", "cocoa", "cider", "soda",
                                "iced tea")),
    "place": ("plan to visit", ("paris", "rome", "london", "tokyo", "berlin", "madrid", "oslo", "cairo", "lima",
                                "new york")),
    "sport": ("love to play", ("tennis", "chess", "football", "golf", "hockey", "cricket", "rugby", "poker",
                               "bingo", "table tennis")),
    "music": ("learn to play", ("piano", "guitar", "violin", "drums", "flute", "cello", "harp", "trumpet",
                                "banjo", "bass guitar")),
}
SUBJECTS = ("i", "we", "they", "you", "my friends", "our kids")
MAX_TARGET = 4  # ≤ 2 answer words + "." + <eos>
REMEDIES = ("dot", "dot_sum", "cosine", "unit", "cosine_no_embed", "per_token_norm", "content_only", "ekfac",
            "exact_if")
KINDS = ("relevant", "same_prompt", "same_answer", "same_category", "other")


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    answer: str
    category: str
    dotted: bool

    @property
    def target(self) -> str:
        return self.answer + (" ." if self.dotted else "")

    def flipped(self) -> "Pair":
        return dataclasses.replace(self, dotted=not self.dotted)


# ----------------------------------------------------------------------------------------------
# Config, data
# ----------------------------------------------------------------------------------------------

def validate_config(config) -> None:
    checks.require_sections(config, ("data", "model", "train", "pair", "ekfac", "exact_if"))
    d = config.data
    checks.integer("config.data.num_subjects", d.num_subjects, 1)
    if d.num_subjects > len(SUBJECTS):
        raise ValueError(f"config.data.num_subjects={d.num_subjects} > {len(SUBJECTS)} available subjects")
    smallest = min(len(a) for _, a in CATEGORIES.values())
    checks.integer("config.data.answers_per_prompt", d.answers_per_prompt, 2)
    if d.answers_per_prompt > smallest:
        raise ValueError(f"config.data.answers_per_prompt={d.answers_per_prompt} > {smallest} answers per category")
    if not 0.0 < d.dot_fraction < 1.0:
        raise ValueError(f"config.data.dot_fraction must be in (0, 1) (both endings occur), got {d.dot_fraction!r}")
    if config.pair.prompt not in _all_prompts(d.num_subjects):
        raise ValueError(f"config.pair.prompt={config.pair.prompt!r} is not a corpus prompt: {_all_prompts(d.num_subjects)}")
    cat = _prompt_category(config.pair.prompt)
    if config.pair.answer not in CATEGORIES[cat][1]:
        raise ValueError(f"config.pair.answer={config.pair.answer!r} is not a {cat} answer: {CATEGORIES[cat][1]}")
    checks.integer("config.max_len", config.max_len, 11)
    checks.integer("config.num_queries", config.num_queries, 1)
    checks.integer("config.chunk", config.chunk, 1)
    m = config.model
    for k in ("num_layers", "d_model", "num_heads", "mlp_ratio"):
        checks.integer(f"config.model.{k}", m[k], 1)
    models_lib.validate_model_config("transformer", {**m.to_dict(), "vocab_size": 1, "max_len": config.max_len})
    t = config.train
    checks.one_of("config.train.optimizer", t.optimizer, train_lib.OPTIMIZERS)
    checks.one_of("config.train.schedule", t.schedule, train_lib.SCHEDULES)
    checks.integer("config.train.num_steps", t.num_steps, 0)
    checks.integer("config.train.batch_size", t.batch_size, 1)
    checks.integer("config.train.early_steps", t.early_steps, 0)
    if t.early_steps >= t.num_steps and t.early_steps:
        raise ValueError(f"config.train.early_steps={t.early_steps} must be < train.num_steps={t.num_steps} (0 = off)")
    n = d.num_subjects * len(CATEGORIES) * d.answers_per_prompt
    if t.batch_size > n:
        raise ValueError(f"config.train.batch_size={t.batch_size} > {n} training pairs")
    checks.one_of("config.ekfac.labels", config.ekfac.labels, ("sampled", "data"))
    e = config.exact_if
    if not e.damping_rel > 0:
        raise ValueError(f"config.exact_if.damping_rel must be > 0, got {e.damping_rel!r}")
    checks.integer("config.exact_if.max_iters", e.max_iters, 1)
    checks.integer("config.exact_if.power_iters", e.power_iters, 1)


def _all_prompts(num_subjects: int) -> list[str]:
    return [f"{s} {verb}" for verb, _ in CATEGORIES.values() for s in SUBJECTS[:num_subjects]]


def _prompt_category(prompt: str) -> str:
    for cat, (verb, _) in CATEGORIES.items():
        if prompt.endswith(" " + verb):
            return cat
    raise ValueError(f"prompt {prompt!r} has no category")


def make_pairs(seed: int, num_subjects: int, answers_per_prompt: int, dot_fraction: float,
               forced: tuple[str, str] | None = None) -> list[Pair]:
    """Every prompt (subject × category) with `answers_per_prompt` answers of its category, each
    ending with " ." with probability `dot_fraction`. `forced` = (prompt, answer) is included, dotted."""
    rng = np.random.default_rng([seed, 11])
    pairs = []
    for cat, (verb, answers) in CATEGORIES.items():
        for s in SUBJECTS[:num_subjects]:
            prompt = f"{s} {verb}"
            chosen = list(rng.choice(len(answers), answers_per_prompt, replace=False))
            if forced is not None and forced[0] == prompt:
                j = answers.index(forced[1])
                if j not in chosen:
                    chosen[0] = j
            for j in sorted(chosen):
                dotted = bool(rng.random() < dot_fraction)
                if forced is not None and (prompt, answers[j]) == tuple(forced):
                    dotted = True
                pairs.append(Pair(prompt, answers[j], cat, dotted))
    return pairs


def encode(tokenizer: WordTokenizer, pairs, max_len: int) -> dict:
    """LM arrays: tokens = <bos> prompt target <eos>; loss_mask = 1 on the target tokens and <eos>
    (loss_mask[t] = 1: predict tokens[t]); `content` = 1 on the answer tokens only (not "." / <eos>)."""
    n = len(pairs)
    tokens = np.full((n, max_len), tokenizer.pad_id, np.int32)
    mask, loss_mask, content = (np.zeros((n, max_len), np.float32) for _ in range(3))
    for i, p in enumerate(pairs):
        prefix = tokenizer.encode(p.prompt, bos=True)
        answer = tokenizer.encode(p.answer, bos=False)
        target = tokenizer.encode(p.target, bos=False) + [tokenizer.eos_id]
        ids = prefix + target
        if len(ids) > max_len:
            raise ValueError(f"pair {p} has {len(ids)} tokens > max_len={max_len}")
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1.0
        loss_mask[i, len(prefix): len(ids)] = 1.0
        content[i, len(prefix): len(prefix) + len(answer)] = 1.0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "content": content}


def _model_batch(arrays: dict) -> dict:
    return {k: arrays[k] for k in ("tokens", "mask", "loss_mask")}


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

def token_losses(apply, params, ex: dict) -> jax.Array:
    """(max_len−1,) per-position NLL of one example, zero off the target (position t predicts tokens[t+1])."""
    b = {k: ex[k][None] for k in ("tokens", "mask", "loss_mask")}
    logits = apply(params, b)[0, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ex["tokens"][1:])
    return nll * ex["loss_mask"][1:]


def target_positions(arrays: dict, k: int = MAX_TARGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pos (N, k) indices into the max_len−1 loss positions, valid (N, k), content (N, k))."""
    lm = arrays["loss_mask"][:, 1:]
    ct = arrays["content"][:, 1:]
    n = lm.shape[0]
    pos, valid, content = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32), np.zeros((n, k), np.float32)
    for i in range(n):
        idx = np.nonzero(lm[i])[0]
        if len(idx) > k:
            raise ValueError(f"example {i} has {len(idx)} target tokens > {k}")
        pos[i, : len(idx)], valid[i, : len(idx)], content[i, : len(idx)] = idx, 1.0, ct[i, idx]
    return pos, valid, content


def make_feature_fn(apply, params=None):
    """jitted (arrays chunk, pos, valid, content) -> dict of (n, D) gradient features (with `params`
    bound; without, the function takes params as its first argument):
    mean  = Σ_t ∇ℓ_t / T (the T5 / HF loss), sum = Σ_t ∇ℓ_t, per_token_norm = Σ_t ∇ℓ_t/‖∇ℓ_t‖,
    content = Σ_{t answer} ∇ℓ_t; plus the per-token norms (n, k)."""
    def one(params, ex, pos, valid, content):
        tg = per_token_gradients(lambda p: token_losses(apply, p, ex)[pos], params)  # leading axis k
        g = jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree_util.tree_leaves(tg)], axis=1)
        g = g * valid[:, None]
        norms = jnp.linalg.norm(g, axis=1)
        t = jnp.maximum(valid.sum(), 1.0)
        return {"mean": g.sum(0) / t, "sum": g.sum(0),
                "per_token_norm": (g / jnp.maximum(norms, 1e-30)[:, None]).sum(0),
                "content": (g * content[:, None]).sum(0), "token_norms": norms}

    def batched(p, ex, pos, valid, content):
        return jax.vmap(lambda *a: one(p, *a))(ex, pos, valid, content)

    fn = jax.jit(batched)
    return fn if params is None else functools.partial(fn, params)


def features(feature_fn, arrays: dict, chunk: int) -> dict[str, np.ndarray]:
    pos, valid, content = target_positions(arrays)
    out: dict[str, list] = {}
    for start in range(0, len(pos), chunk):
        sl = slice(start, start + chunk)
        ex = {k: jnp.asarray(arrays[k][sl]) for k in ("tokens", "mask", "loss_mask")}
        res = feature_fn(ex, jnp.asarray(pos[sl]), jnp.asarray(valid[sl]), jnp.asarray(content[sl]))
        for k, v in res.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(cosine_scores(a, b))


def coarse_group(name: str) -> str:
    """'block_0/mlp_in' -> 'block_0/mlp', 'block_0/ln_attn' -> 'block_0/ln', 'embed/embedding' -> 'embed'."""
    head, _, tail = name.partition("/")
    if head == "embed":
        return "embed (tied unembedding)"
    if head.startswith("block_"):
        for prefix, group in (("mlp", "mlp"), ("attn", "attn"), ("ln", "ln")):
            if tail.startswith(prefix):
                return f"{head}/{group}"
    if head.startswith("ln_final"):
        return "ln_final"
    return head


def coarse_layer_scores(a_tree, b_tree) -> dict[str, float]:
    """{coarse group: ⟨a, b⟩ restricted to it} for two params-shaped trees (no leading axis)."""
    fine = per_layer_scores(jax.tree_util.tree_map(lambda x: x[None], a_tree),
                            jax.tree_util.tree_map(lambda x: x[None], b_tree), depth=2)
    out: dict[str, float] = {}
    for name, v in fine.items():
        g = coarse_group(name)
        out[g] = out.get(g, 0.0) + float(np.asarray(v).reshape(()))
    return out


def embed_mask(params) -> np.ndarray:
    """Boolean (D,) mask of the flat coordinates of the embedding (tied unembedding) parameters."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    parts = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        parts.append(np.full(leaf.size, "embed" in name.split("]")[0]))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------
# Exact influence: damped Gauss–Newton of the training loss, batched conjugate gradient
# ----------------------------------------------------------------------------------------------

def make_ggn_matvec(apply, params, arrays: dict):
    """Flat V (rows) ↦ G V for G = Jᵀ H_out J, the Gauss–Newton matrix of the training loss
    L(θ) = mean_i Σ_t loss_mask · CE (the loss the model was trained on); PSD. Returns (matvec, D)."""
    flat, _ = ravel_pytree(params)
    batch = {k: jnp.asarray(v) for k, v in _model_batch(arrays).items()}
    return functools.partial(_ggn_matvec, apply, batch, params), flat.shape[0]


@functools.partial(jax.jit, static_argnums=0)
def _ggn_matvec(apply, batch, params, vs):
    weights = batch["loss_mask"][:, 1:] / batch["tokens"].shape[0]
    return softmax_ggn_matvec(lambda p: apply(p, batch)[:, :-1].astype(jnp.float32), params, weights)(vs)


# ----------------------------------------------------------------------------------------------
# Ranking metrics
# ----------------------------------------------------------------------------------------------

def kind_of(query: Pair, doc: Pair, is_relevant: bool) -> str:
    if is_relevant:
        return "relevant"
    if doc.prompt == query.prompt:
        return "same_prompt"
    if doc.answer == query.answer:
        return "same_answer"
    if doc.category == query.category:
        return "same_category"
    return "other"


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------

def _token_names(tokenizer: WordTokenizer, arrays: dict, row: int) -> list[str]:
    pos, valid, _ = target_positions({k: v[row: row + 1] for k, v in arrays.items()})
    names = []
    for p, ok in zip(pos[0], valid[0]):
        if ok:
            tok = tokenizer.vocab[int(arrays["tokens"][row, p + 1])]
            names.append({".": "dot", "<eos>": "eos"}.get(tok, tok))
    # make names unique within the sequence
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}{seen[n]}")
    return out


@functools.partial(jax.jit, static_argnums=0)
def _pair_token_grads(apply, params, ex, pos):
    """(∇θ ℓ_t for t in pos (leading axis), ℓ_t for t in pos) of one example."""
    tg = per_token_gradients(lambda q: token_losses(apply, q, ex)[pos], params)
    return tg, token_losses(apply, params, ex)[pos]


def _pair_analysis(apply, params, init_params, tokenizer, pa: dict, pb: dict) -> tuple[dict, dict]:
    """Decompositions of ⟨∇ℓ_A, ∇ℓ_B⟩ for the seed pair (mean-over-target-tokens losses)."""
    out, extras = {}, {}
    ta, tb = [np.asarray(x[0]) for x in (pa["loss_mask"], pb["loss_mask"])]
    na, nb = ta[1:].sum(), tb[1:].sum()

    def grads(p, arrays):
        ex = {k: jnp.asarray(arrays[k][0]) for k in ("tokens", "mask", "loss_mask")}
        pos = jnp.asarray(np.nonzero(arrays["loss_mask"][0, 1:])[0])
        tg, losses = _pair_token_grads(apply, p, ex, pos)
        return tg, np.asarray(losses)

    tga, la = grads(params, pa)
    tgb, lb = grads(params, pb)
    names_a, names_b = _token_names(tokenizer, pa, 0), _token_names(tokenizer, pb, 0)
    flat = lambda tree: np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree_util.tree_leaves(tree)], 1)  # noqa: E731
    ga_tok, gb_tok = flat(tga), flat(tgb)                          # unweighted ∇ℓ_t, (T, D)
    ga, gb = ga_tok.sum(0) / na, gb_tok.sum(0) / nb                # mean-loss gradients
    dot = float(ga @ gb)
    out["pair/cosine"] = float(_cos(ga[None], gb[None])[0, 0])
    out["pair/cosine_sum_loss"] = float(_cos(ga_tok.sum(0)[None], gb_tok.sum(0)[None])[0, 0])
    out["pair/cosine_identical"] = float(_cos(ga[None], ga[None])[0, 0])
    out["pair/dot"], out["pair/norm_A"], out["pair/norm_B"] = dot, float(np.linalg.norm(ga)), float(np.linalg.norm(gb))
    out["pair/norm_A_sum_loss"] = float(np.linalg.norm(ga_tok.sum(0)))
    out["pair/norm_B_sum_loss"] = float(np.linalg.norm(gb_tok.sum(0)))
    out["pair/num_target_tokens_A"], out["pair/num_target_tokens_B"] = int(na), int(nb)
    for side, names, gt, losses in (("A", names_a, ga_tok, la), ("B", names_b, gb_tok, lb)):
        for n, g, l_ in zip(names, gt, losses):
            out[f"pair/token_norm/{side}/{n}"] = float(np.linalg.norm(g))
            out[f"pair/token_loss/{side}/{n}"] = float(l_)
    # Token × token decomposition: ⟨g_A, g_B⟩ = Σ_ij ⟨a_i, b_j⟩ / (T_A T_B).
    cross = (ga_tok @ gb_tok.T) / (na * nb)
    tok_cos = _cos(ga_tok, gb_tok)
    for i, n_a in enumerate(names_a):
        for j, n_b in enumerate(names_b):
            out[f"pair/token_cos/A:{n_a}|B:{n_b}"] = float(tok_cos[i, j])
            out[f"pair/token_pair_share/A:{n_a}|B:{n_b}"] = float(cross[i, j] / dot)
    for j, n_b in enumerate(names_b):
        out[f"pair/token_share/B:{n_b}"] = float(cross[:, j].sum() / dot)            # Σ_j = 1
        out[f"pair/token_norm_share/B:{n_b}"] = float((gb_tok[j] / nb) @ gb / (gb @ gb))  # share of ‖g_B‖²
    for i, n_a in enumerate(names_a):
        out[f"pair/token_share/A:{n_a}"] = float(cross[i].sum() / dot)
        out[f"pair/token_norm_share/A:{n_a}"] = float((ga_tok[i] / na) @ ga / (ga @ ga))
    # Cosine without the differing tokens: only the shared content token(s).
    shared = [i for i, n in enumerate(names_a) if n not in ("dot", "eos")]
    out["pair/cosine_content_only"] = float(_cos(ga_tok[shared].sum(0)[None], gb_tok[shared].sum(0)[None])[0, 0])
    # Per layer.
    _, unravel = ravel_pytree(params)
    ta_tree, tb_tree = unravel(jnp.asarray(ga)), unravel(jnp.asarray(gb))
    ab, aa, bb = (coarse_layer_scores(x, y) for x, y in ((ta_tree, tb_tree), (ta_tree, ta_tree), (tb_tree, tb_tree)))
    na_, nb_ = math.sqrt(sum(aa.values())), math.sqrt(sum(bb.values()))
    for g in ab:
        # 1 − cos = Σ_l ½‖â_l − b̂_l‖² with â = g_A/‖g_A‖: each layer's share of the cosine's deficit.
        out[f"pair/layer_distance_share/{g}"] = (0.5 * (aa[g] / na_**2 + bb[g] / nb_**2) - ab[g] / (na_ * nb_)) / \
            max(1.0 - out["pair/cosine"], 1e-30)
        out[f"pair/layer_share/{g}"] = ab[g] / dot
        out[f"pair/layer_cos/{g}"] = ab[g] / max(math.sqrt(aa[g] * bb[g]), 1e-30)
        out[f"pair/layer_norm_share_A/{g}"] = aa[g] / sum(aa.values())
        out[f"pair/layer_norm_share_B/{g}"] = bb[g] / sum(bb.values())
    # Token × layer contributions to ⟨g_A, g_B⟩ (rows: B's tokens, weighted 1/T_B).
    tok_layer = np.zeros((len(names_b), len(ab)))
    for j in range(len(names_b)):
        sc = coarse_layer_scores(ta_tree, unravel(jnp.asarray(gb_tok[j] / nb)))
        tok_layer[j] = [sc[g] for g in ab]
    # Probabilities of the ending after the answer (A's <eos> position = B's "." position).
    ex = {k: jnp.asarray(pa[k]) for k in ("tokens", "mask", "loss_mask")}
    probs = np.asarray(jax.nn.softmax(apply(params, ex)[0].astype(jnp.float32), -1))
    pos = int(np.nonzero(pa["loss_mask"][0])[0][-1]) - 1  # logits position predicting A's <eos>
    out["pair/p_eos_after_answer"] = float(probs[pos, tokenizer.eos_id])
    out["pair/p_dot_after_answer"] = float(probs[pos, tokenizer.index["."]])
    # Output-layer residuals at that position: A is pushed towards <eos>, B towards "." from the same h.
    p_vec = probs[pos].astype(np.float64)
    r_eos, r_dot = p_vec.copy(), p_vec.copy()
    r_eos[tokenizer.eos_id] -= 1.0
    r_dot[tokenizer.index["."]] -= 1.0
    out["pair/ending_residual_cos"] = float(r_eos @ r_dot / (np.linalg.norm(r_eos) * np.linalg.norm(r_dot)))
    # If B's ending tokens are negligible, cos ≈ sqrt(share of A's content token in ‖g_A‖²).
    content_rows = [i for i, n in enumerate(names_a) if n not in ("dot", "eos")]
    g_content = ga_tok[content_rows].sum(0) / na
    out["pair/content_norm_fraction_A"] = float(np.linalg.norm(g_content) / np.linalg.norm(ga))
    out["pair/content_norm_fraction_B"] = float(np.linalg.norm(gb_tok[content_rows].sum(0) / nb) / np.linalg.norm(gb))
    # The same pair at initialisation.
    ia, _ = grads(init_params, pa)
    ib, _ = grads(init_params, pb)
    out["pair/cosine_at_init"] = float(_cos(flat(ia).sum(0)[None], flat(ib).sum(0)[None])[0, 0])
    extras.update(names_a=names_a, names_b=names_b, cross=cross, tok_cos=tok_cos, groups=list(ab),
                  tok_layer=tok_layer, ga=ga, gb=gb, ga_tok=ga_tok, gb_tok=gb_tok)
    return out, extras


def _train(config, wd: Workdir, model, init_params, train_arrays, num_steps: int):
    t = config.train
    loss_fn = models_lib.make_loss_fns(model).loss_fn
    optimizer = train_lib.make_optimizer(t.optimizer, t.learning_rate, num_steps, t.schedule,
                                         min(t.warmup_steps, max(num_steps - 1, 0)), t.weight_decay)
    batch = _model_batch(train_arrays)
    eval_loss = jax.jit(loss_fn)
    batch_at = train_lib.batch_fn(batch, t.batch_size, config.seed)

    return train_lib.train(loss_fn, init_params, optimizer, batch_at, num_steps, workdir=wd,
                           checkpoint_every=0, eval_fn=lambda p: {"loss": float(eval_loss(p, batch))},
                           log_every=25, quiet=bool(config.get("quiet", False)), description=f"train LM ({num_steps} steps)")


def _stage(config, workdir: Workdir, prefix: str, ctx: dict, params) -> tuple[dict, dict]:
    """Pair analysis and ranking for one trained model; summary keys prefixed by `prefix`."""
    apply, tokenizer, pairs, queries = ctx["apply"], ctx["tokenizer"], ctx["pairs"], ctx["queries"]
    train_arrays, query_arrays, relevant, seed_idx = ctx["train"], ctx["query"], ctx["relevant"], ctx["seed_idx"]
    quiet = bool(config.get("quiet", False))
    summary: dict[str, Any] = {}

    # 1. The seed pair.
    pa = {k: v[:1] for k, v in query_arrays.items()}                      # "pizza" (no dot)
    pb = {k: v[seed_idx: seed_idx + 1] for k, v in train_arrays.items()}  # "pizza ." (training form)
    pair_out, pair_ex = _pair_analysis(apply, params, ctx["init_params"], tokenizer, pa, pb)
    summary.update(pair_out)
    pair_ex["query_text"] = f"{queries[0].prompt} → {queries[0].target}"
    pair_ex["doc_text"] = f"{pairs[seed_idx].prompt} → {pairs[seed_idx].target}"

    # 2. Features of all queries and training pairs.
    feature_fn = functools.partial(ctx["feature_fn"], params)
    fq, ft = features(feature_fn, query_arrays, config.chunk), features(feature_fn, train_arrays, config.chunk)
    no_embed = ~embed_mask(params)
    scores = {
        "dot": fq["mean"] @ ft["mean"].T,
        "dot_sum": fq["sum"] @ ft["sum"].T,
        "cosine": _cos(fq["mean"], ft["mean"]),
        "unit": fq["mean"] @ (ft["mean"] / np.maximum(np.linalg.norm(ft["mean"], axis=1, keepdims=True), 1e-30)).T,
        "cosine_no_embed": _cos(fq["mean"][:, no_embed], ft["mean"][:, no_embed]),
        "per_token_norm": _cos(fq["per_token_norm"], ft["per_token_norm"]),
        "content_only": _cos(fq["content"], ft["content"]),
    }
    twin = lambda s: np.array([s[q, r] for q, r in enumerate(relevant)])  # noqa: E731
    summary["pair/cosine_no_embed"] = float(scores["cosine_no_embed"][0, seed_idx])
    summary["pair/cosine_per_token_norm"] = float(scores["per_token_norm"][0, seed_idx])
    for name in ("cosine", "cosine_no_embed", "per_token_norm", "content_only"):
        c = twin(scores[name])
        summary[f"pairs/{name}/mean"], summary[f"pairs/{name}/median"] = float(c.mean()), float(np.median(c))
        summary[f"pairs/{name}/min"], summary[f"pairs/{name}/max"] = float(c.min()), float(c.max())
    # Does the flip direction matter? (query without "." vs its training twin with it, and the reverse)
    dotted_twin = np.array([pairs[r].dotted for r in relevant])
    for flag, label in ((True, "query_no_dot"), (False, "query_dot")):
        if (dotted_twin == flag).any():
            summary[f"pairs/cosine/mean_{label}"] = float(twin(scores["cosine"])[dotted_twin == flag].mean())
    # Length bias of the mean loss: gradient norm vs number of target tokens over the training pairs.
    t_len = train_arrays["loss_mask"][:, 1:].sum(1)
    for t in sorted(set(t_len.astype(int))):
        summary[f"length/mean_loss_grad_norm/T={t}"] = float(np.linalg.norm(ft["mean"][t_len == t], axis=1).mean())
        summary[f"length/sum_loss_grad_norm/T={t}"] = float(np.linalg.norm(ft["sum"][t_len == t], axis=1).mean())
    # Mean per-token gradient norm of the training pairs by kind of target token.
    tn = ft["token_norms"]
    pos, valid, content = target_positions(train_arrays)
    ends = train_arrays["tokens"][np.arange(len(pos))[:, None], pos + 1]
    summary["token_norm/train/content_mean"] = float(tn[content > 0].mean())
    summary["token_norm/train/dot_mean"] = float(tn[(ends == tokenizer.index["."]) & (valid > 0)].mean())
    summary["token_norm/train/eos_mean"] = float(tn[(ends == tokenizer.eos_id) & (valid > 0)].mean())

    # How well the model has memorised each training pair's ending (the token after the answer).
    probs = np.asarray(jax.nn.softmax(jax.jit(apply)(params, _model_batch(train_arrays)).astype(jnp.float32), -1))
    rows = np.arange(len(pos))
    after = pos[rows, content.sum(1).astype(int)]  # logits position that predicts the first ending token
    p_dot, p_eos = probs[rows, after, tokenizer.index["."]], probs[rows, after, tokenizer.eos_id]
    dotted = np.array([p.dotted for p in pairs])
    summary["ending/p_true_mean"] = float(np.where(dotted, p_dot, p_eos).mean())
    summary["ending/p_dot_or_eos_mean"] = float((p_dot + p_eos).mean())

    # 3. EK-FAC on the MLP layers (G23), the training pairs as fitting data.
    e = config.ekfac
    bs = 32
    batches = [data_lib.take(_model_batch(train_arrays), np.arange(i, min(i + bs, len(pairs))))
               for i in range(0, len(pairs), bs)]
    fit = ekfac.fit_ekfac(apply, params, batches, task="lm", layers=tuple(e.layers), seed=config.seed,
                          labels=e.labels, num_samples=e.num_samples, damping_factor=e.damping_factor,
                          folder=workdir.file(f"{prefix}ekfac"), progress=not quiet)
    layer_grads = jax.jit(lambda p, b: ekfac.per_example_layer_grads(apply, p, b, fit.layers, "lm"))
    qg = layer_grads(params, _model_batch(query_arrays))
    pre = fit.ihvp(qg)
    acts = jax.jit(lambda p, b: ekfac.layer_activations(apply, p, b, fit.layers, "lm")[0])(params, _model_batch(train_arrays))
    scores["ekfac"] = np.asarray(ekfac.influence_scores(pre, acts), np.float64)
    tg_b = layer_grads(params, _model_batch(pb))
    pre_b = fit.ihvp(tg_b)
    ip = lambda x, y: float(sum(jnp.vdot(x[k][0], y[k][0]) for k in x))  # noqa: E731
    qa0, pa0 = {k: v[:1] for k, v in qg.items()}, {k: v[:1] for k, v in pre.items()}
    summary["pair/cosine_ekfac"] = ip(pa0, tg_b) / math.sqrt(max(ip(pa0, qa0) * ip(pre_b, tg_b), 1e-300))
    summary["pair/cosine_mlp_only"] = ip(qa0, tg_b) / math.sqrt(max(ip(qa0, qa0) * ip(tg_b, tg_b), 1e-300))

    # 4. Exact influence with the damped Gauss–Newton of the training loss (all parameters).
    if config.exact_if.enabled:
        x = config.exact_if
        mv, dim = make_ggn_matvec(apply, params, train_arrays)
        lam_max = top_eigenvalue(lambda v: mv(v[None])[0], dim, num_iters=x.power_iters, key=jax.random.key(config.seed))
        damping = x.damping_rel * lam_max
        rhs = np.concatenate([fq["sum"], ft["sum"][seed_idx: seed_idx + 1]])
        sol, iters, resid = inverse_hvp(lambda v: mv(v[None])[0], jnp.asarray(rhs, jnp.float32), damping=damping,
                                        tol=x.tol, max_iters=x.max_iters, return_info=True)
        sol = np.asarray(sol)
        scores["exact_if"] = sol[:-1] @ ft["sum"].T
        ga_s, gb_s = fq["sum"][0], ft["sum"][seed_idx]
        summary["pair/cosine_exact_if"] = float(sol[0] @ gb_s / math.sqrt(max((sol[0] @ ga_s) * (sol[-1] @ gb_s), 1e-300)))
        summary.update({"exact_if/lambda_max": lam_max, "exact_if/damping": damping, "exact_if/cg_iters": iters,
                        "exact_if/max_rel_residual": resid})

    # 5. Ranking of the relevant training pair.
    ranks, top_kinds, top_docs = {}, {}, {}
    for name, sc in scores.items():
        r = rank_of_relevant(sc, relevant)
        ranks[name] = r
        summary[f"ranking/{name}/mrr"] = float(np.mean(1.0 / r))
        summary[f"ranking/{name}/recall@1"] = float(np.mean(r == 1))
        summary[f"ranking/{name}/mean_rank"] = float(np.mean(r))
        summary[f"ranking/{name}/median_rank"] = float(np.median(r))
        summary[f"ranking/{name}/seed_query_rank"] = int(r[0])
        tops = np.argmax(sc, axis=1)
        kinds = [kind_of(queries[q], pairs[t], t == relevant[q]) for q, t in enumerate(tops)]
        top_kinds[name], top_docs[name] = kinds, [dataclasses.asdict(pairs[t]) for t in tops]
        for k in KINDS:
            summary[f"ranking/{name}/top1_kind/{k}"] = float(np.mean([x == k for x in kinds]))
        summary[f"ranking/{name}/top1_same_ending_as_query"] = float(np.mean(
            [pairs[t].dotted == queries[q].dotted for q, t in enumerate(tops)]))
    summary["ranking/num_queries"], summary["ranking/num_documents"] = len(queries), len(pairs)
    summary["ranking/chance_mrr"] = float(np.mean(1.0 / np.arange(1, len(pairs) + 1)))
    atomic_write_json(workdir.file(f"{prefix}ranks.json"), {
        "queries": [dataclasses.asdict(q) for q in queries], "relevant": relevant, "ranks": ranks,
        "top1_kind": top_kinds, "top1_doc": top_docs})
    names = [n for n in REMEDIES if n in scores]
    pair_ex["ranks"], pair_ex["names"] = ranks, names
    return {f"{prefix}{k}": v for k, v in summary.items()}, pair_ex


def run(config, workdir: Workdir) -> dict:
    validate_config(config)
    quiet = bool(config.get("quiet", False))
    d = config.data
    pairs = make_pairs(config.seed, d.num_subjects, d.answers_per_prompt, d.dot_fraction,
                       forced=(config.pair.prompt, config.pair.answer))
    tokenizer = WordTokenizer.fit([f"{p.prompt} {p.answer} ." for p in pairs])
    train_arrays = encode(tokenizer, pairs, config.max_len)
    model, init_params = models_lib.build_model(
        "transformer", jax.random.key(config.seed), data_lib.take(_model_batch(train_arrays), np.arange(1)),
        vocab_size=tokenizer.vocab_size, max_len=config.max_len, positional="rope", **config.model.to_dict())
    # Queries: the seed pair first, then a random sample of training pairs, each with its ending flipped.
    seed_idx = next(i for i, p in enumerate(pairs) if (p.prompt, p.answer) == (config.pair.prompt, config.pair.answer))
    others = [int(i) for i in np.random.default_rng([config.seed, 5]).permutation(len(pairs)) if i != seed_idx]
    relevant = np.array([seed_idx] + others[: max(0, min(config.num_queries, len(pairs)) - 1)])
    queries = [pairs[i].flipped() for i in relevant]
    ctx = {"apply": model.apply, "tokenizer": tokenizer, "pairs": pairs, "queries": queries, "train": train_arrays,
           "query": encode(tokenizer, queries, config.max_len), "relevant": relevant, "seed_idx": seed_idx,
           "init_params": init_params, "feature_fn": make_feature_fn(model.apply)}
    summary: dict[str, Any] = {"num_pairs": len(pairs), "num_params": models_lib.count_params(init_params),
                               "dot_fraction_in_corpus": float(np.mean([p.dotted for p in pairs])),
                               "ending_entropy_nats": float(-d.dot_fraction * math.log(d.dot_fraction)
                                                            - (1 - d.dot_fraction) * math.log(1 - d.dot_fraction)),
                               "answer_entropy_nats": math.log(d.answers_per_prompt)}
    stages = [("", config.train.num_steps)]
    if config.train.early_steps:
        stages.append(("early/", config.train.early_steps))
    extras = {}
    for prefix, steps in stages:
        result = _train(config, Workdir(workdir.file(f"{prefix}lm")), model, init_params, train_arrays, steps)
        summary[f"{prefix}train_loss"] = result.eval_metrics["loss"]
        summary[f"{prefix}train_steps"] = steps
        out, extras[prefix] = _stage(config, workdir, prefix, ctx, result.params)
        summary.update(out)
    for k, v in summary.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"summary[{k!r}] = {v}")
    workdir.log(config.train.num_steps, **summary)
    for prefix in extras:
        tag = prefix.rstrip("/") or "final"
        _plot_pair(workdir.file(f"pair_decomposition_{tag}.png"), summary, extras[prefix], prefix)
        _plot_ranking(workdir.file(f"ranking_{tag}.png"), summary, extras[prefix], prefix)
    report = _report(config, summary, extras)
    atomic_write_text(workdir.file("report.md"), report)
    if not quiet:
        print(report)
    return summary


# ----------------------------------------------------------------------------------------------
# Plots and report
# ----------------------------------------------------------------------------------------------

def _plot_pair(path: str, summary: dict, ex: dict, prefix: str = "") -> None:
    s = {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)}
    fig, grid = plots.figure(1, 3, size=(18, 4.8))
    axes = grid[0]
    na, nb = ex["names_a"], ex["names_b"]
    labels = [f"A:{n}" for n in na] + [f"B:{n}" for n in nb]
    norms = [s[f"pair/token_norm/A/{n}"] for n in na] + [s[f"pair/token_norm/B/{n}"] for n in nb]
    axes[0].bar(labels, norms, color=["C0"] * len(na) + ["C1"] * len(nb))
    axes[0].set(ylabel="‖∇ℓ_t‖ per target token",
                title=f"{'early' if prefix else 'trained'} model: per-token gradient norms\nA: {ex['query_text']}   B: {ex['doc_text']}")
    share = ex["cross"] / (ex["ga"] @ ex["gb"])
    im = axes[1].imshow(share, cmap="coolwarm", vmin=-1.2, vmax=1.2)
    axes[1].set_xticks(range(len(nb)), [f"B:{n}" for n in nb])
    axes[1].set_yticks(range(len(na)), [f"A:{n}" for n in na])
    for i in range(len(na)):
        for j in range(len(nb)):
            axes[1].text(j, i, f"{share[i, j]:+.2f}\ncos {ex['tok_cos'][i, j]:+.2f}", ha="center", va="center", fontsize=8)
    axes[1].set_title(f"share of ⟨∇ℓ_A, ∇ℓ_B⟩ per token pair\n(whole-gradient cosine {s['pair/cosine']:.3f})")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    groups = ex["groups"]
    xs = np.arange(len(groups))
    axes[2].bar(xs - 0.27, [s[f"pair/layer_share/{g}"] for g in groups], 0.27, label="share of ⟨g_A, g_B⟩")
    axes[2].bar(xs, [s[f"pair/layer_distance_share/{g}"] for g in groups], 0.27, label="share of 1 − cos")
    axes[2].bar(xs + 0.27, [s[f"pair/layer_cos/{g}"] for g in groups], 0.27, label="layer's own cosine")
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set_xticks(xs, groups, rotation=40, ha="right", fontsize=8)
    axes[2].set_title("per-layer decomposition")
    plots.legend(axes[2])
    axes[1].grid(False)
    plots.save(fig, path)


def _plot_ranking(path: str, summary: dict, ex: dict, prefix: str = "") -> None:
    s = {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)}
    names, ranks = ex["names"], ex["ranks"]
    fig, axes = plots.figure(1, 2, size=(13.5, 4.4))
    mrr_ax, rank_ax = axes[0]
    mrr_ax.bar(names, [s[f"ranking/{n}/mrr"] for n in names], color="C2")
    plots.reference_line(mrr_ax, y=s["ranking/chance_mrr"], label="chance (random ranking)")
    mrr_ax.set(ylabel="MRR of the relevant training pair", ylim=(0, 1.05),
               title=f"{'early' if prefix else 'trained'} model ({s['train_steps']} steps): retrieval per score")
    mrr_ax.tick_params(axis="x", rotation=45)
    for label in mrr_ax.get_xticklabels():
        label.set_horizontalalignment("right")
    mrr_ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.08), borderaxespad=0.0)
    rank_ax.boxplot([ranks[n] for n in names], showmeans=True)
    rank_ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
    rank_ax.set_yscale("log")
    top = max(int(np.max(ranks[n])) for n in names)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= max(top, 1) * 1.5]
    rank_ax.yaxis.set_major_locator(FixedLocator(ticks))
    rank_ax.yaxis.set_major_formatter(FixedFormatter([str(t) for t in ticks]))
    rank_ax.yaxis.set_minor_formatter(NullFormatter())
    rank_ax.set(ylabel="rank of the relevant pair (1 = best)",
                title=f"{s['ranking/num_queries']} queries, {s['ranking/num_documents']} training pairs")
    plots.save(fig, path)


def _pair_section(s: dict, ex: dict) -> str:
    """Markdown tables and the measured explanation for one model (`s`: summary without prefix)."""
    na, nb = ex["names_a"], ex["names_b"]
    content = [n for n in na if n not in ("dot", "eos")]
    c0 = content[0] if content else na[0]
    tok_rows = "\n".join(
        f"| {side}:{n} | {s[f'pair/token_loss/{side}/{n}']:.3f} | {s[f'pair/token_norm/{side}/{n}']:.3f} | "
        f"{s[f'pair/token_norm_share/{side}:{n}']:+.2f} | {s[f'pair/token_share/{side}:{n}']:+.2f} |"
        for side, names_ in (("A", na), ("B", nb)) for n in names_)
    pair_rows = "\n".join(
        f"| A:{a} · B:{b} | {s[f'pair/token_cos/A:{a}|B:{b}']:+.3f} | {s[f'pair/token_pair_share/A:{a}|B:{b}']:+.2f} |"
        for a in na for b in nb)
    groups = ex["groups"]
    layer_rows = "\n".join(
        f"| {g} | {s[f'pair/layer_norm_share_A/{g}']:.2f} | {s[f'pair/layer_norm_share_B/{g}']:.2f} | "
        f"{s[f'pair/layer_share/{g}']:+.2f} | {s[f'pair/layer_distance_share/{g}']:+.2f} | {s[f'pair/layer_cos/{g}']:+.3f} |"
        for g in groups)
    len_keys = sorted(k for k in s if k.startswith("length/mean_loss_grad_norm/"))
    length = ", ".join(f"T={k.split('T=')[1]}: {s[k]:.3f} (sum loss {s[k.replace('mean_loss', 'sum_loss')]:.3f})"
                       for k in len_keys)
    ending_a = 1 - s[f"pair/token_norm_share/A:{c0}"] if len(content) == 1 else float("nan")
    ending_b = 1 - s[f"pair/token_norm_share/B:{c0}"] if len(content) == 1 else float("nan")
    top_layer = max(groups, key=lambda g: s[f"pair/layer_distance_share/{g}"])
    big = max(na, key=lambda n: s[f"pair/token_norm/A/{n}"])
    top_nll = max(na, key=lambda n: s[f"pair/token_loss/A/{n}"])
    big_sentence = (f"In A the largest per-token gradient is A:{big} (‖∇ℓ_t‖ {s[f'pair/token_norm/A/{big}']:.2f}, NLL "
                    f"{s[f'pair/token_loss/A/{big}']:.2f}); " + ("it is also A's highest-loss token." if big == top_nll else
                    f"the highest-loss token is A:{top_nll} (NLL {s[f'pair/token_loss/A/{top_nll}']:.2f}), so the norm is "
                    "not set by the loss alone (it also depends on the hidden state and the output rows involved)."))
    remedy_pair = (f"content tokens only {s['pair/cosine_content_only']:.3f}; per-token normalisation "
                   f"{s['pair/cosine_per_token_norm']:.3f}; without the embedding {s['pair/cosine_no_embed']:.3f}; "
                   f"MLP layers only {s['pair/cosine_mlp_only']:.3f}; EK-FAC metric on the MLP layers "
                   f"{s['pair/cosine_ekfac']:.3f}"
                   + (f"; exact-IF metric (G+λI)⁻¹ {s['pair/cosine_exact_if']:.3f}" if "pair/cosine_exact_if" in s else ""))
    return f"""A = `{ex['query_text']}` (target tokens {na}), B = `{ex['doc_text']}` (target tokens {nb}; B is how
this pair is written in the training data).

* whole-gradient cosine **{s['pair/cosine']:.3f}** (identical pairs: {s['pair/cosine_identical']:.3f}; the same
  pair at initialisation: {s['pair/cosine_at_init']:.3f}); ‖∇ℓ_A‖ = {s['pair/norm_A']:.3f}, ‖∇ℓ_B‖ = {s['pair/norm_B']:.3f}.
* with the **sum** loss instead of the mean the cosine is {s['pair/cosine_sum_loss']:.3f}: the 1/T weight
  (1/{s['pair/num_target_tokens_A']} vs 1/{s['pair/num_target_tokens_B']}) multiplies each whole gradient by one
  number, which a cosine cannot see. It matters for raw dot products across examples of different length
  (training pairs, mean gradient norm by number of target tokens T: {length}).
* over the training pairs, the model gives their written ending p = {s['ending/p_true_mean']:.3f} on average
  (p(".") + p(`<eos>`) = {s['ending/p_dot_or_eos_mean']:.3f}): 1 means every pair's ending is memorised.
* after "{c0}" the model gives p(`<eos>`) = {s['pair/p_eos_after_answer']:.3f}, p(".") = {s['pair/p_dot_after_answer']:.3f};
  the two output residuals p − e_eos (A's target there) and p − e_dot (B's) have cosine {s['pair/ending_residual_cos']:+.3f}.

Per target token: its NLL, ‖∇ℓ_t‖ (unweighted), its share of the own ‖g‖² (⟨∇ℓ_t/T, g⟩/‖g‖²) and of ⟨g_A, g_B⟩:

| token | NLL | ‖∇ℓ_t‖ | share of own ‖g‖² | share of ⟨g_A,g_B⟩ |
|---|---|---|---|---|
{tok_rows}

Token × token: cosine of the two per-token gradients and the share of ⟨g_A, g_B⟩ (⟨a_i, b_j⟩/(T_A T_B)/⟨g_A, g_B⟩):

| token pair | cosine | share |
|---|---|---|
{pair_rows}

Per layer: share of ‖g_A‖², of ‖g_B‖², of ⟨g_A, g_B⟩, of the deficit 1 − cos (= Σ_layers ½‖â_l − b̂_l‖², â = g_A/‖g_A‖),
and the layer's own cosine:

| layer | ‖g_A‖² | ‖g_B‖² | ⟨g_A,g_B⟩ | 1 − cos | cosine |
|---|---|---|---|---|---|
{layer_rows}

Reading these numbers:
1. The answer token "{c0}" is predicted from the same prefix in A and B (a causal decoder; T5's decoder is
   causal too), so its per-token gradient is identical in both: cosine {s.get(f'pair/token_cos/A:{c0}|B:{c0}', float('nan')):.3f}.
   Everything that separates A and B comes from the tokens after it.
2. The ending tokens hold {ending_a:.0%} of ‖g_A‖² and {ending_b:.0%} of ‖g_B‖² (the "share of own ‖g‖²" rows).
   The content token is {s['pair/content_norm_fraction_A']:.2f} of ‖g_A‖ and {s['pair/content_norm_fraction_B']:.2f} of
   ‖g_B‖ in norm; if the ending gradients were orthogonal to everything else the cosine would be the product,
   {s['pair/content_norm_fraction_A'] * s['pair/content_norm_fraction_B']:.3f} (measured {s['pair/cosine']:.3f}).
   {big_sentence}
3. At the position after the answer, A's `<eos>` and B's "." are predicted from the same hidden state h towards
   different targets; the output-layer parts are h ⊗ (p − e_y), with residual cosine {s['pair/ending_residual_cos']:+.3f},
   and the per-token gradients have cosine {s.get('pair/token_cos/A:eos|B:dot', float('nan')):+.3f}.
4. Per layer, the tied embedding / unembedding holds {s.get('pair/layer_norm_share_A/embed (tied unembedding)', float('nan')):.0%}
   of ‖g_A‖² (each predicted vocabulary item has its own output row, so "." and `<eos>` live on different coordinates);
   the largest share of the deficit 1 − cos is in `{top_layer}` ({s[f'pair/layer_distance_share/{top_layer}']:.0%}).

The same pair under the remedies: {remedy_pair}.

Over {s['ranking/num_queries']} such pairs (each query against its flipped-ending training twin) the
whole-gradient cosine is {s['pairs/cosine/mean']:.3f} on average (median {s['pairs/cosine/median']:.3f}, range
{s['pairs/cosine/min']:.3f} to {s['pairs/cosine/max']:.3f}); content tokens only {s['pairs/content_only/mean']:.3f}; per-token
normalisation {s['pairs/per_token_norm/mean']:.3f}; without the embedding {s['pairs/cosine_no_embed/mean']:.3f}.
"""


def _ranking_section(s: dict, ex: dict, config) -> str:
    names = ex["names"]
    rows = "\n".join(
        f"| {n} | {s[f'ranking/{n}/mrr']:.3f} | {s[f'ranking/{n}/recall@1']:.2f} | {s[f'ranking/{n}/median_rank']:.1f} | "
        f"{s[f'ranking/{n}/mean_rank']:.1f} | {s[f'ranking/{n}/seed_query_rank']} | "
        + " / ".join(f"{s[f'ranking/{n}/top1_kind/{k}']:.2f}" for k in KINDS)
        + f" | {s[f'ranking/{n}/top1_same_ending_as_query']:.2f} |" for n in names)
    exact = ""
    if "exact_if/damping" in s:
        exact = (f" Exact IF: λ = {config.exact_if.damping_rel} × λ_max = {s['exact_if/damping']:.3g} (λ_max ≈ "
                 f"{s['exact_if/lambda_max']:.3g}), {s['exact_if/cg_iters']} CG iterations, max relative residual "
                 f"{s['exact_if/max_rel_residual']:.1e}.")
    return f"""Documents: all {s['ranking/num_documents']} training pairs; chance MRR {s['ranking/chance_mrr']:.3f}.
Top-1 kind: fraction of queries whose best-scored document is the relevant one / same input, other answer /
same answer, other input / same category / other.{exact}

| score | MRR | recall@1 | median rank | mean rank | seed query's rank | top-1 kind (rel / same input / same answer / category / other) | top-1 shares the query's ending |
|---|---|---|---|---|---|---|---|
{rows}
"""


def _report(config, summary: dict, extras: dict) -> str:
    final = {k: v for k, v in summary.items() if not k.startswith("early/")}
    early = {k[len("early/"):]: v for k, v in summary.items() if k.startswith("early/")}
    ex = extras[""]
    lines = [f"""# The gradient-similarity pitfall: one trailing "." and the whole-gradient cosine

Seed (T5-small, a Q&A thread): input "I like to eat", target "pizza" vs "pizza." gives a whole-gradient cosine
of **0.46** (1.0 for identical pairs). No pretrained sequence model can be loaded offline here, so this run
uses the tiny decoder-only transformer of `experiments/common/models.py` ({config.model.num_layers} layers,
d={config.model.d_model}, tied input/output embedding, {summary['num_params']} parameters) trained from scratch on
{summary['num_pairs']} generated (input, target) pairs ("i like to eat" → "pizza", "we want to drink" → "tea .", …;
each (input, answer) combination occurs once; {summary['dot_fraction_in_corpus']:.0%} of the targets end with " .").
The input is the prefix; the loss is the T5 / Hugging Face one, the **mean** NLL over the target tokens and
`<eos>`. Two models: **trained** ({final['train_steps']} steps, training loss {final['train_loss']:.3f} nats per pair)
and **early** ({early.get('train_steps', 'n/a')} steps, loss {early.get('train_loss', float('nan')):.3f}). The loss
floor of a model that knows the answer distribution but not the per-pair ending is log({config.data.answers_per_prompt}) +
H(ending) = {summary['answer_entropy_nats'] + summary['ending_entropy_nats']:.3f} nats: below it, the model has
memorised which pairs end with ".". All numbers are measured in this run (seed {config.seed}); they describe
this small model, not T5.

## 1. The pair, trained model

{_pair_section(final, ex)}
## 2. Ranking, trained model

Each query is a training pair with its ending flipped (the seed pair first, then a random sample: a query
drops the "." of a dotted training pair or adds one to an undotted pair); the relevant document is that training pair, the only one that teaches this (input, answer)
combination. Scores: `dot` (mean-loss gradients, as in the seed), `dot_sum` (sum loss), `cosine`, `unit`
(unit-normalised training gradients: per query the same ranking as cosine), `cosine_no_embed` (tied
embedding dropped), `per_token_norm` (each target token's gradient normalised before summing),
`content_only` (the "." and `<eos>` positions dropped), `ekfac` (⟨(Ĝ+λI)⁻¹∇ℓ_q, ∇ℓ_i⟩ on the MLP layers,
attribution/ekfac.py, {config.ekfac.labels} labels, damping {config.ekfac.damping_factor}×mean Λ, sum-over-token
losses as in Grosse et al. 2023) and `exact_if` (∇ℓ_qᵀ(G+λI)⁻¹∇ℓ_i, G the Gauss–Newton matrix of the training
loss over all parameters, conjugate gradient).

{_ranking_section(final, ex, config)}
![pair](pair_decomposition_final.png)
![ranking](ranking_final.png)
"""]
    if "early/" in extras:
        ee = extras["early/"]
        lines.append(f"""
## 3. The same, early model ({early['train_steps']} steps)

{_pair_section(early, ee)}
{_ranking_section(early, ee, config)}
![pair](pair_decomposition_early.png)
![ranking](ranking_early.png)
""")
    lines.append(_conclusions(final, early))
    return "\n".join(lines)


def _conclusions(final: dict, early: dict) -> str:
    """Measured, not assumed: the statements below are chosen by the numbers of this run."""
    out = ["## Summary of the measurements", ""]
    for tag, s in (("trained", final), ("early", early)):
        if not s:
            continue
        mrr = {k.split("/")[1]: v for k, v in s.items() if k.startswith("ranking/") and k.endswith("/mrr")}
        good = sorted([n for n, v in mrr.items() if v >= 0.95])
        bad = sorted([n for n, v in mrr.items() if v < 0.95], key=lambda n: mrr[n])
        out.append(
            f"* **{tag} model** ({s['train_steps']} steps; written endings predicted with p = {s['ending/p_true_mean']:.2f}): "
            f"seed-pair cosine {s['pair/cosine']:.3f}, mean over the query pairs {s['pairs/cosine/mean']:.3f}. "
            f"Mean per-token gradient norm over the training pairs: answer tokens {s['token_norm/train/content_mean']:.2f}, "
            f"\".\" {s['token_norm/train/dot_mean']:.2f}, `<eos>` {s['token_norm/train/eos_mean']:.2f}. "
            f"MRR ≥ 0.95: {', '.join(good) or 'none'}; below: " + (", ".join(f"{n} {mrr[n]:.3f}" for n in bad) or "none") + ".")
    out.append("")
    if final and final["pair/cosine"] < 0.7 and final["ranking/cosine/mrr"] >= 0.95:
        out.append(
            "In the trained model the near-duplicate pair has a low whole-gradient cosine, yet the raw scores still rank "
            "the relevant pair first: the query's flipped ending is a high-loss token whose gradient dominates the "
            "query gradient, but it lowers the similarity to *every* document alike, because the training pairs' own "
            "endings are memorised (small ending gradients) and their gradients are carried by the answer token. A low "
            "cosine between near-duplicates is not by itself a broken ranking; what matters is whether another document "
            "is closer.")
    if early and early["ranking/cosine/mrr"] < 0.9:
        worst = max(KINDS[1:], key=lambda k: early[f"ranking/cosine/top1_kind/{k}"])
        out.append(
            f"In the early model the ending tokens of every document still carry large gradients, and the raw scores "
            f"do break: cosine MRR {early['ranking/cosine/mrr']:.3f} (mean rank {early['ranking/cosine/mean_rank']:.1f} "
            f"of {early['ranking/num_documents']}), most often beaten by a document of kind `{worst}` "
            f"({early[f'ranking/cosine/top1_kind/{worst}']:.0%} of the queries); the top-1 document ends like the query "
            f"in {early['ranking/cosine/top1_same_ending_as_query']:.0%} of the queries.")
    if final and final["ranking/per_token_norm/mrr"] < final["ranking/cosine/mrr"] - 0.05:
        out.append(
            f"Per-token normalisation hurts in the trained model (MRR {final['ranking/per_token_norm/mrr']:.3f} vs cosine "
            f"{final['ranking/cosine/mrr']:.3f}): it blows the tiny gradients of well-predicted (memorised) ending tokens up "
            "to unit length, so every document gets one or two unit vectors that depend only on how it ends.")
    out.append(
        "Caveat on `content_only`: here the relevant document shares the query's prefix and answer exactly, so in a causal "
        "model their answer-token gradients are identical and `content_only` scores the twin with cosine 1 by "
        "construction. It shows that the punctuation / `<eos>` positions are what separates the pair; it is not evidence "
        "that dropping those positions finds relevant documents that are paraphrases rather than near-copies.")
    both = [n for n in REMEDIES if final.get(f"ranking/{n}/mrr", 0) >= 0.95 and early.get(f"ranking/{n}/mrr", 1) >= 0.95]
    out.append(f"Scores with MRR ≥ 0.95 in every model of this run: {', '.join(both) or 'none'}. The 1/T mean-over-tokens "
               "weight is not the cause of the low pair cosine (the sum-loss cosine is identical); it only rescales raw "
               "dot products by sequence length.")
    out.append("")
    return "\n\n".join(out).replace("\n\n\n\n", "\n\n")
