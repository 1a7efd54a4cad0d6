"""Tests of attribution/index.py: atomic, resumable on-disk index and streaming top-k retrieval."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sketching
from attribution.index import (
    GradientIndex,
    IndexIncompleteError,
    IndexMismatchError,
    build_index,
    params_hash,
    sketched_features_fn,
    top_k,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, M, SHARD = 97, 12, 5          # 20 shards, the last one with 2 rows
META = {"sketch": "afjl", "m": M, "sketch_seed": 0, "checkpoint": "0" * 64, "note": ["any", "json"]}
TIMESTAMPS = ("created_utc", "completed_utc")


def features(indices: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for sketched gradients: row i depends only on i."""
    i = np.asarray(indices, dtype=np.float64)[:, None]
    j = np.arange(M)[None, :]
    return (np.sin(0.37 * i + 1.3 * j) * (1.0 + (i % 3))).astype(np.float32)


class Counting:
    """features_fn that records which shards were computed and can fail on one of them."""

    def __init__(self, fail_at_start: int | None = None, fn=None):
        self.starts: list[int] = []
        self.fail_at_start = fail_at_start
        self.fn = features if fn is None else fn

    def __call__(self, indices):
        if self.fail_at_start is not None and indices[0] == self.fail_at_start:
            raise RuntimeError("simulated crash")
        self.starts.append(int(indices[0]))
        return self.fn(indices)


