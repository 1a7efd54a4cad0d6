"""Models build and train; the loss interface; all-MiniLM-L6-v2 loads offline and matches a reference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sketching
from experiments.common import data, models


def _fit(model, params, batch, steps=30, lr=1e-2):
    loss_fn = models.make_loss_fns(model).loss_fn
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    first = float(loss_fn(params, batch))
    for _ in range(steps):
        params, state, _ = step(params, state)
    return first, float(loss_fn(params, batch))


@pytest.mark.parametrize("name,options", [
    ("logreg", {}), ("mlp", {"hidden": (32,)}), ("cnn", {"features": (8,)}),
])
def test_vision_models_train_on_digits(name, options):
    digits = data.load_digits(seed=0)["train"]
    batch = data.take(digits, np.arange(128))
    model, params = models.build_model(name, jax.random.key(0), batch, num_classes=10, **options)
    first, last = _fit(model, params, batch, steps=40, lr=3e-2)
    assert last < 0.8 * first


@pytest.mark.parametrize("positional", models.POSITIONALS)
def test_transformer_lm_trains_and_loss_is_summed_over_tokens(positional):
    tokens = np.array([[1, 5, 6, 7, 2, 0], [1, 7, 6, 2, 0, 0]], np.int32)
    mask = (np.arange(6)[None] < np.array([[5], [4]])).astype(np.float32)
    batch = data.lm_arrays(tokens, mask)
    model, params = models.build_model("transformer", jax.random.key(1), batch, vocab_size=8, num_layers=1,
                                       d_model=16, num_heads=2, max_len=8, positional=positional)
    logits = model.apply(params, batch)
    assert logits.shape == (2, 6, 8)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    manual = [-sum(float(log_p[b, t - 1, tokens[b, t]]) for t in range(1, int(mask[b].sum()))) for b in range(2)]
    np.testing.assert_allclose(models.make_loss_fns(model).per_example_loss(params, batch), manual, rtol=1e-5)
    first, last = _fit(model, params, batch)
    assert last < 0.5 * first
    # causal: changing a later token does not change earlier logits
    changed = dict(batch, tokens=tokens.copy())
    changed["tokens"][0, 4] = 3
    np.testing.assert_allclose(model.apply(params, changed)[0, :4], logits[0, :4], atol=1e-6)


def test_transformer_classifier_and_sketched_gradients():
    tokens = np.array([[1, 4, 5, 2], [1, 5, 2, 0]], np.int32)
    batch = {"tokens": tokens, "mask": (tokens > 0).astype(np.float32), "y": np.array([0, 2], np.int32)}
    model, params = models.build_model("transformer", jax.random.key(2), batch, vocab_size=6, num_layers=1,
                                       d_model=8, num_heads=2, max_len=4, num_classes=3)
    assert model.task == "classification" and model.apply(params, batch).shape == (2, 3)
    loss_fn = models.make_loss_fns(model).loss_fn
    sketch = sketching.get("afjl", 64)
    state = sketch.init(jax.random.key(0), params)
    # one compiled program instead of op-by-op dispatch (each op compiled on its own)
    sketched = jax.jit(lambda p, b: sketching.sketch_per_example_gradients(sketch, state, loss_fn, p, b))(params, batch)
    assert sketched.shape == (2, 64) and bool(jnp.all(jnp.isfinite(sketched)))


def test_bad_model_config_names_the_field():
    with pytest.raises(ValueError, match="allowed values"):
        models.validate_model_config("resnet", {})
    with pytest.raises(ValueError, match="config.model.depth is not a field"):
        models.validate_model_config("mlp", {"hidden": (4,), "num_classes": 2, "depth": 3})
    with pytest.raises(ValueError, match="num_heads"):
        models.validate_model_config("transformer", {"d_model": 10, "num_heads": 4})
    with pytest.raises(ValueError, match="model.path"):
        models.validate_model_config("pretrained", {"path": "/nonexistent", "task": "lm"})


# Reference from one float32 run of all-MiniLM-L6-v2 (mean-pooled last hidden states, unnormalised),
# agreeing with sentence-transformers' documented similarity of the first two sentences (0.755).
_SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
              "A man is riding a horse."]
_NORMS = [5.6326776, 5.196921, 5.406667, 5.0129027]
_COSINES = {(0, 1): 0.7553367, (0, 2): -0.10495861, (0, 3): 0.24740128}


def test_minilm_loads_offline_and_matches_reference():
    from experiments.common.tokenizers import minilm_tokenizer

    tok = minilm_tokenizer()
    enc = tok(_SENTENCES, padding=True, return_tensors="np")
    batch = {"tokens": enc["input_ids"].astype(np.int32), "mask": enc["attention_mask"].astype(np.float32)}
    model, params = models.build_model("minilm", jax.random.key(0), batch, num_classes=3)
    assert 22_500_000 < models.count_params(params) < 22_800_000
    emb = np.asarray(model.apply(params, batch, method="embed"))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), _NORMS, rtol=1e-4)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for (i, j), value in _COSINES.items():
        assert abs(float(unit[i] @ unit[j]) - value) < 1e-4
    assert model.apply(params, batch).shape == (4, 3)
