"""Tests of attribution/ekfac.py against dense float64 Gauss–Newton references on tiny models."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import artifacts
from attribution import ekfac
from experiments.common.models import build_model, make_loss_fns

IN, HIDDEN, CLASSES = 4, 5, 3


def _mlp(n, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"x": jnp.asarray(rng.normal(size=(n, IN))), "y": jnp.asarray(rng.integers(0, CLASSES, n))}
    model, params = build_model("mlp", jax.random.key(seed), batch, hidden=[HIDDEN], num_classes=CLASSES)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.result_type(float)) * 1.5, params)
    return model, params, batch


def _exact_ggn_blocks(model, params, batch, layers):
    """Dense GGN E_b[J_bᵀ (diag p − p pᵀ) J_b] restricted to each layer's W̃ (row-major vec)."""
    mats = ekfac.params_to_layer_grads(params, layers)

    def logits_of(m):
        p = jax.tree_util.tree_map(lambda a: a, params)
        for path, d in ekfac.layer_grads_to_params(m, layers).items():
            p = {**p, path: {**p[path], **d}}
        return model.apply(p, batch)

    logits = logits_of(mats)
    jac = jax.jacobian(logits_of)(mats)
    probs = jax.nn.softmax(logits)
    H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(probs)
    blocks = {}
    for path in layers:
        J = jac[path].reshape(logits.shape[0], CLASSES, -1)
        blocks[path] = np.asarray(jnp.einsum("bci,bcd,bdj->ij", J, H, J)) / logits.shape[0]
    return blocks


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _ihvp_errors(n, x64_seed=0):
    model, params, batch = _mlp(n, x64_seed)
    fit = ekfac.fit_ekfac(model.apply, params, [batch], task="classification", layers=(".*",),
                          labels="exact", progress=False)
    blocks = _exact_ggn_blocks(model, params, batch, fit.layers)
    rng = np.random.default_rng(1)
    errs = {"ekfac": [], "kfac": []}
    for path, info in fit.layers.items():
        f = fit.factors[path]
        v = rng.normal(size=(info.rows, info.out_dim))
        exact = np.linalg.solve(blocks[path] + f.damping * np.eye(v.size), v.reshape(-1)).reshape(v.shape)
        for method in ("ekfac", "kfac"):
            errs[method].append(_rel(f.ihvp(jnp.asarray(v), method), exact))
    return fit, blocks, errs


def test_single_example_is_exact(x64):
    """One example, one token: each GGN block is exactly A ⊗ S, so K-FAC = EK-FAC = exact."""
    fit, blocks, errs = _ihvp_errors(1)
    assert max(errs["ekfac"]) < 1e-10 and max(errs["kfac"]) < 1e-10, errs
    for path, f in fit.factors.items():
        np.testing.assert_allclose(f.dense("ekfac"), blocks[path], atol=1e-12)
        np.testing.assert_allclose(f.Lambda, np.outer(f.eig_A, f.eig_S), atol=1e-12)


def test_ekfac_beats_kfac_and_lambda_is_ggn_diagonal(x64):
    """Many examples: Λ = diag((Q_A⊗Q_S)ᵀ G (Q_A⊗Q_S)) exactly (labels averaged exactly), K-FAC
    is the Kronecker product of the factors, and the EK-FAC IHVP error is below K-FAC's."""
    fit, blocks, errs = _ihvp_errors(32)
    for path, f in fit.factors.items():
        q = np.kron(f.Q_A, f.Q_S)
        np.testing.assert_allclose(f.Lambda.reshape(-1), np.diag(q.T @ blocks[path] @ q), atol=1e-12)
        np.testing.assert_allclose(f.dense("kfac"), np.kron(f.A, f.S), atol=1e-12)
        assert f.A.shape == (f.Q_A.shape[0],) * 2 and f.Lambda.shape == (f.A.shape[0], f.S.shape[0])
    print("rel. IHVP error vs exact damped GGN block, per layer:", errs)
    for e, k in zip(errs["ekfac"], errs["kfac"]):
        assert e < k
    assert max(errs["ekfac"]) < 1.0


