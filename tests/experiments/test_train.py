"""Training loop: loss decreases, checkpoints resume bit-identically, bad inputs are rejected."""
import jax
import numpy as np
import pytest

from experiments.common import data, models, train
from experiments.common.workdir import Workdir


def _setup():
    corpus = data.make_planted_facts(seed=0, num_facts=4, num_distractors=4, num_heldout=0)
    from experiments.common.tokenizers import WordTokenizer

    tok = WordTokenizer.fit(corpus.documents)
    arrays = data.lm_arrays(*tok.encode_batch(corpus.documents, 40))
    model, params = models.build_model("transformer", jax.random.key(0), data.take(arrays, np.arange(1)),
                                       vocab_size=tok.vocab_size, num_layers=1, d_model=16, num_heads=2, max_len=40)
    loss_fn = models.make_loss_fns(model).loss_fn
    optimizer = train.make_optimizer("adamw", 1e-2, 12, schedule="cosine", warmup_steps=2)

    def batch_at(step):
        return data.take(arrays, data.batch_indices(len(corpus.documents), 4, step, seed=0))

    return loss_fn, params, optimizer, batch_at


def test_resume_is_bit_identical(tmp_path):
    loss_fn, params, optimizer, batch_at = _setup()
    straight = train.train(loss_fn, params, optimizer, batch_at, 12, workdir=Workdir(str(tmp_path / "a")),
                           checkpoint_every=5, quiet=True)

    def crashing(step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return batch_at(step)

    workdir = Workdir(str(tmp_path / "b"))
    with pytest.raises(RuntimeError, match="simulated"):
        train.train(loss_fn, params, optimizer, crashing, 12, workdir=workdir, checkpoint_every=5, quiet=True)
    assert [s for s, _ in train.list_checkpoints(workdir.file("checkpoints"))] == [5]
    resumed = train.train(loss_fn, params, optimizer, batch_at, 12, workdir=workdir, checkpoint_every=5, quiet=True)
    assert resumed.resumed_from == 5
    for a, b in zip(jax.tree_util.tree_leaves((straight.params, straight.opt_state)),
                    jax.tree_util.tree_leaves((resumed.params, resumed.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a finished run reloads its final checkpoint and does no more steps
    again = train.train(loss_fn, params, optimizer, batch_at, 12, workdir=workdir, checkpoint_every=5, quiet=True)
    assert again.resumed_from == 12
    assert train.list_checkpoints(workdir.file("checkpoints"))[-1][0] == 12
    # ... and still reports the loss the finished run logged last (not None)
    assert resumed.final_loss is not None and again.final_loss == resumed.final_loss


def test_loss_decreases_and_metrics_logged(tmp_path):
    loss_fn, params, optimizer, batch_at = _setup()
    workdir = Workdir(str(tmp_path))
    first = float(jax.jit(loss_fn)(params, batch_at(0)))
    result = train.train(loss_fn, params, optimizer, batch_at, 12, workdir=workdir, log_every=4, quiet=True,
                         eval_fn=lambda p: {"loss": loss_fn(p, batch_at(0))}, eval_every=6)
    assert result.eval_metrics["loss"] < first
    records = workdir.read_metrics()
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12]
    assert [r["step"] for r in records if "eval/loss" in r] == [6, 12]


def test_checkpoint_mismatch_and_bad_optimizer(tmp_path):
    loss_fn, params, optimizer, _ = _setup()
    path = str(tmp_path / "ckpt_00000001.safetensors")
    train.save_checkpoint(path, 1, params, optimizer.init(params))
    step, restored, _ = train.restore_checkpoint(path, params, optimizer.init(params))
    assert step == 1
    other = {"w": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="model/optimizer"):
        train.restore_checkpoint(path, other, optimizer.init(other))
    with pytest.raises(ValueError, match="optimizer"):
        train.make_optimizer("lbfgs", 1e-3, 10)
    with pytest.raises(ValueError, match="Adam"):
        train.adam_second_moment(train.make_optimizer("sgd", 1e-3, 10).init(params))