def _logreg_loss(p, batch):
    logits = batch["x"] @ p["w"] + p["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], axis=1)[:, 0]


def jax_features_fn():
    """Real sketched per-example gradients (QK sketch, jitted) of a logistic regression on N examples."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    arrays = {"x": rng.normal(size=(N, 6)).astype(np.float32), "y": rng.integers(0, 3, size=N).astype(np.int32)}
    sketch = sketching.get("qk", M)
    return sketched_features_fn(sketch, sketch.init(jax.random.key(7), params), _logreg_loss, params, arrays)


def _build(path, fn=features, **kwargs):
    options = dict(meta=META, shard_size=SHARD, progress=False)
    options.update(kwargs)
    return build_index(str(path), fn, N, **options)


def _snapshot(path) -> dict:
    """Every file of the index (bytes), with the manifest's timestamps removed; ignores the lock file."""
    out = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if rel == ".lock":
                continue
            data = open(full, "rb").read()
            if rel == "manifest.json":
                manifest = json.loads(data)
                for field in TIMESTAMPS:
                    manifest.pop(field, None)
                data = json.dumps(manifest, sort_keys=True).encode()
            out[rel] = data
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted build, the bit-exact reference of the resume tests."""
    path = tmp_path_factory.mktemp("reference") / "index"
    _build(path)
    return path


@pytest.fixture(scope="module")
def jax_reference(tmp_path_factory):
    """An uninterrupted build of real sketched gradients, in this process."""
    path = tmp_path_factory.mktemp("jax_reference") / "index"
    _build(path, jax_features_fn())
    return path


# ----------------------------------------------------------------------------------------------
# params_hash, round trip, blocks
# ----------------------------------------------------------------------------------------------

def test_params_hash_identifies_values_dtypes_shapes_and_names():
    params = {"dense": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)}}
    same = {"dense": {"kernel": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "bias": jnp.zeros(3)}}
    assert params_hash(params) == params_hash(same)
    assert len(params_hash(params)) == 64
    changed_value = {"dense": {"kernel": params["dense"]["kernel"].copy(), "bias": np.zeros(3, np.float32)}}
    changed_value["dense"]["kernel"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    changed_dtype = {"dense": {"kernel": params["dense"]["kernel"].astype(np.float16), "bias": np.zeros(3, np.float32)}}
    changed_shape = {"dense": {"kernel": params["dense"]["kernel"].reshape(3, 2), "bias": np.zeros(3, np.float32)}}
    changed_name = {"dense": {"w": params["dense"]["kernel"], "bias": np.zeros(3, np.float32)}}
    hashes = {params_hash(t) for t in (params, changed_value, changed_dtype, changed_shape, changed_name)}
    assert len(hashes) == 5


def test_build_round_trip_blocks_and_reopen(tmp_path, reference):
    index = GradientIndex.open(str(reference))
    expected = features(np.arange(N))
    assert (index.num_examples, index.dim, index.num_shards, index.dtype) == (N, M, 20, "float32")
    assert index.meta == json.loads(json.dumps(META))
    np.testing.assert_array_equal(index.example_ids, np.arange(N))
    np.testing.assert_array_equal(index.load(), expected)
    index.verify()
    for block_size in (None, 1, 3, 5, 7, 40, 1000):
        starts, rows = zip(*index.iter_blocks(block_size))
        sizes = [r.shape[0] for r in rows]
        assert all(r.dtype == np.float32 for r in rows)
        np.testing.assert_array_equal(np.concatenate(rows), expected)
        np.testing.assert_array_equal(starts, np.cumsum([0] + sizes[:-1]))
        if block_size is not None:
            assert set(sizes[:-1]) <= {block_size} and sizes[-1] <= block_size
    # A rerun with the same settings reopens without computing anything.
    counting = Counting()
    again = _build(reference, counting)
    assert counting.starts == []
    np.testing.assert_array_equal(again.load(), expected)
    # String example ids round-trip without pickle.
    ids = [f"doc-{i}" for i in range(N)]
    named = _build(tmp_path / "named", example_ids=ids)
    assert list(GradientIndex.open(str(tmp_path / "named")).example_ids) == ids
    assert named.example_ids.dtype.kind == "U"


def test_open_missing_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no gradient index"):
        GradientIndex.open(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="meta lacks \\['checkpoint'\\]"):
        _build(tmp_path / "a", meta={"sketch": "qk", "m": M})
    with pytest.raises(ValueError, match="dtype='int8'"):
        _build(tmp_path / "b", dtype="int8")
    with pytest.raises(ValueError, match="expected \\(5, 12\\)"):
        _build(tmp_path / "c", fn=lambda i: features(i)[:, :5])
    with pytest.raises(ValueError, match="non-finite values \\(first at example 6\\)"):
        _build(tmp_path / "d", fn=lambda i: np.where(i[:, None] == 6, np.nan, features(i)))
    with pytest.raises(ValueError, match="example_ids must be unique"):
        _build(tmp_path / "e", example_ids=[0] * N)


# ----------------------------------------------------------------------------------------------
# Atomicity and resume
# ----------------------------------------------------------------------------------------------

_CHILD = """
import sys, time
from attribution.index import build_index
from tests.attribution import test_index as t

fn = t.features if sys.argv[2] == "numpy" else t.jax_features_fn()

def slow(indices):
    time.sleep(0.1)
    return fn(indices)

build_index(sys.argv[1], slow, t.N, meta=t.META, shard_size=t.SHARD, progress=False)
"""


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, request, kind):
    """A build in a subprocess is SIGKILLed after some shards exist; the rerun (in this process)
    computes only the missing shards and every file equals an uninterrupted build's, byte for byte
    (the manifest up to its timestamps). "jax": features are jitted sketched gradients, so this also
    checks that they are bit-reproducible across processes."""
    reference = request.getfixturevalue("reference" if kind == "numpy" else "jax_reference")
    fn = features if kind == "numpy" else jax_features_fn()
    path = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), kind], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    shards = path / "shards"
    while time.time() < deadline and child.poll() is None:
        if shards.is_dir() and len([f for f in os.listdir(shards) if f.endswith(".npy") and f[0].isdigit()]) >= 4:
            break
        time.sleep(0.01)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    written = sorted(f for f in os.listdir(shards) if f[0].isdigit())
    assert 4 <= len(written) < 20
    with pytest.raises(IndexIncompleteError, match="incomplete"):
        GradientIndex.open(str(path))

    counting = Counting(fn=fn)
    resumed = _build(path, counting)
    # Only the missing shards were computed (the one being written at the kill, if any, included).
    assert len(counting.starts) == 20 - len(written)
    assert sorted(counting.starts) == [SHARD * i for i in range(20) if f"{i:05d}.npy" not in written]
    assert _snapshot(path) == _snapshot(reference)
    np.testing.assert_array_equal(resumed.load(), GradientIndex.open(str(reference)).load())


def test_temporary_files_are_never_read_and_are_cleaned(tmp_path, reference):
    path = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(path, Counting(fail_at_start=3 * SHARD))
    assert sorted(os.listdir(path / "shards")) == ["00000.npy", "00001.npy", "00002.npy"]
    # What a SIGKILL during a shard write leaves: a half-written temporary next to the shards.
    full = (path / "shards" / "00001.npy").read_bytes()
    (path / "shards" / ".tmp-abc123-00003.npy").write_bytes(full[: len(full) // 2])
    (path / ".tmp-xyz-manifest.json").write_bytes(b'{"format": "gradsk')
    with pytest.raises(IndexIncompleteError, match=r"\(3 of 20 shards written\)"):
        GradientIndex.open(str(path))
    counting = Counting()
    _build(path, counting)
    assert counting.starts == [SHARD * i for i in range(3, 20)]
    assert not [f for f in os.listdir(path) if f.startswith(".tmp-")]
    assert not [f for f in os.listdir(path / "shards") if f.startswith(".tmp-")]
    assert _snapshot(path) == _snapshot(reference)
    # A lost shard of a finished index is detected by open() and recomputed by a rerun.
    os.remove(path / "shards" / "00007.npy")
    with pytest.raises(IndexIncompleteError, match="lacks shard files"):
        GradientIndex.open(str(path))
    counting = Counting()
    _build(path, counting)
    assert counting.starts == [7 * SHARD]
    assert _snapshot(path) == _snapshot(reference)


def test_concurrent_build_is_refused(tmp_path):
    import fcntl

    path = tmp_path / "busy"
    os.makedirs(path)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match="another process is building"):
            _build(path)
    finally:
        os.close(fd)
    _build(path)  # the lock is free again


@pytest.mark.parametrize("change, field", [
    (dict(meta={**META, "sketch": "qk"}), "meta.sketch"),
    (dict(meta={**META, "m": M + 1}), "meta.m"),
    (dict(meta={**META, "checkpoint": "1" * 64}), "meta.checkpoint"),
    (dict(meta={**META, "sketch_seed": 1}), "meta.sketch_seed"),
    (dict(shard_size=SHARD + 1), "shard_size"),
    (dict(dtype="float16"), "dtype"),
    (dict(example_ids=np.arange(N) + 1), "example_ids_sha256"),
])
def test_manifest_mismatch_is_refused(reference, change, field):
    fn = (lambda i: np.concatenate([features(i), features(i)[:, :1]], axis=1)) if field == "meta.m" else features
    before = _snapshot(reference)
    with pytest.raises(IndexMismatchError) as info:
        _build(reference, fn, **change)
    assert field in info.value.fields
    assert field in str(info.value) and "(on disk)" in str(info.value)
    if field == "meta.checkpoint":
        assert "0" * 64 in str(info.value) and "1" * 64 in str(info.value)
    assert _snapshot(reference) == before  # nothing was touched


# ----------------------------------------------------------------------------------------------
# Streaming top-k
# ----------------------------------------------------------------------------------------------

def _brute_force(train, queries, k, score):
    train, queries = np.asarray(train, np.float64), np.asarray(queries, np.float64)
    if score == "dot":
        s = queries @ train.T
    elif score == "cosine":
        denominator = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(train, axis=1)[None, :]
        s = np.where(denominator > 0, queries @ train.T / np.where(denominator > 0, denominator, 1.0), 0.0)
    else:
        s = score(queries, train)
    order = np.stack([np.lexsort((np.arange(len(train)), -row)) for row in s])[:, :k]
    return np.take_along_axis(s, order, 1), order


def _bilinear(q_block, t_block):
    """A preconditioned score ⟨Pq, t⟩ with a fixed diagonal P."""
    p = 1.0 + np.arange(q_block.shape[1]) / q_block.shape[1]
    return (q_block * p) @ t_block.T


@pytest.mark.parametrize("score", ["dot", "cosine", _bilinear])
def test_top_k_equals_brute_force(score):
    rng = np.random.default_rng(0)
    train = rng.normal(size=(103, 8))
    train[17] = 0.0  # a zero row: cosine 0 by definition
    queries = rng.normal(size=(6, 8))
    for block_size in (None, 1, 7, 10, 64, 500):
        for k in (1, 5, 13, 103):
            scores, indices = top_k(train, queries, k, score=score, block_size=block_size)
            ref_s, ref_i = _brute_force(train, queries, k, score)
            np.testing.assert_array_equal(indices, ref_i)
            np.testing.assert_allclose(scores, ref_s, rtol=1e-12, atol=1e-12)
            assert scores.shape == indices.shape == (6, k)


def test_top_k_ties_break_by_lower_index():
    rng = np.random.default_rng(1)
    train = rng.integers(-1, 2, size=(50, 3)).astype(np.float64)  # 27 distinct rows: many exact ties
    queries = rng.integers(-1, 2, size=(4, 3)).astype(np.float64)
    for score in ("dot", "cosine"):
        for block_size in (1, 3, 8, 49):
            for k in (1, 10, 31, 50):
                scores, indices = top_k(train, queries, k, score=score, block_size=block_size)
                ref_s, ref_i = _brute_force(train, queries, k, score)
                np.testing.assert_array_equal(indices, ref_i)
                np.testing.assert_allclose(scores, ref_s, atol=1e-12)


def test_top_k_random_ties_stress():
    """Many random shapes with heavy ties: the per-block preselection never drops a tied lower index."""
    rng = np.random.default_rng(4)
    for _ in range(40):
        n, m, num_q = rng.integers(1, 60), rng.integers(1, 4), rng.integers(1, 5)
        train = rng.integers(-1, 2, size=(n, m)).astype(np.float32)
        queries = rng.integers(-2, 3, size=(num_q, m)).astype(np.float32)
        k, block_size = int(rng.integers(1, n + 1)), int(rng.integers(1, n + 3))
        scores, indices = top_k(train, queries, k, block_size=block_size)
        ref_s, ref_i = _brute_force(train, queries, k, "dot")
        np.testing.assert_array_equal(indices, ref_i)
        np.testing.assert_array_equal(scores, ref_s)


def test_top_k_on_index_streams_one_shard_at_a_time(reference, monkeypatch):
    index = GradientIndex.open(str(reference))
    train = features(np.arange(N))
    queries = features(np.array([3, 50, 96])) + 0.1
    live: list[weakref.ref] = []  # loaded shards are freed by reference counting (no cycles)
    peak = [0]
    original = GradientIndex._load_shard

    def tracked(self, i):
        alive = sum(r() is not None for r in live)
        array = original(self, i)
        live.append(weakref.ref(array))
        peak[0] = max(peak[0], alive + 1)
        return array

    monkeypatch.setattr(GradientIndex, "_load_shard", tracked)
    for score in ("dot", "cosine", _bilinear):
        for block_size in (None, 3, 8, 50):
            index.shards_loaded = 0
            scores, indices = top_k(index, queries, 10, score=score, block_size=block_size)
            assert index.shards_loaded == index.num_shards  # each shard opened exactly once
            ref_s, ref_i = _brute_force(train, queries, 10, score)
            np.testing.assert_array_equal(indices, ref_i)
            np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-5)
            assert scores.dtype == np.float32
    assert peak[0] == 1  # never two shards mapped at once


def test_top_k_validates_arguments():
    train = np.ones((10, 4))
    with pytest.raises(ValueError, match="k=11 exceeds the number of indexed examples N=10"):
        top_k(train, np.ones((2, 4)), 11)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_k(train, np.ones((2, 4)), 0)
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, 4\)"):
        top_k(train, np.ones((2, 5)), 3)
    with pytest.raises(ValueError, match="score='l2'"):
        top_k(train, np.ones((2, 4)), 3, score="l2")
    with pytest.raises(ValueError, match="block_size"):
        top_k(train, np.ones((2, 4)), 3, block_size=0)
    with pytest.raises(ValueError, match="returned shape"):
        top_k(train, np.ones((2, 4)), 3, score=lambda q, t: q @ t.T[:, :1])


# ----------------------------------------------------------------------------------------------
# Sketched per-example gradients as features
# ----------------------------------------------------------------------------------------------

def _logreg_problem(dtype):
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(6, 3)), dtype), "b": jnp.asarray(rng.normal(size=(3,)), dtype)}
    arrays = {"x": rng.normal(size=(11, 6)).astype(dtype), "y": rng.integers(0, 3, size=11).astype(np.int32)}

    return params, arrays, _logreg_loss


@pytest.mark.parametrize("name, m, mode", [("dense", 8, "explicit"), ("afjl", 8, "implicit"), ("sjlt", 16, "explicit")])
def test_sketched_features_fn_equals_one_by_one(x64, name, m, mode):
    params, arrays, per_example_loss = _logreg_problem(np.float64)
    sketch = sketching.get(name, m)
    state = sketch.init(jax.random.key(3), params)

    @jax.jit
    def one_by_one(x, y):  # Φ ∇θ ℓ(z_i) for a single example, the definition
        return sketch.apply(state, jax.grad(lambda p: per_example_loss(p, {"x": x[None], "y": y[None]})[0])(params))

    reference = np.stack([np.asarray(one_by_one(arrays["x"][i], arrays["y"][i])) for i in range(11)])
    assert reference.dtype == np.float64
    indices = np.array([4, 0, 10, 4, 7])
    exact = sketched_features_fn(sketch, state, per_example_loss, params, arrays, mode=mode, out_dtype=None)
    np.testing.assert_allclose(exact(indices), reference[indices], rtol=1e-12, atol=1e-13)
    chunked = sketched_features_fn(sketch, state, per_example_loss, params, arrays, chunk_size=2, out_dtype=None)
    np.testing.assert_allclose(chunked(np.arange(11)), reference, rtol=1e-12, atol=1e-13)
    stored = sketched_features_fn(sketch, state, per_example_loss, params, arrays)(indices)
    assert stored.dtype == np.float32
    np.testing.assert_allclose(stored, reference[indices], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 11\)"):
        exact(np.array([11]))


def test_index_of_sketched_gradients_end_to_end(tmp_path):
    params, arrays, per_example_loss = _logreg_problem(np.float32)
    sketch = sketching.get("qk", 8)
    state = sketch.init(jax.random.key(0), params)
    fn = sketched_features_fn(sketch, state, per_example_loss, params, arrays)
    meta = {"sketch": "qk", "m": 8, "sketch_seed": 0, "checkpoint": params_hash(params)}
    index = build_index(str(tmp_path / "idx"), fn, 11, meta=meta, shard_size=4, progress=False)
    # Each shard holds exactly what features_fn returns for its rows (XLA may round a batch of a
    # different size differently in the last bits, so the comparison is shard by shard).
    for start, rows in index.iter_blocks():
        np.testing.assert_array_equal(rows, fn(np.arange(start, min(start + 4, 11))))
    scores, indices = top_k(index, fn(np.arange(4, 8)), 3, score="cosine")
    np.testing.assert_array_equal(indices[:, 0], np.arange(4, 8))  # each example is its own best match
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Reduced-precision storage
# ----------------------------------------------------------------------------------------------

def _wide_range_features(indices):
    """Rows whose magnitudes span 10^0 .. 10^-8, like per-example gradients of well-fit examples."""
    return features(indices) * (10.0 ** -(np.asarray(indices) % 9))[:, None].astype(np.float32)


@pytest.mark.parametrize("dtype, unit_roundoff", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_low_precision_storage_score_error(tmp_path, dtype, unit_roundoff):
    """Rows stored in `dtype`, scores accumulated in float32. Each stored row has ‖x̃ − x‖∞ ≤ u·max|x|
    (u the unit roundoff; float16 rows carry a power-of-two scale, so tiny rows do not underflow), so a
    cosine score moves by ≲ 2u·√m·max|x|/‖x‖ ≤ 2u√m and a dot score by ≤ u·‖q‖₁·max|x|."""
    full = _build(tmp_path / "float32", fn=_wide_range_features)
    index = _build(tmp_path / dtype, fn=_wide_range_features, dtype=dtype)
    scale_bytes = 4 * N if dtype == "float16" else 0
    assert index.dtype == dtype and full.nbytes - index.nbytes == N * M * 2 - scale_bytes
    exact = _wide_range_features(np.arange(N)).astype(np.float64)
    stored = index.load()
    assert stored.dtype == np.float32
    peak = np.max(np.abs(exact), axis=1, keepdims=True)
    assert np.all(np.abs(stored - exact) <= unit_roundoff * peak)
    queries = features(np.array([1, 40, 80])).astype(np.float64) + 0.05
    qn, tn = np.linalg.norm(queries, axis=1, keepdims=True), np.linalg.norm(exact, axis=1, keepdims=True)
    dense = {"dot": queries @ exact.T, "cosine": (queries @ exact.T) / (qn * tn.T)}
    bound = {"dot": 1.01 * unit_roundoff * np.abs(queries).sum(1, keepdims=True) * peak.T + 1e-6 * np.abs(dense["dot"]),
             "cosine": 2.02 * unit_roundoff * np.sqrt(M) * (peak / tn).T + 1e-6}
    for score in ("dot", "cosine"):
        scores, indices = top_k(index, queries, N, score=score)  # k = N: every row's score
        by_row = np.empty((3, N))
        np.put_along_axis(by_row, indices, scores, 1)
        assert np.all(np.abs(by_row - dense[score]) <= bound[score])
    with pytest.raises(IndexMismatchError, match="dtype"):
        _build(tmp_path / dtype, fn=_wide_range_features)