def test_sampled_labels_approach_exact(x64):
    model, params, batch = _mlp(64)
    exact = ekfac.fit_ekfac(model.apply, params, [batch], task="classification", layers=(".*",),
                            labels="exact", progress=False)
    sampled = ekfac.fit_ekfac(model.apply, params, [batch], task="classification", layers=(".*",),
                              labels="sampled", num_samples=64, progress=False)
    for p in exact.factors:
        assert _rel(sampled.factors[p].S, exact.factors[p].S) < 0.15
        assert _rel(sampled.factors[p].Lambda, exact.factors[p].Lambda) < 0.15
        np.testing.assert_allclose(sampled.factors[p].A, exact.factors[p].A, atol=1e-12)  # labels-free


def _tiny_lm(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 11, (6, 7)))
    mask = jnp.ones((6, 7), jnp.int32).at[0, 5:].set(0)
    batch = {"tokens": tokens, "mask": mask, "loss_mask": mask}
    model, params = build_model("transformer", jax.random.key(seed), batch, vocab_size=11, num_layers=1,
                                d_model=8, num_heads=2, max_len=8, mlp_ratio=2)
    return model, params, batch


def test_lm_influence_matches_dense_gradients_and_decomposes():
    """Default layers (mlp_in/out) of the tiny LM; scores from (X̃, Δ) equal ⟨IHVP(q), jax.grad⟩ and
    split exactly into layers and tokens."""
    model, params, batch = _tiny_lm()
    fit = ekfac.fit_ekfac(model.apply, params, [batch], task="lm", progress=False)
    assert sorted(fit.layers) == ["block_0/mlp_in", "block_0/mlp_out"]
    per_example_loss = make_loss_fns(model).per_example_loss
    one_grad = jax.jit(jax.vmap(lambda b: ekfac.params_to_layer_grads(
        jax.grad(lambda p: per_example_loss(p, jax.tree_util.tree_map(lambda a: a[None], b))[0])(params), fit.layers)))
    dense = one_grad(batch)
    pe = ekfac.per_example_layer_grads(model.apply, params, batch, fit.layers, "lm")
    for p in fit.layers:
        np.testing.assert_allclose(pe[p], dense[p], rtol=2e-4, atol=1e-6)
    queries = {p: pe[p][:2] for p in fit.layers}
    pre = fit.ihvp(queries)
    acts, _ = ekfac.layer_activations(model.apply, params, batch, fit.layers, "lm")
    scores = ekfac.influence_scores(pre, acts)
    ref = sum(jnp.einsum("qio,bio->qb", pre[p], dense[p]) for p in fit.layers)
    np.testing.assert_allclose(scores, ref, rtol=2e-3, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    layers = ekfac.influence_scores(pre, acts, per_layer=True)
    np.testing.assert_allclose(sum(layers.values()), scores, rtol=1e-5, atol=1e-6)
    tokens = ekfac.token_influence(pre, acts)
    assert tokens.shape == (2, 6, 7)
    np.testing.assert_allclose(tokens.sum(-1), scores, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


def test_huge_damping_gives_gradient_dot(x64):
    model, params, batch = _mlp(16)
    fit = ekfac.fit_ekfac(model.apply, params, [batch], task="classification", layers=(".*",),
                          damping=1e6, progress=False)
    g = ekfac.per_example_layer_grads(model.apply, params, batch, fit.layers, "classification")
    pre = fit.ihvp({p: v[:3] for p, v in g.items()})
    acts, _ = ekfac.layer_activations(model.apply, params, batch, fit.layers, "classification")
    dot = sum(jnp.einsum("qio,bio->qb", g[p][:3], g[p]) for p in fit.layers)
    np.testing.assert_allclose(ekfac.influence_scores(pre, acts) * 1e6, dot, rtol=1e-4)


class _Interrupting(list):
    """A batch list whose item `stop` raises once, as if the process died there."""

    def __init__(self, items, stop):
        super().__init__(items)
        self.stop = stop

    def __getitem__(self, i):
        if i == self.stop:
            self.stop = None
            raise KeyboardInterrupt
        return super().__getitem__(i)


@pytest.mark.parametrize("stop", [2, 5])  # killed in pass 1 (A, S) and in pass 2 (Λ: index 5-4=1)
def test_resume_after_interrupt_gives_same_factors(tmp_path, stop):
    model, params, _ = _mlp(8)
    rng = np.random.default_rng(3)
    batches = [{"x": jnp.asarray(rng.normal(size=(8, IN)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 8))}
               for _ in range(4)]
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    kw = dict(task="classification", layers=(".*",), progress=False, seed=7)
    ref = ekfac.fit_ekfac(model.apply, params, batches, **kw)
    folder = str(tmp_path / "f")
    seq = _Interrupting(batches, stop if stop < 4 else None)
    if stop >= 4:  # interrupt the second pass: the 2nd access of index stop-4 happens in pass 2
        class Second(list):
            seen = 0

            def __getitem__(self, i):
                if i == stop - 4:
                    Second.seen += 1
                    if Second.seen == 2:
                        raise KeyboardInterrupt
                return super().__getitem__(i)
        seq = Second(batches)
    with pytest.raises(KeyboardInterrupt):
        ekfac.fit_ekfac(model.apply, params, seq, folder=folder, save_every=1, **kw)
    assert os.path.exists(os.path.join(folder, ekfac.STATE_FILE))
    got = ekfac.fit_ekfac(model.apply, params, batches, folder=folder, save_every=1, **kw)
    assert not os.path.exists(os.path.join(folder, ekfac.STATE_FILE))
    again = ekfac.EKFACFactors.load(folder)
    for p in ref.factors:
        for name in ("A", "S", "Lambda"):
            np.testing.assert_allclose(getattr(got.factors[p], name), getattr(ref.factors[p], name), rtol=1e-6, atol=1e-9)
            np.testing.assert_array_equal(getattr(again.factors[p], name), getattr(got.factors[p], name))
    with pytest.raises(ValueError, match=r"different settings \(seed\)"):
        ekfac.fit_ekfac(model.apply, params, batches, folder=folder, **{**kw, "seed": 8})


def test_validation_errors():
    model, params, batch = _mlp(4)
    with pytest.raises(ValueError, match="task"):
        ekfac.fit_ekfac(model.apply, params, [batch], task="regression")
    with pytest.raises(ValueError, match="labels"):
        ekfac.fit_ekfac(model.apply, params, [batch], task="classification", labels="true")
    with pytest.raises(ValueError, match="match no linear layer.*dense_0"):
        ekfac.find_layers(model.apply, params, batch, ("nope",))
    with pytest.raises(ValueError, match="method"):
        fit = ekfac.fit_ekfac(model.apply, params, [batch], task="classification", layers=("head",), progress=False)
        fit.ihvp({"head": jnp.zeros((HIDDEN + 1, CLASSES))}, method="lissa")


def test_influence_correlates_with_exact_gauss_newton_if(x64):
    """EK-FAC influence vs the exact damped-GGN influence ⟨(G + λI)⁻¹ q, g_i⟩ with the full (not
    block-diagonal) GGN over both layers, same λ per layer. On this tiny, strongly coupled ReLU net
    even the exact block-diagonal GGN only reaches Pearson ≈ 0.65 (measured: EK-FAC 0.587, K-FAC
    0.582, exact block-diagonal 0.650, gradient dot 0.367), so the test asserts the ordering:
    EK-FAC clearly above the unpreconditioned gradient dot product and not below K-FAC."""
    model, params, batch = _mlp(32, 2)
    fit = ekfac.fit_ekfac(model.apply, params, [batch], task="classification", layers=(".*",),
                          labels="exact", progress=False)
    # Full GGN over the concatenated vec(W̃) of both layers.
    mats = ekfac.params_to_layer_grads(params, fit.layers)
    paths = list(fit.layers)
    sizes = [mats[p].size for p in paths]

    def logits_of(flat):
        parts = np.cumsum([0] + sizes)
        m = {p: flat[parts[i]:parts[i + 1]].reshape(mats[p].shape) for i, p in enumerate(paths)}
        p = dict(params)
        for path, d in ekfac.layer_grads_to_params(m, fit.layers).items():
            p = {**p, path: {**p[path], **d}}
        return model.apply(p, batch)

    flat0 = jnp.concatenate([mats[p].reshape(-1) for p in paths])
    J = jax.jacobian(logits_of)(flat0)
    probs = jax.nn.softmax(logits_of(flat0))
    H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(probs)
    G = np.asarray(jnp.einsum("bci,bcd,bdj->ij", J, H, J)) / 32
    damp = np.concatenate([np.full(s, fit.factors[p].damping) for p, s in zip(paths, sizes)])
    g = ekfac.per_example_layer_grads(model.apply, params, batch, fit.layers, "classification")
    gflat = np.concatenate([np.asarray(g[p]).reshape(32, -1) for p in paths], 1)
    exact = gflat[:4] @ np.linalg.solve(G + np.diag(damp), gflat.T)
    acts, _ = ekfac.layer_activations(model.apply, params, batch, fit.layers, "classification")
    corr = {}
    blockdiag = np.zeros_like(G)
    edges = np.cumsum([0] + sizes)
    for i in range(len(paths)):
        blockdiag[edges[i]:edges[i + 1], edges[i]:edges[i + 1]] = G[edges[i]:edges[i + 1], edges[i]:edges[i + 1]]
    candidates = {"ekfac": np.asarray(ekfac.influence_scores(fit.ihvp({p: g[p][:4] for p in paths}), acts)),
                  "kfac": np.asarray(ekfac.influence_scores(fit.ihvp({p: g[p][:4] for p in paths}, "kfac"), acts)),
                  "exact_block_diagonal": gflat[:4] @ np.linalg.solve(blockdiag + np.diag(damp), gflat.T),
                  "gradient_dot": gflat[:4] @ gflat.T}
    for name, s in candidates.items():
        corr[name] = float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(s, exact)]))
    print("Pearson with exact damped-GGN influence:", corr)
    assert corr["ekfac"] > corr["gradient_dot"] + 0.1 and corr["ekfac"] >= corr["kfac"] - 0.01


