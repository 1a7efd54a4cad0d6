"""configs/gradient_similarity_pitfall.py on a shrunken model, and the decomposition identities it relies on."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution.scorers import inverse_hvp
from configs import gradient_similarity_pitfall as config_lib
from experiments import gradient_similarity_pitfall as gsp
from experiments.common import models as models_lib
from experiments.run import run_experiment
from experiments.common.tokenizers import WordTokenizer


def _tiny_config():
    config = config_lib.get_config("quick")
    config.data.update(num_subjects=1, answers_per_prompt=4)
    config.train.update(num_steps=30, batch_size=8, warmup_steps=2, early_steps=10)
    config.model.update(num_layers=1, d_model=16, num_heads=2)
    config.num_queries = 4
    config.exact_if.update(max_iters=30, power_iters=5)
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsp")
    return run_experiment(_tiny_config(), str(path), quiet=True), path


def test_summary_keys_finite_and_files(tiny_run):
    summary, path = tiny_run
    for name in ("report.md", "summary.json", "pair_decomposition_final.png", "ranking_final.png", "ranks.json",
                 "pair_decomposition_early.png", "ranking_early.png", "early/ranks.json"):
        assert os.path.exists(path / name), name
    with open(path / "summary.json") as f:
        on_disk = json.load(f)
    for key in ("pair/cosine", "pair/cosine_sum_loss", "pair/cosine_identical", "pair/cosine_content_only",
                "pair/cosine_ekfac", "pair/cosine_exact_if", "pair/token_share/B:dot", "pair/token_share/A:eos",
                "pair/layer_share/embed (tied unembedding)", "pairs/cosine/mean", "exact_if/damping"):
        assert key in on_disk, key
    for prefix in ("", "early/"):
        for remedy in gsp.REMEDIES:
            assert 0.0 < on_disk[f"{prefix}ranking/{remedy}/mrr"] <= 1.0
            assert sum(on_disk[f"{prefix}ranking/{remedy}/top1_kind/{k}"] for k in gsp.KINDS) == pytest.approx(1.0)
        assert on_disk[f"{prefix}train_steps"] == (30 if not prefix else 10)
    for key, value in on_disk.items():
        if isinstance(value, (int, float)):
            assert math.isfinite(value), key


@pytest.mark.parametrize("stage", ["", "early/"])
def test_pair_decompositions_sum_to_the_whole(tiny_run, stage):
    s = {k[len(stage):]: v for k, v in tiny_run[0].items() if k.startswith(stage)}
    assert s["pair/cosine_identical"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= s["pair/cosine"] <= 1.0
    # Per-token and per-layer shares of ⟨g_A, g_B⟩ each sum to 1; so do the token-pair shares.
    for prefix in ("pair/token_share/B:", "pair/token_share/A:", "pair/token_pair_share/", "pair/layer_share/",
                   "pair/layer_norm_share_A/", "pair/layer_norm_share_B/", "pair/token_norm_share/A:",
                   "pair/token_norm_share/B:", "pair/layer_distance_share/"):
        total = sum(v for k, v in s.items() if k.startswith(prefix))
        assert total == pytest.approx(1.0, abs=1e-3), prefix
    # The mean over target tokens rescales each gradient by 1/T only: the cosine is unchanged.
    assert s["pair/cosine_sum_loss"] == pytest.approx(s["pair/cosine"], abs=1e-4)
    assert s["pair/norm_A_sum_loss"] == pytest.approx(s["pair/norm_A"] * s["pair/num_target_tokens_A"], rel=1e-4)
    # The shared answer token sees the same prefix in A and B (causal model): identical gradients.
    assert s["pair/token_cos/A:pizza|B:pizza"] == pytest.approx(1.0, abs=1e-4)
    assert s["pair/cosine_content_only"] == pytest.approx(1.0, abs=1e-4)
    assert s["pairs/content_only/min"] == pytest.approx(1.0, abs=1e-4)
    # unit-normalised training gradients rank exactly like the cosine.
    assert s["ranking/unit/mrr"] == pytest.approx(s["ranking/cosine/mrr"])
    assert s["exact_if/max_rel_residual"] < 1.0


def _tiny_model(seed=0):
    pairs = gsp.make_pairs(seed, 1, 3, 0.5, forced=("i like to eat", "pizza"))
    tok = WordTokenizer.fit([f"{p.prompt} {p.answer} ." for p in pairs])
    arrays = gsp.encode(tok, pairs, 12)
    model, params = models_lib.build_model("transformer", jax.random.key(seed),
                                           {k: v[:1] for k, v in gsp._model_batch(arrays).items()},
                                           vocab_size=tok.vocab_size, max_len=12, num_layers=1, d_model=8, num_heads=2)
    return pairs, tok, arrays, model, params


def test_features_match_autodiff_of_the_mean_and_sum_losses():
    pairs, tok, arrays, model, params = _tiny_model()
    feats = gsp.features(gsp.make_feature_fn(model.apply, params), arrays, chunk=4)
    for i in (0, len(pairs) - 1):
        ex = {k: jnp.asarray(arrays[k][i]) for k in ("tokens", "mask", "loss_mask")}
        t = float(arrays["loss_mask"][i, 1:].sum())
        g_sum = jax.grad(lambda p: gsp.token_losses(model.apply, p, ex).sum())(params)
        flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(g_sum)])
        np.testing.assert_allclose(feats["sum"][i], flat, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(feats["mean"][i], flat / t, rtol=1e-4, atol=1e-6)
        # per-token norms: one per target token (answer words, maybe ".", <eos>)
        assert (feats["token_norms"][i] > 0).sum() == int(t)
    # targets: "<answer> [.] <eos>" in the loss, the answer only in `content`
    assert (arrays["loss_mask"].sum(1) - arrays["content"].sum(1) == np.array([2 if p.dotted else 1 for p in pairs])).all()


def test_ggn_cg_solves_the_damped_system():
    """The experiment's GGN of the tiny LM, solved by the library's block CG (attribution.scorers.inverse_hvp)."""
    _, _, arrays, model, params = _tiny_model()
    mv, dim = gsp.make_ggn_matvec(model.apply, params, arrays)
    rhs = np.asarray(jax.random.normal(jax.random.key(1), (2, dim)))
    x, _, resid = inverse_hvp(lambda v: mv(v[None])[0], jnp.asarray(rhs), damping=0.1, tol=1e-6, max_iters=500,
                              return_info=True)
    x = np.asarray(x)
    assert resid < 1e-3
    np.testing.assert_allclose(np.asarray(mv(jnp.asarray(x))) + 0.1 * x, rhs, atol=1e-3 * np.abs(rhs).max())
    v = jnp.asarray(rhs[:1])
    assert float(jnp.vdot(v, mv(v))) >= 0.0  # Gauss–Newton is PSD


def test_config_validation():
    config = config_lib.get_config("quick")
    config.pair.answer = "tea"
    with pytest.raises(ValueError, match="config.pair.answer"):
        gsp.validate_config(config)
    config = config_lib.get_config("quick")
    config.data.dot_fraction = 1.0
    with pytest.raises(ValueError, match="dot_fraction"):
        gsp.validate_config(config)
    with pytest.raises(ValueError, match="preset"):
        config_lib.get_config("slow")
