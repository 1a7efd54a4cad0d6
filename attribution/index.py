"""On-disk index of sketched per-example gradients, and streaming top-k retrieval.

A training set of N examples becomes an N×m matrix of features, row i = Φ ∇θ ℓ(z_i, θ) (sketched scores are ŝ(z, x) = ⟨Φg_z, Φg_x⟩), written to a folder:

    PATH/manifest.json        format, meta (sketch, m, sketch_seed, checkpoint, ...), N, m, shard
                              size, storage dtype, example-id digest, completion flag, per-shard sha256
    PATH/fingerprint.json     the fields that determine every shard's bytes (`artifacts` fingerprint)
    PATH/example_ids.npy      (N,) int64 or unicode, no pickle
    PATH/shards/00000.npy     rows [0, S): float32 (or reduced-precision storage: bfloat16 bits as
                              uint16, or float16 rows with a per-row power-of-two float32 scale)
    PATH/shards/00001.npy     rows [S, 2S), ...
    PATH/shard_checksums/     while a build is in progress: per shard {sha256, fingerprint}

Every file is written atomically (`artifacts.atomic_write_bytes`: a temporary `.tmp-*` file in the
same folder, fsync, `os.replace`), so a shard is either absent or whole. `build_index` takes an
exclusive `flock` on `PATH/.lock` (the kernel drops it when the process dies, also under SIGKILL),
removes `.tmp-*` leftovers of a killed build, and computes only the shards that are missing or
untrustworthy: a rerun after `kill -9` ends with the same bytes as an uninterrupted build, provided
`features_fn` is deterministic (a jitted JAX function on the same backend and batch shape is).

Fingerprints and checksums. The manifest and `fingerprint.json` store `meta`; a rerun with other
meta (another sketch, m, seed or checkpoint hash), another N, shard size, storage dtype or other
example ids raises `IndexMismatchError` naming every differing field (also when the manifest was
deleted and only `fingerprint.json` remains), so vectors from different sketches or checkpoints are
never mixed in one index (record what is needed to regenerate the sketch with each store).
Each shard's sha256 is recorded before the shard is written; a rerun reuses a shard only if its bytes
match that checksum, and names (IndexRepairWarning) and recomputes an empty, corrupt or
unaccounted-for one. Reads verify too: `GradientIndex` checks each shard's sha256 (and the example
ids') once, on its first read, and raises `CorruptArtifactError` naming the file; paths in the
manifest are confined to the index folder.

Several processes (`attribution.distributed.build_index_distributed`) each build an index
of a contiguous range of shards in PATH/process-PPPP-of-QQQQ/, and process 0 writes one merged
manifest at PATH whose shard entries are relative paths into those folders (plus a `processes`
list); it is read exactly like a single-process index.

Retrieval (`top_k`) streams the index block by block and keeps, per query, the k best (score, row)
pairs seen so far, so memory is O(Q·(k + block)) plus one block of features; it never loads the whole
index ("block every n×m product; stream training gradients; … memory-map stores").
Ties are broken by the lower row index, which makes the result equal to a stable brute-force sort.
Products are taken over fixed-shape tiles aligned to global rows, so scores are bit-identical for
any block size, shard size or number of building processes.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import io
import os
import shutil
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import artifacts
from artifacts import CorruptArtifactError, atomic_write_bytes, atomic_write_npy, confined_path, file_sha256  # noqa: F401
from artifacts.atomic import npy_bytes as _npy_bytes
from sketching.base import Sketch, SketchState
from sketching.gradients import MODES, sketch_per_example_gradients

__all__ = [
    "FORMAT", "VERSION", "STORAGE_DTYPES", "SCORES", "REQUIRED_META", "TILE_ELEMENTS", "score_tile_rows",
    "params_hash", "IndexMismatchError", "IndexIncompleteError", "IndexRepairWarning", "CorruptArtifactError",
    "GradientIndex", "build_index", "sketched_features_fn", "top_k",
]

FORMAT = "gradsketch.gradient_index"
VERSION = 1
MANIFEST = "manifest.json"
EXAMPLE_IDS = "example_ids.npy"
SHARDS_DIR = "shards"
PENDING_DIR = "shard_checksums"  # per-shard checksums of a build in progress (removed once complete)
LOCK = ".lock"
TMP_PREFIX = artifacts.TMP_PREFIX
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
SCORES = ("dot", "cosine")
REQUIRED_META = ("sketch", "m", "checkpoint")
TIMESTAMP_FIELDS = ("created_utc", "completed_utc")
FINGERPRINT_FIELDS = ("format", "version", "meta", "num_examples", "dim", "shard_size", "dtype", "example_ids_sha256")
DEFAULT_ARRAY_BLOCK = 4096
TILE_ELEMENTS = 1 << 22  # top_k multiplies tiles of about this many stored values (16 MiB of float32)

PyTree = Any
FeaturesFn = Callable[[np.ndarray], np.ndarray]
ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------
# Errors and the checkpoint id
# ----------------------------------------------------------------------------------------------

class IndexMismatchError(ValueError):
    """An index already on disk was built with other settings; `.fields` maps each differing field to
    (on disk, requested)."""

    def __init__(self, path: str, fields: Mapping[str, tuple[Any, Any]]):
        self.path = path
        self.fields = dict(fields)
        lines = [f"  {name}: {old!r} (on disk) vs {new!r} (requested)" for name, (old, new) in self.fields.items()]
        super().__init__(
            f"the index at {path} was built with different settings; refusing to mix them "
            f"(use another path, or delete the folder to rebuild):\n" + "\n".join(lines)
        )


class IndexIncompleteError(ValueError):
    """`GradientIndex.open` on a folder whose build has not finished (or lost shards)."""


class IndexRepairWarning(UserWarning):
    """`build_index` found a shard it cannot trust (empty, corrupt, or without a recorded checksum) and
    recomputes it; the message names the file and the reason."""


def params_hash(params: PyTree) -> str:
    """The checkpoint id: sha256 (hex) over every leaf's path (`jax.tree_util.keystr`), dtype, shape
    and row-major bytes, in `jax.tree_util` order (`artifacts.tree_digest`). Equal parameters give
    equal hashes in any process; any change of a value, dtype, shape or parameter name changes it."""
    try:
        return artifacts.tree_digest(params)
    except ValueError:
        raise ValueError("params_hash: params has no array leaves") from None


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open `.npy` file object positioned at its start."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def _npy_from_bytes(data: bytes) -> np.ndarray:
    """The array of a `.npy` file's bytes, read-only, without copying the data (no pickle)."""
    buffer = io.BytesIO(data)
    shape, fortran, dtype = _read_npy_header(buffer)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed (they would need pickle)")
    count = int(np.prod(shape, dtype=np.int64))
    array = np.frombuffer(data, dtype=dtype, count=count, offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def _npy_header(file: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, expected file size) from a `.npy` header; ValueError if it cannot be read."""
    with open(file, "rb") as f:
        shape, _, dtype = _read_npy_header(f)
        offset = f.tell()
    return shape, dtype, offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _json_normalise(value: Any, field: str) -> Any:
    """`value` as it reads back from JSON (tuples become lists, numpy scalars plain numbers)."""
    try:
        return artifacts.loads(artifacts.dumps(value, nonfinite="error", what=field))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field} must be JSON-serialisable (str, int, float, bool, None, lists, dicts; "
                         f"finite numbers): {error}") from None


def _read_manifest(path: str) -> dict | None:
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return None
    manifest = artifacts.read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{file} is not a gradient index manifest (format={got!r}, expected {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{file} has version {manifest.get('version')!r}; this code reads version {VERSION}")
    return manifest


def _write_manifest(path: str, manifest: dict) -> None:
    artifacts.atomic_write_json(os.path.join(path, MANIFEST), manifest, nonfinite="error")


def _shard_name(i: int) -> str:
    return f"{SHARDS_DIR}/{i:05d}.npy"


def _pending_file(path: str, i: int) -> str:
    return os.path.join(path, PENDING_DIR, f"{i:05d}.json")


def _shard_ranges(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_examples)) for s in range(0, num_examples, shard_size)]


def _shard_layout(dtype: str, rows: int, m: int) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, numpy dtype) of a shard's `.npy` for `rows` rows of dimension m.

    float32: (rows, m) float32. bfloat16: (rows, m) uint16, the bfloat16 bit patterns (`np.save` has
    no portable bfloat16 descriptor). float16: (rows,) records {"scale": float32, "row": float16 (m,)}
    with row_i = x_i / scale_i and scale_i = 2^e_i the power of two with max_j |x_ij| / scale_i in
    [1/2, 1): per-example gradients span many orders of magnitude (a well-fit example's gradient is
    tiny) and plain float16 would flush them to subnormals (relative error up to 100% below ~6e-5);
    a power-of-two scale is exact, so every row keeps float16's relative precision 2^-11.
    """
    if dtype == "float16":
        return (rows,), np.dtype([("scale", "<f4"), ("row", "<f2", (m,))])
    return (rows, m), np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype("<f4")


def _encode(features: np.ndarray, dtype: str) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return features.astype(ml_dtypes.bfloat16).view(np.uint16)
    if dtype == "float16":
        peak = np.max(np.abs(features), axis=1)
        exponent = np.minimum(np.frexp(peak)[1], 127)  # peak = f·2^e, f in [1/2, 1); e = 0 for a zero row
        scale = np.ldexp(np.float32(1.0), exponent).astype(np.float32)
        out = np.zeros(features.shape[0], _shard_layout(dtype, features.shape[0], features.shape[1])[1])
        out["scale"] = scale
        out["row"] = (features / scale[:, None]).astype(np.float16)
        return out
    return features


def _decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as a float32 (b, m) copy (scores are accumulated in float32 whatever the storage
    dtype; a copy, never a view that keeps the shard's memory map alive)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(stored).view(ml_dtypes.bfloat16).astype(np.float32)
    if dtype == "float16":
        rows = np.asarray(stored["row"], np.float32)  # a fresh float32 array, scaled in place
        rows *= np.asarray(stored["scale"], np.float32)[:, None]
        return rows
    return np.array(stored, dtype=np.float32, copy=True)


def _encode_checked(features: np.ndarray, dtype: str, start: int) -> np.ndarray:
    """`_encode`, refusing values the storage dtype cannot hold (e.g. |x| above bfloat16's largest
    finite value 3.39e38 would be stored as inf): ValueError naming the first such example."""
    encoded = _encode(features, dtype)
    if dtype != "float32":
        bad = ~np.all(np.isfinite(_decode(encoded, dtype)), axis=1)
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            peak = float(np.max(np.abs(np.asarray(features, np.float64)[row])))
            raise ValueError(f"features of example {start + row} (max |x| = {peak:.4g}) exceed the range of "
                             f"{dtype} storage and would be stored as inf; use dtype='float32'. Nothing was "
                             "written for that shard")
    return encoded


def _build_lock(path: str):
    """Exclusive, non-blocking `flock` on PATH/.lock for the duration of a build (`artifacts.LockedError`,
    a RuntimeError, when another live process holds it)."""
    return artifacts.exclusive_lock(os.path.join(path, LOCK), what=f"building the index at {path}")


def _remove_temporaries(path: str) -> list[str]:
    """Deletes the `.tmp-*` files a killed build left behind (safe: we hold the build lock)."""
    return artifacts.remove_temporaries(path, os.path.join(path, SHARDS_DIR), os.path.join(path, PENDING_DIR))


# ----------------------------------------------------------------------------------------------
# Example ids
# ----------------------------------------------------------------------------------------------

def _example_ids_array(example_ids: Sequence | np.ndarray | None, num_examples: int) -> np.ndarray:
    if example_ids is None:
        return np.arange(num_examples, dtype=np.int64)
    ids = np.asarray(example_ids)
    if ids.ndim != 1 or ids.shape[0] != num_examples:
        raise ValueError(f"example_ids must be a 1-D sequence of num_examples={num_examples} ids, "
                         f"got shape {ids.shape}")
    if np.issubdtype(ids.dtype, np.integer):
        ids = ids.astype(np.int64)
    elif ids.dtype.kind == "U":
        pass
    elif ids.dtype.kind == "S":
        ids = ids.astype(str)
    else:
        raise ValueError(f"example_ids must be integers or strings, got dtype {ids.dtype}")
    if len(np.unique(ids)) != num_examples:
        raise ValueError("example_ids must be unique")
    return ids


# ----------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------

class GradientIndex:
    """A finished index on disk (`GradientIndex.open(path)`).

    Attributes: `path`, `meta` (the dict given to `build_index`), `num_examples` (N), `dim` (m),
    `shard_size`, `num_shards`, `dtype` (storage dtype name), `example_ids` ((N,) array, loaded on
    first access), `manifest` (the full manifest dict). Rows come back as float32 whatever the
    storage dtype.

    Checksums: with `verify_checksums=True` (the default) every shard's sha256 is compared with the
    manifest the first time this object reads it (`iter_blocks`, `load`, `top_k`), and
    `example_ids.npy` on first access; a mismatch raises `CorruptArtifactError` naming the file. The
    file is streamed through sha256 (4 MiB at a time) and then memory-mapped; a shard verified once is
    trusted for the rest of this object's life. `verify()` rechecks everything.
    """

    def __init__(self, path: str, manifest: dict, *, verify_checksums: bool = True, _verified: Sequence[int] = ()):
        self.path = os.path.abspath(path)
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.num_examples: int = int(manifest["num_examples"])
        self.dim: int = int(manifest["dim"])
        self.shard_size: int = int(manifest["shard_size"])
        self.dtype: str = manifest["dtype"]
        self.shards: list[dict] = manifest["shards"]
        self.num_shards = len(self.shards)
        # Every path read from the manifest must stay inside the index folder.
        self._files = [confined_path(self.path, s["file"], what=f"shard path in {MANIFEST}") for s in self.shards]
        self.verify_checksums = bool(verify_checksums)
        self._verified: set[int] = set(_verified)
        self._example_ids: np.ndarray | None = None
        self.shards_loaded = 0  # how many shard files iter_blocks has opened (for memory accounting)

    @classmethod
    def open(cls, path: str, *, verify_checksums: bool = True) -> "GradientIndex":
        """Opens a complete index; FileNotFoundError if there is none at `path`, IndexIncompleteError
        if its build has not finished or a shard file is missing, CorruptArtifactError for an empty
        shard file, UnsafePathError for a manifest path leaving the folder. Shard checksums are
        verified lazily, once per shard, on first read (class docstring)."""
        manifest = _read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no gradient index at {path} ({MANIFEST} is missing); build it with build_index")
        if not manifest.get("complete"):
            done = len(glob.glob(os.path.join(glob.escape(path), SHARDS_DIR, "[0-9]*.npy")))
            raise IndexIncompleteError(
                f"the index at {path} is incomplete ({done} of {manifest['num_shards']} shards written); "
                "rerun build_index with the same arguments to resume it"
            )
        index = cls(path, manifest, verify_checksums=verify_checksums)
        missing = [s["file"] for s, f in zip(index.shards, index._files) if not os.path.exists(f)]
        if missing:
            raise IndexIncompleteError(f"the index at {path} lacks shard files {missing[:5]}"
                                       f"{' ...' if len(missing) > 5 else ''}; rerun build_index to rewrite them")
        for file in index._files:
            if os.path.getsize(file) == 0:
                raise CorruptArtifactError(file, f"shard {file} of the index at {index.path} is empty (0 bytes); "
                                                 "rerun build_index with the same arguments to recompute it")
        return index

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"GradientIndex({self.path!r}, N={self.num_examples}, m={self.dim}, shards={self.num_shards}, "
                f"dtype={self.dtype}, sketch={self.meta.get('sketch')!r})")

    def _corrupt(self, file: str, actual: str, expected: str) -> CorruptArtifactError:
        what = "empty (0 bytes)" if actual == hashlib.sha256(b"").hexdigest() else \
            f"corrupt (sha256 {actual} differs from {expected} in {MANIFEST})"
        return CorruptArtifactError(file, f"{os.path.relpath(file, self.path)} of the index at {self.path} is "
                                          f"{what}; rerun build_index with the same arguments to recompute it")

    @property
    def example_ids(self) -> np.ndarray:
        if self._example_ids is None:
            file = confined_path(self.path, self.manifest.get("example_ids_file", EXAMPLE_IDS),
                                 what=f"example ids path in {MANIFEST}")
            data = _read_bytes(file)
            actual = hashlib.sha256(data).hexdigest()
            if self.verify_checksums and actual != self.manifest["example_ids_sha256"]:
                raise self._corrupt(file, actual, self.manifest["example_ids_sha256"])
            ids = _npy_from_bytes(data)
            if ids.shape != (self.num_examples,):
                raise CorruptArtifactError(file, f"{file} holds {ids.shape} ids, expected ({self.num_examples},)")
            self._example_ids = ids
        return self._example_ids

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files on disk (the index size)."""
        return sum(os.path.getsize(f) for f in self._files)

    def _load_shard(self, i: int) -> np.ndarray:
        """Shard i memory-mapped read-only; on its first read (with checksums on) the file's sha256 is
        first streamed (4 MiB at a time, so memory stays O(block)) and compared with the manifest."""
        self.shards_loaded += 1
        shard, file = self.shards[i], self._files[i]
        if self.verify_checksums and i not in self._verified:
            actual = file_sha256(file)
            if actual != shard["sha256"]:
                raise self._corrupt(file, actual, shard["sha256"])
            self._verified.add(i)
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        shape, dtype = _shard_layout(self.dtype, shard["stop"] - shard["start"], self.dim)
        if array.shape != shape or array.dtype != dtype:
            raise CorruptArtifactError(file, f"shard {shard['file']} of {self.path} has shape {array.shape} dtype "
                                             f"{array.dtype}, expected {shape} {dtype}")
        return array

    def iter_blocks(self, block_size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (start, rows) with rows a float32 (b, m) copy of rows [start, start + b), in order.

        block_size=None yields one block per shard; otherwise blocks of `block_size` rows (the last
        may be shorter), assembled across shard boundaries. At most one shard is held at a time, and
        only the rows of the current block are copied into memory.
        """
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if block_size is None:
            for i, shard in enumerate(self.shards):
                stored = self._load_shard(i)
                rows = _decode(stored, self.dtype)
                del stored
                yield shard["start"], rows
            return
        block_size = int(block_size)
        pieces: list[np.ndarray] = []
        filled, block_start = 0, 0
        for i, shard in enumerate(self.shards):
            stored = self._load_shard(i)
            offset = 0
            while offset < stored.shape[0]:
                take = min(block_size - filled, stored.shape[0] - offset)
                pieces.append(_decode(stored[offset:offset + take], self.dtype))
                offset += take
                filled += take
                if filled == block_size:
                    block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                    pieces, filled = [], 0
                    yield block_start, block
                    block_start += block_size
            del stored
        if pieces:
            yield block_start, np.concatenate(pieces)

    def load(self) -> np.ndarray:
        """All N×m rows in memory as float32 (for small indexes and tests)."""
        out = np.empty((self.num_examples, self.dim), np.float32)
        for start, rows in self.iter_blocks():
            out[start:start + rows.shape[0]] = rows
        return out

    def verify(self) -> None:
        """Recomputes the sha256 of every shard and of example_ids.npy and compares them with the
        manifest; CorruptArtifactError (a ValueError) naming the first file that differs."""
        for i, (shard, file) in enumerate(zip(self.shards, self._files)):
            actual = file_sha256(file)
            if actual != shard["sha256"]:
                self._verified.discard(i)
                raise self._corrupt(file, actual, shard["sha256"])
        file = confined_path(self.path, self.manifest.get("example_ids_file", EXAMPLE_IDS))
        actual = file_sha256(file)
        if actual != self.manifest["example_ids_sha256"]:
            raise self._corrupt(file, actual, self.manifest["example_ids_sha256"])


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def _validate_build_args(num_examples, meta, shard_size, dtype) -> dict:
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed values: {list(STORAGE_DTYPES)}")
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a dict with keys {list(REQUIRED_META)} (and any JSON), "
                         f"got {type(meta).__name__}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"meta lacks {missing}; required keys: {list(REQUIRED_META)} "
                         "(sketch name or 'none', m = feature dimension, checkpoint = params_hash(params))")
    meta = _json_normalise(dict(meta), "meta")
    m = meta["m"]
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"meta['m'] (the feature dimension) must be a positive int, got {m!r}")
    if not isinstance(meta["sketch"], str):
        raise ValueError(f"meta['sketch'] must be a str (a sketch name, or 'none'), got {meta['sketch']!r}")
    return meta