def _small_fit_problem():
    model, params, _ = _mlp(8)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    rng = np.random.default_rng(4)
    batches = [{"x": jnp.asarray(rng.normal(size=(8, IN)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, 8))}
               for _ in range(3)]
    return model, params, batches, dict(task="classification", layers=(".*",), progress=False, seed=1)


def test_cached_factors_are_refused_for_other_parameters_or_other_data(tmp_path):
    """The cache key holds the parameter hash and a digest of the data: refitting into a folder fitted
    at other parameters or on other batches is refused, naming the field, never silently reused."""
    model, params, batches, kw = _small_fit_problem()
    folder = str(tmp_path / "f")
    ekfac.fit_ekfac(model.apply, params, batches, folder=folder, **kw)
    moved = jax.tree_util.tree_map(lambda a: a + 1e-3, params)
    with pytest.raises(artifacts.FingerprintMismatchError) as info:
        ekfac.fit_ekfac(model.apply, moved, batches, folder=folder, **kw)
    assert list(info.value.fields) == ["params_sha256"]
    other = [dict(b, x=b["x"] * 2.0) for b in batches]
    with pytest.raises(artifacts.FingerprintMismatchError) as info:
        ekfac.fit_ekfac(model.apply, params, other, folder=folder, **kw)
    assert list(info.value.fields) == ["data_sha256"]
    # The same inputs reuse the factors.
    again = ekfac.fit_ekfac(model.apply, params, batches, folder=folder, **kw)
    assert again.meta["params_sha256"] == artifacts.tree_digest(params)


