"""The gradient index never returns silently wrong results: checksums verified on read, corrupt,
empty or unaccounted-for shards named and recomputed on resume, manifest paths confined, a rebuild
with another checkpoint refused, storage-range and non-finite inputs refused, and top-k scores
bit-identical for every blocking."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import artifacts
from attribution import index as index_module
from attribution.index import (GradientIndex, IndexMismatchError, IndexRepairWarning, build_index, top_k)
from tests.attribution.test_index import META, N, SHARD, Counting, _build, _snapshot, features
from tests.attribution.test_index import reference  # noqa: F401  (the module-scoped reference build)


@pytest.fixture()
def built(tmp_path, reference):
    """A fresh copy of the module's reference index (20 shards of 5 rows)."""
    path = tmp_path / "index"
    shutil.copytree(reference, path)
    return path


def _flip(file, position=-7):
    data = bytearray(open(file, "rb").read())
    data[position] ^= 0x40
    open(file, "wb").write(bytes(data))


def test_flipped_bytes_in_a_shard_are_caught_on_normal_reads(built):
    _flip(built / "shards" / "00004.npy")
    index = GradientIndex.open(str(built))  # open is cheap: checksums are checked on first read
    queries = features(np.array([1, 2])) + 0.1
    with pytest.raises(artifacts.CorruptArtifactError, match=r"shards/00004.npy of the index at .* is corrupt") as info:
        top_k(index, queries, 3)
    assert info.value.path.endswith("shards/00004.npy")
    with pytest.raises(artifacts.CorruptArtifactError, match="00004.npy"):
        GradientIndex.open(str(built)).load()
    with pytest.raises(artifacts.CorruptArtifactError, match="00004.npy"):
        GradientIndex.open(str(built)).verify()
    # Reading without checksums is possible, explicitly.
    GradientIndex.open(str(built), verify_checksums=False).load()


def test_a_shard_swapped_for_another_valid_shard_is_caught(built):
    shutil.copy(built / "shards" / "00001.npy", built / "shards" / "00003.npy")  # same shape, valid .npy
    with pytest.raises(artifacts.CorruptArtifactError, match="00003.npy"):
        top_k(GradientIndex.open(str(built)), features(np.array([1])), 2, score="cosine")


def test_checksums_are_verified_once_per_open(built, monkeypatch):
    index = GradientIndex.open(str(built))
    reads = []
    original = index_module.file_sha256
    monkeypatch.setattr(index_module, "file_sha256", lambda f: reads.append(f) or original(f))
    queries = features(np.array([1, 2]))
    first = top_k(index, queries, 4)
    assert len(reads) == index.num_shards
    second = top_k(index, queries, 4, block_size=3)
    index.load()
    assert len(reads) == index.num_shards  # later reads are not re-hashed
    assert first[0].tobytes() == second[0].tobytes()


def test_rerun_of_a_corrupt_index_names_and_recomputes_only_that_shard(built, reference):
    _flip(built / "shards" / "00006.npy")
    counting = Counting()
    with pytest.warns(IndexRepairWarning, match=r"shards/00006.npy: corrupt"):
        _build(built, counting)
    assert counting.starts == [6 * SHARD]
    assert _snapshot(built) == _snapshot(reference)
    GradientIndex.open(str(built)).verify()


def test_empty_shard_is_named_and_repaired(built, reference):
    open(built / "shards" / "00002.npy", "wb").close()
    with pytest.raises(artifacts.CorruptArtifactError, match=r"00002.npy .* is empty \(0 bytes\)"):
        GradientIndex.open(str(built))
    counting = Counting()
    with pytest.warns(IndexRepairWarning, match=r"00002.npy: empty \(0 bytes\)"):
        _build(built, counting)
    assert counting.starts == [2 * SHARD]
    assert _snapshot(built) == _snapshot(reference)


def test_empty_or_corrupt_shard_of_an_interrupted_build_is_recomputed_on_resume(tmp_path, reference):
    path = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(path, Counting(fail_at_start=5 * SHARD))
    open(path / "shards" / "00001.npy", "wb").close()  # 0 bytes (used to break every resume with EOFError)
    _flip(path / "shards" / "00003.npy")
    counting = Counting()
    with pytest.warns(IndexRepairWarning) as record:
        _build(path, counting)
    messages = " ".join(str(w.message) for w in record)
    assert "00001.npy: empty" in messages and "00003.npy: corrupt" in messages
    assert counting.starts == [SHARD * i for i in (1, 3)] + [SHARD * i for i in range(5, 20)]
    assert _snapshot(path) == _snapshot(reference)
    assert not (path / index_module.PENDING_DIR).exists()


def test_replaced_example_ids_fail_verify_and_reads(built):
    np.save(built / "example_ids.npy", np.arange(N)[::-1].copy(), allow_pickle=False)  # valid, wrong
    with pytest.raises(artifacts.CorruptArtifactError, match="example_ids.npy"):
        GradientIndex.open(str(built)).verify()
    with pytest.raises(artifacts.CorruptArtifactError, match="example_ids.npy"):
        GradientIndex.open(str(built)).example_ids


@pytest.mark.parametrize("bad", ["../../x.npy", "/etc/hostname", "shards/../../outside.npy"])
def test_manifest_paths_are_confined_to_the_index_folder(built, bad):
    outside = built.parent.parent / "x.npy"
    shutil.copy(built / "shards" / "00000.npy", outside)
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["shards"][0]["file"] = bad
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(artifacts.UnsafePathError, match="leaves its folder|relative path inside"):
        GradientIndex.open(str(built))