def _mismatches(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    fields = {}
    for key in ("num_examples", "dim", "shard_size", "dtype", "example_ids_sha256", "processes"):
        if old.get(key) != new.get(key):
            fields[key] = (old.get(key), new.get(key))
    old_meta, new_meta = old.get("meta", {}), new.get("meta", {})
    for key in sorted(set(old_meta) | set(new_meta)):
        if old_meta.get(key, "<absent>") != new_meta.get(key, "<absent>"):
            fields[f"meta.{key}"] = (old_meta.get(key, "<absent>"), new_meta.get(key, "<absent>"))
    return fields


def _fingerprint_fields(wanted: dict) -> dict:
    """What determines every shard's bytes: the index fingerprint (`artifacts`), stored beside the
    manifest in PATH/fingerprint.json and, per shard, in the checksums of a build in progress."""
    return {k: wanted[k] for k in FINGERPRINT_FIELDS}


def _trusted_sha256(path: str, i: int, manifest: dict | None, fingerprint: str) -> tuple[str | None, str]:
    """(the sha256 recorded for shard i, or None, and why none): from a complete manifest, else from
    the shard's pending checksum file written by this build's fingerprint."""
    if manifest is not None and manifest.get("complete"):
        for shard in manifest.get("shards", []):
            if shard.get("file") == _shard_name(i):
                return shard.get("sha256"), ""
    pending = _pending_file(path, i)
    if not os.path.exists(pending):
        return None, "no recorded checksum (the manifest or checksum file is gone), so not trusted"
    try:
        record = artifacts.read_json(pending)
    except ValueError:
        return None, f"unreadable checksum file {pending}"
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None, "written by a build with other settings (its checksum has another fingerprint)"
    return record.get("sha256"), ""


def _shard_problem(path: str, i: int, rows: int, m: int, dtype: str, manifest: dict | None,
                   fingerprint: str) -> str | None:
    """None when shard i can be reused as is; "" when it is simply absent; else why it must be
    recomputed (empty, corrupt, unreadable header, other shape, no trusted checksum)."""
    file = os.path.join(path, _shard_name(i))
    if not os.path.exists(file):
        return ""
    if os.path.getsize(file) == 0:
        return "empty (0 bytes)"
    expected, why = _trusted_sha256(path, i, manifest, fingerprint)
    if expected is None:
        return why
    actual = file_sha256(file)
    if actual != expected:
        return f"corrupt (sha256 {actual[:12]}... differs from the recorded {str(expected)[:12]}...)"
    try:
        shape, stored_dtype, size = _npy_header(file)
    except (ValueError, OSError, EOFError) as error:
        return f"not a readable .npy file ({error})"
    want_shape, want_dtype = _shard_layout(dtype, rows, m)
    if shape != want_shape or stored_dtype != want_dtype or size != os.path.getsize(file):
        return f"of shape {shape} dtype {stored_dtype}, not {want_shape} {want_dtype}"
    return None


def _wanted_manifest(num_examples, meta, shard_size, dtype, example_ids) -> tuple[dict, bytes]:
    """(the manifest fields a build with these arguments must find or write, example ids' .npy bytes);
    shared by `build_index` and `attribution.distributed.build_index_distributed`."""
    meta = _validate_build_args(num_examples, meta, shard_size, dtype)
    num_examples, shard_size = int(num_examples), int(shard_size)
    ids_bytes = _npy_bytes(_example_ids_array(example_ids, num_examples))
    wanted = {
        "format": FORMAT, "version": VERSION, "meta": meta, "num_examples": num_examples, "dim": meta["m"],
        "shard_size": shard_size, "num_shards": len(_shard_ranges(num_examples, shard_size)), "dtype": dtype,
        "example_ids_file": EXAMPLE_IDS, "example_ids_sha256": hashlib.sha256(ids_bytes).hexdigest(),
    }
    return wanted, ids_bytes


def build_index(
    path: str,
    features_fn: FeaturesFn,
    num_examples: int,
    *,
    meta: dict,
    shard_size: int = 1024,
    example_ids: Sequence | np.ndarray | None = None,
    dtype: str = "float32",
    progress: bool = True,
) -> GradientIndex:
    """Writes (or resumes, or reopens) the index of `features_fn` over examples 0..N-1 at `path`.

    features_fn(indices) -> (len(indices), meta["m"]) floats, e.g. `sketched_features_fn(...)`: rows
    Φ ∇θ ℓ(z_i, θ). It is called once per missing shard with indices = arange(start, stop).
    meta: {"sketch": name or "none", "m": int, "checkpoint": params_hash(params), "sketch_seed": int,
    ...any JSON}. dtype: storage dtype, one of STORAGE_DTYPES (float16 / bfloat16 halve the size,
    see `_shard_layout`; rows are read back as float32; values the dtype cannot hold are refused).
    example_ids: (N,) unique ints or strings, default arange(N).

    An existing complete index with the same settings is reopened without recomputing; an
    interrupted one is resumed (only missing shards are computed); one with other settings raises
    IndexMismatchError, also when only its `fingerprint.json` survives (a deleted manifest). Before a
    shard on disk is reused its sha256 is checked against the checksum recorded when it was written
    (in the manifest, or in PATH/shard_checksums/ while the build is in progress): an empty, corrupt
    or unaccounted-for shard is named in an IndexRepairWarning and recomputed. Non-finite features
    raise ValueError (nothing is written for that shard).
    """
    from tqdm.auto import tqdm

    wanted, ids_bytes = _wanted_manifest(num_examples, meta, shard_size, dtype, example_ids)
    num_examples, shard_size, meta, m = wanted["num_examples"], wanted["shard_size"], wanted["meta"], wanted["dim"]
    ranges = _shard_ranges(num_examples, shard_size)
    fields = _fingerprint_fields(wanted)
    fingerprint = artifacts.digest(fields)
    os.makedirs(os.path.join(path, SHARDS_DIR), exist_ok=True)
    with _build_lock(path):
        _remove_temporaries(path)
        try:
            manifest = _read_manifest(path)
        except artifacts.CorruptJSONError as error:  # e.g. emptied by a disk problem: rebuild it
            warnings.warn(f"gradient index {os.path.abspath(path)}: {error}; rewriting it (only shards whose "
                          "checksums are still recorded are kept)", IndexRepairWarning, stacklevel=2)
            manifest = None
        if manifest is not None:
            diff = _mismatches(manifest, wanted)
            if diff:
                raise IndexMismatchError(os.path.abspath(path), diff)
            created = manifest.get("created_utc")
        else:
            created = _now()
        try:  # what made the shards on disk, even when the manifest was deleted
            artifacts.check_fingerprint(path, fields, what="gradient index")
        except artifacts.FingerprintMismatchError as error:
            raise IndexMismatchError(os.path.abspath(path), error.fields) from None
        ids_file = os.path.join(path, EXAMPLE_IDS)
        if not (os.path.exists(ids_file) and _read_bytes(ids_file) == ids_bytes):
            atomic_write_bytes(ids_file, ids_bytes)
        if manifest is None:
            _write_manifest(path, {**wanted, "complete": False, "shards": [], "created_utc": created})

        todo, bad = [], {}
        for i, (start, stop) in enumerate(ranges):
            problem = _shard_problem(path, i, stop - start, m, dtype, manifest, fingerprint)
            if problem is None:
                continue
            if problem:
                bad.setdefault(problem, []).append(_shard_name(i))
                os.remove(os.path.join(path, _shard_name(i)))
            todo.append(i)
        if bad:
            listed = "; ".join(f"{', '.join(files[:8])}{f' and {len(files) - 8} more' if len(files) > 8 else ''}: "
                               f"{problem}" for problem, files in bad.items())
            warnings.warn(f"gradient index {os.path.abspath(path)}: recomputing {sum(map(len, bad.values()))} "
                          f"shard(s) that cannot be reused: {listed}", IndexRepairWarning, stacklevel=2)
        complete = manifest is not None and manifest.get("complete") and not todo
        if complete:
            shutil.rmtree(os.path.join(path, PENDING_DIR), ignore_errors=True)
            return GradientIndex(path, manifest, _verified=range(len(ranges)))
        if manifest is not None and manifest.get("complete"):
            # Record the still-good shards' checksums as pending, so that a build killed while
            # repairing keeps them, then mark the index incomplete until the repair is done.
            for shard in manifest["shards"]:
                i = int(shard["file"][len(SHARDS_DIR) + 1:-4])
                if i not in todo:
                    artifacts.atomic_write_json(_pending_file(path, i), {"sha256": shard["sha256"],
                                                                         "fingerprint": fingerprint})
            _write_manifest(path, {**wanted, "complete": False, "shards": [], "created_utc": created})
        bar = tqdm(todo, desc=f"index {os.path.basename(os.path.abspath(path))}", unit="shard", disable=not progress)
        for i in bar:
            start, stop = ranges[i]
            features = np.asarray(features_fn(np.arange(start, stop, dtype=np.int64)))
            if features.shape != (stop - start, m):
                raise ValueError(f"features_fn returned shape {features.shape} for examples [{start}, {stop}); "
                                 f"expected ({stop - start}, {m}) with m = meta['m']")
            if not np.all(np.isfinite(features)):
                bad = start + int(np.nonzero(~np.all(np.isfinite(features), axis=1))[0][0])
                raise ValueError(f"features_fn returned non-finite values (first at example {bad}); "
                                 "nothing was written for that shard")
            data = _npy_bytes(_encode_checked(features, dtype, start))
            # The checksum first, then the shard: a whole shard on disk always has its checksum.
            artifacts.atomic_write_json(_pending_file(path, i), {"sha256": hashlib.sha256(data).hexdigest(),
                                                                 "fingerprint": fingerprint})
            atomic_write_bytes(os.path.join(path, _shard_name(i)), data)
        shards = []
        for i, (start, stop) in enumerate(ranges):
            digest = file_sha256(os.path.join(path, _shard_name(i)))
            expected, _ = _trusted_sha256(path, i, None, fingerprint)
            if digest != expected:
                raise CorruptArtifactError(os.path.join(path, _shard_name(i)),
                                           f"shard {_shard_name(i)} of {os.path.abspath(path)} changed while the "
                                           "index was being built; rerun build_index to recompute it")
            shards.append({"file": _shard_name(i), "start": start, "stop": stop, "sha256": digest})
        final = {**wanted, "complete": True, "shards": shards, "created_utc": created, "completed_utc": _now()}
        _write_manifest(path, final)
        shutil.rmtree(os.path.join(path, PENDING_DIR), ignore_errors=True)
    return GradientIndex(path, final, _verified=range(len(ranges)))


# ----------------------------------------------------------------------------------------------
# Features: sketched per-example gradients
# ----------------------------------------------------------------------------------------------

def sketched_features_fn(
    sketch: Sketch,
    state: SketchState,
    per_example_loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    arrays: PyTree,
    *,
    chunk_size: int | None = None,
    mode: str = "explicit",
    out_dtype: str | None = "float32",
) -> FeaturesFn:
    """features_fn(indices) = [Φ ∇θ ℓ(z_i, θ)]_{i ∈ indices}, shape (len(indices), m).

    z_i is the example `jax.tree_util.tree_map(lambda a: a[i], arrays)`; ℓ(z, θ) =
    sum(per_example_loss_fn(params, batch_of_one(z))), so either a per-example loss returning (1,)
    or a mean loss returning a scalar can be passed. The gradients are sketched by
    `sketching.sketch_per_example_gradients` (`mode` explicit/implicit; `chunk_size` bounds memory
    by processing that many examples at a time), jitted once per distinct number of indices.
    out_dtype: "float32" (the index's storage precision) or None to keep the compute dtype
    (float64 under x64 with float64 params, for tests).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed values: {list(MODES)}")
    if out_dtype not in ("float32", "float64", None):
        raise ValueError(f"out_dtype={out_dtype!r}; allowed values: ['float32', 'float64', None]")
    leaves = jax.tree_util.tree_leaves(arrays)
    if not leaves:
        raise ValueError("arrays has no array leaves")
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every array in `arrays` needs the same leading (example) axis, got sizes {sorted(sizes)}")
    num_examples = sizes.pop()
    host_arrays = jax.tree_util.tree_map(np.asarray, arrays)

    def loss_one(p, batch):
        return jnp.sum(per_example_loss_fn(p, batch))

    @jax.jit
    def compute(sketch_state, p, batch):
        return sketch_per_example_gradients(sketch, sketch_state, loss_one, p, batch, mode=mode, chunk_size=chunk_size)

    def features_fn(indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
            raise ValueError(f"indices must lie in [0, {num_examples}), got range [{idx.min()}, {idx.max()}]")
        batch = jax.tree_util.tree_map(lambda a: a[idx], host_arrays)
        out = np.asarray(compute(state, params, batch))
        return out if out_dtype is None else out.astype(out_dtype)

    features_fn.num_examples = num_examples
    return features_fn


# ----------------------------------------------------------------------------------------------
# Streaming top-k retrieval
# ----------------------------------------------------------------------------------------------

def _array_blocks(array: np.ndarray, block_size: int | None) -> Iterator[tuple[int, np.ndarray]]:
    step = DEFAULT_ARRAY_BLOCK if block_size is None else block_size
    for start in range(0, array.shape[0], step):
        yield start, np.asarray(array[start:start + step])


def _aligned_tiles(blocks: Iterator[tuple[int, np.ndarray]], tile: int) -> Iterator[tuple[int, np.ndarray]]:
    """Re-cuts a stream of consecutive row blocks (any sizes) into tiles of `tile` rows that start at
    multiples of `tile` (the last may be shorter): the tiles are the same whatever the blocking."""
    pending: list[np.ndarray] = []
    count, tile_start = 0, 0
    for _, rows in blocks:
        offset = 0
        while offset < rows.shape[0]:
            take = min(tile - count, rows.shape[0] - offset)
            pending.append(rows[offset:offset + take])
            offset += take
            count += take
            if count == tile:
                yield tile_start, pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, count = [], 0
                tile_start += tile
    if pending:
        yield tile_start, np.concatenate(pending)


def score_tile_rows(num_rows: int, dim: int) -> int:
    """Rows per `top_k` tile: min(N, clip(TILE_ELEMENTS // m, 16, 65536)). A function of (N, m) only,
    never of the block or shard size, so every layout of the same rows is cut into the same tiles."""
    return int(min(num_rows, max(16, min(65536, TILE_ELEMENTS // max(dim, 1)))))


def _tile_products(q: np.ndarray, rows: np.ndarray, tile: int) -> np.ndarray:
    """q @ rowsᵀ computed as one (Q, m) × (m, tile) product (rows zero-padded to `tile`): every
    product call has the same shapes, so entry (i, j) is the same float whatever the blocking of
    the stream (a fixed-order reduction over m for each (query, row) pair)."""
    b = rows.shape[0]
    if b < tile:
        padded = np.zeros((tile, rows.shape[1]), rows.dtype)
        padded[:b] = rows
        rows = padded
    return (q @ rows.T)[:, :b]


def _block_candidates(scores: np.ndarray, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the min(k, b) columns of a (Q, b) score block that come first in the order
    (−score, column), as (scores, row indices start + column). O(Q·b) (a partition) instead of a
    sort: all scores above the row's k-th largest value t, then the leftmost ones equal to t."""
    num_q, b = scores.shape
    if b <= k:
        return scores, np.broadcast_to(np.arange(start, start + b, dtype=np.int64), scores.shape)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
    greater = scores > kth
    equal = scores == kth
    need = k - greater.sum(axis=1, keepdims=True)
    keep = greater | (equal & (np.cumsum(equal, axis=1) <= need))  # exactly k per row
    columns = np.nonzero(keep)[1].reshape(num_q, k)
    return np.take_along_axis(scores, columns, axis=1), columns.astype(np.int64) + start


def _merge_top_k(best_s, best_i, scores, indices, k):
    """The k best of the union of (best_s, best_i) and (scores, indices), per row: larger score first,
    ties by the lower index (a lexicographic sort on (-score, index))."""
    all_s = np.concatenate([best_s, scores], axis=1)
    all_i = np.concatenate([best_i, indices], axis=1)
    order = np.lexsort((all_i, -all_s), axis=-1)[:, :k]
    return np.take_along_axis(all_s, order, axis=1), np.take_along_axis(all_i, order, axis=1)


def top_k(
    index_or_array: GradientIndex | np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    score: str | ScoreFn = "dot",
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k highest-scoring training rows for every query: (scores (Q, k), indices (Q, k)), each row
    sorted by decreasing score, ties by lower row index (equal to a stable brute-force sort).

    score="dot": s(q, t) = ⟨q, t⟩ (the sketched gradient-similarity score ⟨Φg_z, Φg_x⟩);
    score="cosine": ⟨q, t⟩ / (‖q‖ ‖t‖), defined as 0 when either norm is 0;
    a callable score(q_block (Q, m), t_block (b, m)) -> (Q, b) for any other scorer (e.g. a bilinear
    form ⟨Pq, t⟩ with the queries preconditioned once by P before calling top_k).

    Streams the index (GradientIndex.iter_blocks, default one shard per block) or an (N, m) array
    (or np.memmap; default blocks of 4096 rows); memory is O(Q·(k + block + T) + (block + T)·m) with T
    = `score_tile_rows(N, m)` (T·m ≤ max(TILE_ELEMENTS, 16m)). Scores are computed and returned in float32 for a GradientIndex (whatever its
    storage dtype), and in result_type(float32, array dtype) for arrays (a callable's output is cast
    to that dtype). `indices` are row positions; map them to ids with `index.example_ids[indices]`.

    Determinism: the stream is re-cut into tiles of T rows aligned to global row multiples,
    and "dot"/"cosine" compute every tile with one product of fixed shape, so for given queries the
    result is bit-identical for every `block_size`, shard size and process layout (one index, a
    merged distributed index, or the array of its rows); a callable gets the same aligned tiles.
    Non-finite queries or training rows raise ValueError naming the first one (they would otherwise
    score NaN, or 0 under cosine's zero-norm rule).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if isinstance(score, str):
        if score not in SCORES:
            raise ValueError(f"score={score!r}; allowed values: {list(SCORES)} "
                             "or a callable (q_block, t_block) -> (Q, b)")
    elif not callable(score):
        raise ValueError(f"score must be one of {list(SCORES)} or a callable, got {type(score).__name__}")

    if isinstance(index_or_array, GradientIndex):
        num, dim = index_or_array.num_examples, index_or_array.dim
        compute_dtype = np.dtype(np.float32)
        # Decoded one tile at a time (not a whole shard): memory O(tile · m) and cache-friendly.
        blocks = index_or_array.iter_blocks(block_size if block_size is not None else score_tile_rows(num, dim))
    else:
        array = index_or_array
        if not hasattr(array, "shape") or len(array.shape) != 2:
            raise ValueError(f"index_or_array must be a GradientIndex or a 2-D (N, m) array, got "
                             f"{getattr(array, 'shape', type(array).__name__)}")
        num, dim = int(array.shape[0]), int(array.shape[1])
        compute_dtype = np.result_type(np.float32, array.dtype)
        blocks = _array_blocks(array, block_size)
    if k > num:
        raise ValueError(f"k={k} exceeds the number of indexed examples N={num}")
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must have shape (Q, {dim}) (m of the index), got {q.shape}")
    q = np.ascontiguousarray(q.astype(compute_dtype))
    finite = np.all(np.isfinite(q), axis=1)
    if not finite.all():
        raise ValueError(f"queries hold non-finite values (first in query row {int(np.nonzero(~finite)[0][0])}); "
                         "their scores would be meaningless")
    num_q = q.shape[0]
    if score == "cosine":
        q_norm = np.linalg.norm(q, axis=1)[:, None]

    best_s = np.empty((num_q, 0), q.dtype)
    best_i = np.empty((num_q, 0), np.int64)
    tile = score_tile_rows(num, dim)
    for start, rows in _aligned_tiles(blocks, tile):
        rows = rows.astype(q.dtype, copy=False)
        if score == "dot":
            s = _tile_products(q, rows, tile)
        elif score == "cosine":
            # ⟨q, t⟩ / (‖q‖‖t‖): norms are per row, products per fixed-shape tile, so rows whose
            # inner products are exactly equal (e.g. duplicates) tie exactly in every block layout.
            row_norm = np.linalg.norm(rows, axis=1)
            if not np.all(np.isfinite(row_norm)):  # a non-finite row would score 0 by the zero-norm rule
                finite = np.all(np.isfinite(rows), axis=1)
                if not finite.all():
                    raise ValueError(f"training row {start + int(np.nonzero(~finite)[0][0])} holds non-finite values")
            denominator = q_norm * row_norm[None, :]
            s = np.divide(_tile_products(q, rows, tile), denominator,
                          out=np.zeros((num_q, rows.shape[0]), q.dtype), where=denominator > 0)
        else:
            s = np.asarray(score(q, rows))
            if s.shape != (num_q, rows.shape[0]):
                raise ValueError(f"score callable returned shape {s.shape}; expected (Q, b) = {(num_q, rows.shape[0])}")
            s = s.astype(q.dtype, copy=False)
        if not np.all(np.isfinite(s)):
            # With finite queries a score is non-finite exactly when its row holds a non-finite value
            # (or the product overflows): checked on the (Q, tile) scores, not the (tile, m) rows.
            finite = np.all(np.isfinite(rows), axis=1)
            if not finite.all():
                raise ValueError(f"training row {start + int(np.nonzero(~finite)[0][0])} holds non-finite values")
            if np.isnan(s).any():
                raise ValueError(f"scores of rows [{start}, {start + rows.shape[0]}) contain NaN")
        s, idx = _block_candidates(s, start, k)
        best_s, best_i = _merge_top_k(best_s.astype(s.dtype, copy=False), best_i, s, idx, k)
    return best_s, best_i