def test_partial_state_of_other_data_is_refused(tmp_path):
    model, params, batches, kw = _small_fit_problem()
    folder = str(tmp_path / "f")
    with pytest.raises(KeyboardInterrupt):
        ekfac.fit_ekfac(model.apply, params, _Interrupting(batches, 2), folder=folder, save_every=1, **kw)
    assert os.path.exists(os.path.join(folder, ekfac.STATE_FILE))
    other = [dict(b, x=b["x"] + 1.0) for b in batches]
    with pytest.raises(artifacts.FingerprintMismatchError, match="partial EK-FAC fit.*data_sha256"):
        ekfac.fit_ekfac(model.apply, params, other, folder=folder, **kw)


@pytest.mark.parametrize("which", ["factors", "state"])
def test_corrupt_or_empty_cache_files_are_named_and_recomputed(tmp_path, which):
    model, params, batches, kw = _small_fit_problem()
    ref = ekfac.fit_ekfac(model.apply, params, batches, **kw)
    folder = str(tmp_path / "f")
    if which == "factors":
        ekfac.fit_ekfac(model.apply, params, batches, folder=folder, **kw)
        file = os.path.join(folder, ekfac.FACTORS_FILE)
        data = bytearray(open(file, "rb").read())
        data[len(data) // 2] ^= 0xFF  # inside an array member: caught by the zip CRC-32
        open(file, "wb").write(bytes(data))
    else:
        with pytest.raises(KeyboardInterrupt):
            ekfac.fit_ekfac(model.apply, params, _Interrupting(batches, 1), folder=folder, save_every=1, **kw)
        file = os.path.join(folder, ekfac.STATE_FILE)
        open(file, "wb").close()  # 0 bytes
    with pytest.raises(artifacts.CorruptArtifactError, match=os.path.basename(file)):
        (ekfac.EKFACFactors.load(folder) if which == "factors" else ekfac._read_state(file))
    with pytest.warns(RuntimeWarning, match=os.path.basename(file)):
        got = ekfac.fit_ekfac(model.apply, params, batches, folder=folder, **kw)
    for p in ref.factors:
        np.testing.assert_allclose(got.factors[p].Lambda, ref.factors[p].Lambda, rtol=1e-6, atol=1e-12)
    ekfac.EKFACFactors.load(folder)  # rewritten whole


def test_gpt2_conv1d_layer_gradients_equal_autodiff():
    """transformers' GPT-2 stores its linear layers as FlaxConv1D with (out, in) kernels: the captured
    per-example layer gradients X̃ᵀΔ must equal jax.grad of the same loss, transposed back."""
    import transformers

    from experiments.common import models as models_lib

    hf_config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=1, n_head=2)
    hf = transformers.FlaxGPT2LMHeadModel(hf_config, seed=0)
    model = models_lib.Model("hf:gpt2", "lm", models_lib.CausalLMWrapper(lm=hf.module, model_type="gpt2", pad_token_id=0))
    params = {"lm": hf.params}
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 40, (3, 12)).astype(np.int32)
    mask = np.ones((3, 12), np.float32)
    mask[2, 9:] = 0
    batch = {"tokens": tokens, "mask": mask, "loss_mask": np.concatenate([np.zeros((3, 1)), mask[:, 1:]], 1)}
    layers = ekfac.find_layers(model.apply, params, batch, layers=(r".*/mlp/(c_fc|c_proj)",))
    assert sorted(layers) == ["lm/transformer/h/0/mlp/c_fc", "lm/transformer/h/0/mlp/c_proj"]
    assert all(info.transposed for info in layers.values())
    captured = ekfac.per_example_layer_grads(model.apply, params, batch, layers, "lm")
    loss = models_lib.make_loss_fns(model).per_example_loss
    grad_one = jax.jit(jax.grad(lambda p, one: loss(p, one)[0]))
    for i in range(3):
        one = {k: v[i: i + 1] for k, v in batch.items()}
        grads = grad_one(params, one)
        expected = ekfac.params_to_layer_grads(grads, layers)
        for path in layers:
            np.testing.assert_allclose(captured[path][i], expected[path], rtol=2e-4, atol=1e-6)
    mats = ekfac.layer_grads_to_params(expected, layers)
    node = grads["lm"]["transformer"]["h"]["0"]["mlp"]["c_fc"]
    np.testing.assert_array_equal(mats["lm/transformer/h/0/mlp/c_fc"]["kernel"], node["kernel"])