def test_rebuild_after_deleting_the_manifest_with_another_checkpoint_is_refused(built, reference):
    os.remove(built / "manifest.json")
    other = {**META, "checkpoint": "1" * 64}
    with pytest.raises(IndexMismatchError) as info:
        _build(built, meta=other)
    assert list(info.value.fields) == ["meta.checkpoint"]
    assert "0" * 64 in str(info.value) and "1" * 64 in str(info.value)
    # With the same settings the shards are reused (their checksums are lost with the manifest, so
    # they are recomputed and named) and the index ends identical.
    counting = Counting()
    with pytest.warns(IndexRepairWarning, match="no recorded checksum"):
        _build(built, counting)
    assert _snapshot(built) == _snapshot(reference)


def test_shards_left_without_manifest_and_fingerprint_are_never_reused(built):
    os.remove(built / "manifest.json")
    os.remove(built / artifacts.FINGERPRINT_FILE)
    other = {**META, "checkpoint": "1" * 64}
    counting = Counting(fn=lambda i: features(i) * 2.0)
    with pytest.warns(IndexRepairWarning, match=r"shards/00000.npy, .* and 12 more: no recorded checksum"):
        index = _build(built, counting, meta=other)
    assert len(counting.starts) == 20  # every old shard recomputed under the new checkpoint
    np.testing.assert_array_equal(index.load(), features(np.arange(N)) * 2.0)


def test_pending_checksums_of_another_build_are_not_trusted(tmp_path):
    path = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        _build(path, Counting(fail_at_start=3 * SHARD))
    os.remove(path / "manifest.json")
    os.remove(path / artifacts.FINGERPRINT_FILE)
    counting = Counting(fn=lambda i: features(i) + 1.0)
    with pytest.warns(IndexRepairWarning, match="other settings"):
        index = _build(path, counting, meta={**META, "checkpoint": "2" * 64})
    assert len(counting.starts) == 20
    np.testing.assert_array_equal(index.load(), features(np.arange(N)) + 1.0)


def test_empty_manifest_is_named_and_rewritten(built, reference):
    open(built / "manifest.json", "wb").close()
    with pytest.raises(ValueError, match="manifest.json is empty"):
        GradientIndex.open(str(built))
    with pytest.warns(IndexRepairWarning) as record:
        _build(built)
    messages = [str(w.message) for w in record]
    assert any("manifest.json is empty" in m for m in messages)
    assert any("recomputing 20 shard(s)" in m for m in messages)  # their checksums were in the manifest
    assert _snapshot(built) == _snapshot(reference)


def test_low_precision_storage_refuses_values_out_of_its_range(tmp_path):
    def huge(indices):
        out = features(indices)
        out[np.asarray(indices) == 7, 0] = np.float32(3.4e38)  # finite float32, beyond bfloat16's 3.39e38
        return out

    with pytest.raises(ValueError, match=r"example 7 .* exceed the range of bfloat16 storage"):
        _build(tmp_path / "bf16", fn=huge, dtype="bfloat16")
    assert not os.path.exists(tmp_path / "bf16" / "shards" / "00001.npy")
    index = _build(tmp_path / "f16", fn=huge, dtype="float16")  # per-row power-of-two scale: representable
    stored = index.load()
    assert np.all(np.isfinite(stored))
    np.testing.assert_allclose(stored[7, 0], 3.4e38, rtol=2 ** -11)


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_top_k_refuses_non_finite_queries_and_rows(score):
    train = np.random.default_rng(0).normal(size=(20, 4))
    queries = np.ones((3, 4))
    queries[1, 2] = np.nan
    with pytest.raises(ValueError, match="query row 1"):
        top_k(train, queries, 2, score=score)
    queries[1, 2] = np.inf
    with pytest.raises(ValueError, match="query row 1"):
        top_k(train, queries, 2, score=score)
    train[13, 0] = np.nan
    with pytest.raises(ValueError, match="training row 13"):
        top_k(train, np.ones((2, 4)), 2, score=score)


@pytest.mark.parametrize("tile_rows", [None, 100])
def test_top_k_is_bit_identical_for_every_block_size_and_shard_size(tmp_path, monkeypatch, tile_rows):
    if tile_rows is not None:  # many tiles (the default cuts these 1000 rows into one)
        monkeypatch.setattr(index_module, "TILE_ELEMENTS", 33 * tile_rows)
        assert index_module.score_tile_rows(1000, 33) == tile_rows
    rng = np.random.default_rng(3)
    rows, m = 1000, 33
    data = rng.normal(size=(rows, m)).astype(np.float32) * rng.lognormal(size=(rows, 1)).astype(np.float32)
    queries = rng.normal(size=(7, m)).astype(np.float32)
    meta = {"sketch": "none", "m": m, "checkpoint": "c"}
    indexes = [build_index(str(tmp_path / f"s{s}"), lambda i: data[i], rows, meta=meta, shard_size=s, progress=False)
               for s in (5, 64, 1000)]
    for score in ("dot", "cosine"):
        want_s, want_i = top_k(data, queries, 25, score=score)
        for source in [data, *indexes]:
            for block in (None, 1, 5, 7, 255, 256, 257, 999):
                got_s, got_i = top_k(source, queries, 25, score=score, block_size=block)
                assert got_s.tobytes() == want_s.tobytes(), (score, block)
                np.testing.assert_array_equal(got_i, want_i)
