"""The shared on-disk rules: atomic writes, strict JSON, fingerprints, checksums, confined paths, locks."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import artifacts as A

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_atomic_writers_round_trip_and_return_the_sha256(tmp_path):
    digest = A.atomic_write_bytes(str(tmp_path / "sub" / "a.bin"), b"hello")
    assert digest == A.file_sha256(str(tmp_path / "sub" / "a.bin"))
    A.atomic_write_npy(str(tmp_path / "x.npy"), np.arange(5))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy", allow_pickle=False), np.arange(5))
    A.atomic_write_npz(str(tmp_path / "x.npz"), {"a": np.ones(3), "b": np.array("text")})
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert str(z["b"]) == "text"
    with pytest.raises(ValueError, match="pickle"):
        A.atomic_write_npy(str(tmp_path / "o.npy"), np.array([{}], dtype=object))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(A.TMP_PREFIX)]
    assert os.stat(tmp_path / "x.npy").st_mode & 0o777 == 0o644


def test_strict_json_never_writes_nan_tokens(tmp_path):
    obj = {"loss": float("nan"), "xs": [1.0, np.float32(np.inf)], "y": np.float64(-np.inf), "ok": np.int64(3)}
    with pytest.raises(ValueError, match=r"loss=nan.*xs\[1\]=inf.*y=-inf"):
        A.dumps(obj)
    text = A.dumps(obj, nonfinite="flag")
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert back["loss"] is None and back["ok"] == 3
    assert back[A.NONFINITE_KEY] == {"loss": "nan", "xs[1]": "inf", "y": "-inf"}
    path = str(tmp_path / "s.json")
    with open(path, "w") as f:
        f.write('{"a": NaN}')
    with pytest.raises(A.CorruptJSONError, match="s.json"):
        A.read_json(path)
    open(path, "w").close()
    with pytest.raises(A.CorruptJSONError, match="empty"):
        A.read_json(path)
    with pytest.raises(TypeError, match="obj"):
        A.to_jsonable({"obj": object()})


def test_fingerprint_check_names_every_differing_field(tmp_path):
    fields = {"train": {"learning_rate": 0.1, "num_steps": 250}, "seed": 0, "shape": (2, 3)}
    assert A.check_fingerprint(str(tmp_path), fields) is False  # written
    assert A.check_fingerprint(str(tmp_path), {**fields, "shape": [2, 3]}) is True  # tuples read back as lists
    changed = {"train": {"learning_rate": 0.5, "num_steps": 300}, "seed": 0, "shape": (2, 3), "new": 1}
    with pytest.raises(A.FingerprintMismatchError) as info:
        A.check_fingerprint(str(tmp_path), changed, what="workdir")
    assert set(info.value.fields) == {"train.learning_rate", "train.num_steps", "new"}
    assert info.value.fields["train.learning_rate"] == (0.1, 0.5)
    assert "workdir" in str(info.value) and "train.num_steps" in str(info.value)
    assert A.digest(fields) == A.digest({"shape": [2, 3], "seed": 0, "train": {"num_steps": 250, "learning_rate": 0.1}})
    assert A.digest(fields) != A.digest(changed)
    with pytest.raises(ValueError, match="non-finite"):
        A.digest({"lr": float("nan")})
    with pytest.raises(A.FingerprintMismatchError, match="records no fingerprint|absent"):
        A.check_fields("x", None, {"a": 1})
    assert A.subfolder_for("/r", fields) != A.subfolder_for("/r", changed)


def test_fingerprint_file_tampered_is_refused(tmp_path):
    A.write_fingerprint(str(tmp_path), {"a": 1})
    file = tmp_path / A.FINGERPRINT_FILE
    stored = json.loads(file.read_text())
    stored["fields"]["a"] = 2
    file.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="digest does not match"):
        A.check_fingerprint(str(tmp_path), {"a": 2})


def test_tree_and_array_digests_see_values_dtypes_shapes_names():
    tree = {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)}
    variants = [tree, {**tree, "w": np.eye(2, dtype=np.float32)}, {**tree, "w": np.zeros((2, 2), np.float64)},
                {**tree, "w": np.zeros((4,), np.float32)}, {"W": tree["w"], "b": tree["b"]}]
    assert len({A.tree_digest(t) for t in variants}) == len(variants)
    assert A.tree_digest(tree) == A.tree_digest({k: v.copy() for k, v in tree.items()})
    assert A.array_digest(np.arange(3)) != A.array_digest(np.arange(3).astype(np.int32))
    with pytest.raises(ValueError, match="no array leaves"):
        A.tree_digest({})


def test_verify_file_names_empty_corrupt_and_missing_files(tmp_path):
    path = str(tmp_path / "s.npy")
    digest = A.atomic_write_npy(path, np.arange(100.0))
    A.verify_file(path, digest)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(A.CorruptArtifactError, match="s.npy is corrupt") as info:
        A.verify_file(path, digest, what="shard")
    assert info.value.path == path
    open(path, "wb").close()
    with pytest.raises(A.CorruptArtifactError, match=r"empty \(0 bytes\)"):
        A.verify_file(path, digest)
    os.remove(path)
    with pytest.raises(A.CorruptArtifactError, match="missing"):
        A.verify_file(path, digest)


def test_confined_path_refuses_escapes(tmp_path):
    (tmp_path / "shards").mkdir()
    assert A.confined_path(str(tmp_path), "shards/0.npy") == os.path.join(os.path.realpath(tmp_path), "shards", "0.npy")
    for bad in ("../../x.npy", "/etc/passwd", "shards/../../x", "", ".", "a\x00b"):
        with pytest.raises(A.UnsafePathError):
            A.confined_path(str(tmp_path), bad)
    os.symlink("/tmp", tmp_path / "link")
    with pytest.raises(A.UnsafePathError, match="leaves its folder"):
        A.confined_path(str(tmp_path), "link/x.npy")


def test_lock_refuses_a_second_holder_and_is_dropped_by_sigkill(tmp_path):
    lock = str(tmp_path / ".lock")
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, pathlib
        sys.path.insert(0, {ROOT!r})
        import artifacts
        with artifacts.exclusive_lock({lock!r}, what="testing"):
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(600)
    """)])
    try:
        while not ready.exists():
            assert child.poll() is None, "the lock holder died"
            time.sleep(0.01)
        with pytest.raises(A.LockedError, match=f"another process is testing \\(pid {child.pid} "):
            with A.exclusive_lock(lock, what="testing"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with A.exclusive_lock(lock, what="testing"):  # the kernel dropped the dead holder's lock
        pass


def test_sigkill_during_writes_leaves_the_old_or_the_new_file_whole(tmp_path):
    path = str(tmp_path / "big.npy")
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, pathlib
        sys.path.insert(0, {ROOT!r})
        import numpy as np, artifacts
        i = 0
        while True:
            artifacts.atomic_write_npy({path!r}, np.full(1 << 20, float(i)))
            pathlib.Path({str(ready)!r}).write_text(str(i))
            i += 1
    """)])
    while not ready.exists() or int(ready.read_text() or 0) < 2:
        assert child.poll() is None
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    array = np.load(path, allow_pickle=False)
    assert array.shape == (1 << 20,) and np.all(array == array[0])
    removed = A.remove_temporaries(str(tmp_path))
    assert all(os.path.basename(r).startswith(A.TMP_PREFIX) for r in removed)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(A.TMP_PREFIX)]
