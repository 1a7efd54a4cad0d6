"""Retraining cache: resumable after an interruption (also SIGKILL), refuses other masks or setups,
retrains corrupt run files; mask generators."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from attribution import retrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_fingerprint_arrays_are_compared_in_full(tmp_path):
    """A fingerprint holding arrays used to be stored as their truncated str(), so two different large
    arrays looked equal; now arrays are stored as JSON lists and compared element by element."""
    masks = retrain.random_subset_masks(10, 2, seed=0)
    a = np.zeros(2000)
    b = a.copy()
    b[1000] = 1.0  # str(a) == str(b): numpy elides the middle
    assert str(a) == str(b)
    retrain.retrain_outcomes(str(tmp_path), masks, _fake_training([]), fingerprint={"init": a})
    with pytest.raises(retrain.RetrainMismatchError, match=r"fingerprint.init\[1000\]"):
        retrain.retrain_outcomes(str(tmp_path), masks, _fake_training([]), fingerprint={"init": b})
    with pytest.raises(ValueError, match="JSON"):
        retrain.retrain_outcomes(str(tmp_path / "x"), masks, _fake_training([]), fingerprint={"f": object()})


def test_empty_corrupt_or_swapped_run_files_are_named_and_retrained(tmp_path):
    masks = retrain.random_subset_masks(10, 6, seed=2)
    fn = _fake_training([])
    want = retrain.retrain_outcomes(str(tmp_path), masks, fn, fingerprint={"m": 1})
    runs = sorted(p for p in os.listdir(tmp_path) if p.startswith("run-"))
    assert runs == [f"run-{r:06d}.npz" for r in range(6)]
    open(tmp_path / runs[1], "wb").close()
    data = bytearray((tmp_path / runs[2]).read_bytes())
    at = bytes(data).index(np.asarray(want[2], np.float64).tobytes())  # a flipped bit in the outcome's bytes
    data[at + 3] ^= 0x01
    (tmp_path / runs[2]).write_bytes(bytes(data))
    shutil.copy(tmp_path / runs[0], tmp_path / runs[4])  # a valid file of another run
    calls = []
    with pytest.warns(RuntimeWarning) as record:
        got = retrain.retrain_outcomes(str(tmp_path), masks, _fake_training(calls), fingerprint={"m": 1}, chunk_size=1)
    message = str(record[0].message)
    assert "retraining 3 run(s)" in message and "run-000001.npz: empty" in message
    assert "run-000002.npz: unreadable or corrupt" in message and "run-000004.npz: written for another run" in message
    assert calls == [1, 1, 1]
    np.testing.assert_array_equal(got, want)


_KILLED_CHILD = """
import sys, time
import numpy as np
from attribution import retrain
masks = retrain.random_subset_masks(12, 8, seed=5)
def slow(chunk):
    time.sleep(0.2)
    return np.stack([chunk @ np.arange(12.0), chunk.sum(1)], axis=1)
retrain.retrain_outcomes(sys.argv[1], masks, slow, fingerprint={"model": "a"}, chunk_size=1)
"""


def test_sigkill_mid_retraining_resumes_the_missing_runs_only(tmp_path):
    path = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while child.poll() is None and not (path.is_dir() and len([p for p in os.listdir(path) if p.startswith("run-")]) >= 3):
        time.sleep(0.02)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = sorted(p for p in os.listdir(path) if p.startswith("run-"))
    assert 3 <= len(done) < 8
    masks = retrain.random_subset_masks(12, 8, seed=5)
    calls = []
    got = retrain.retrain_outcomes(str(path), masks, _fake_training(calls), fingerprint={"model": "a"}, chunk_size=1)
    assert len(calls) == 8 - len(done)
    np.testing.assert_array_equal(got, np.stack([masks @ np.arange(12.0), masks.sum(1)], axis=1))