def test_second_fit_and_ragged_last_batch_compile_nothing():
    """The jitted statistics are cached per setting and a short last batch is padded with zero-weight
    rows: a second fit with the same model and batch shape runs without one XLA compilation, and the
    padding changes nothing (exact labels: the factors equal those of the unpadded sums)."""
    from experiments.common.timing import CompileLog

    model, params, _ = _mlp(8)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    rng = np.random.default_rng(5)
    sizes = (11, 11, 6)  # shapes no other test compiles, so the first fit's compilations are its own
    batches = [{"x": jnp.asarray(rng.normal(size=(n, IN)), jnp.float32), "y": jnp.asarray(rng.integers(0, 3, n))}
               for n in sizes]
    kw = dict(task="classification", layers=(".*",), labels="exact", progress=False)
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a persistent-cache hit would hide a recompile
    try:
        with CompileLog() as log:
            first = ekfac.fit_ekfac(model.apply, params, batches, **kw)
        assert log.count > 0  # the log sees this fit's compilations
        with CompileLog() as log:
            second = ekfac.fit_ekfac(model.apply, params, batches, **kw)
        assert log.count == 0
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
    one = ekfac.fit_ekfac(model.apply, params, [{k: jnp.concatenate([b[k] for b in batches]) for k in batches[0]}],
                          **kw)
    for path in first.layers:
        np.testing.assert_array_equal(first.factors[path].Lambda, second.factors[path].Lambda)
        np.testing.assert_allclose(first.factors[path].A, one.factors[path].A, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(first.factors[path].Lambda, one.factors[path].Lambda, rtol=1e-4, atol=1e-9)
