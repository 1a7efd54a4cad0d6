"""Retraining cache: resumable after an interruption, refuses other masks or setups; mask generators."""
import numpy as np
import pytest

from attribution import retrain


def _fake_training(calls):
    def train_and_evaluate(masks):
        calls.append(len(masks))
        return np.stack([masks @ np.arange(masks.shape[1]), masks.sum(1)], axis=1)
    return train_and_evaluate


def test_resume_computes_only_missing_runs(tmp_path):
    masks = retrain.random_subset_masks(10, 7, 0.5, seed=1)
    calls = []
    fn = _fake_training(calls)

    def interrupted(chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two chunks were written
        return fn(chunk)

    with pytest.raises(KeyboardInterrupt):
        retrain.retrain_outcomes(str(tmp_path), masks, interrupted, fingerprint={"model": "a"}, chunk_size=2)
    assert calls == [2, 2]
    out = retrain.retrain_outcomes(str(tmp_path), masks, fn, fingerprint={"model": "a"}, chunk_size=2)
    assert calls == [2, 2, 2, 1]  # only the 3 missing runs were trained
    np.testing.assert_array_equal(out, fn(masks))
    again = retrain.retrain_outcomes(str(tmp_path), masks, fn, fingerprint={"model": "a"}, chunk_size=2)
    assert calls[-1] == 7 and len(calls) == 5  # the last call is the reference above, nothing retrained
    np.testing.assert_array_equal(again, out)


def test_mismatch_is_refused(tmp_path):
    masks = retrain.random_subset_masks(10, 3, seed=0)
    retrain.retrain_outcomes(str(tmp_path), masks, _fake_training([]), fingerprint={"model": "a"})
    with pytest.raises(retrain.RetrainMismatchError, match="fingerprint"):
        retrain.retrain_outcomes(str(tmp_path), masks, _fake_training([]), fingerprint={"model": "b"})
    with pytest.raises(retrain.RetrainMismatchError, match="masks_sha256"):
        retrain.retrain_outcomes(str(tmp_path), masks[::-1], _fake_training([]), fingerprint={"model": "a"})
    with pytest.raises(ValueError, match="0/1"):
        retrain.retrain_outcomes(str(tmp_path), masks * 0.5, _fake_training([]), fingerprint={})


def test_mask_generators():
    m = retrain.random_subset_masks(11, 20, 0.5, seed=3)
    assert m.shape == (20, 11) and (m.sum(1) == 6).all() and len({r.tobytes() for r in m}) > 15
    loo = retrain.leave_one_out_masks(5, [4, 0])
    np.testing.assert_array_equal(loo, [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    scores = np.array([[0.1, 0.9, 0.5, -1.0], [3.0, 2.0, 1.0, 0.0]])
    rm = retrain.top_k_removal_masks(scores, [1, 2])
    np.testing.assert_array_equal(rm, [[1, 0, 1, 1], [1, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="fraction"):
        retrain.random_subset_masks(10, 2, 1.0)
    with pytest.raises(ValueError, match="every k"):
        retrain.top_k_removal_masks(scores, [4])
