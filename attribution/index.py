"""On-disk index of sketched per-example gradients, and streaming top-k retrieval (issue 7, "Index").

A training set of N examples becomes an N×m matrix of features, row i = Φ ∇θ ℓ(z_i, θ) (SPEC §4.1:
sketched scores are ŝ(z, x) = ⟨Φg_z, Φg_x⟩), written to a folder:

    PATH/manifest.json        format, meta (sketch, m, sketch_seed, checkpoint, ...), N, m, shard
                              size, storage dtype, example-id digest, completion flag, per-shard sha256
    PATH/example_ids.npy      (N,) int64 or unicode, no pickle
    PATH/shards/00000.npy     rows [0, S): float32 (or reduced-precision storage: bfloat16 bits as
                              uint16, or float16 rows with a per-row power-of-two float32 scale)
    PATH/shards/00001.npy     rows [S, 2S), ...

Every file is written atomically (a temporary `.tmp-*` file in the same folder, fsync, `os.replace`),
so a shard is either absent or whole. `build_index` takes an exclusive `flock` on `PATH/.lock` (the
kernel drops it when the process dies, also under SIGKILL), removes `.tmp-*` leftovers of a killed
build, and computes only the shards that are missing: a rerun after `kill -9` ends with the same bytes
as an uninterrupted build, provided `features_fn` is deterministic (a jitted JAX function on the same
backend and batch shape is). The manifest stores `meta`; a rerun with other meta (another sketch, m,
seed or checkpoint hash), another N, shard size, storage dtype or other example ids raises
`IndexMismatchError` naming every differing field, so vectors from different sketches are never
mixed in one index (SPEC §7.6: record what is needed to regenerate the sketch with each store).

Several processes (`attribution.distributed.build_index_distributed`, issue 9) each build an index
of a contiguous range of shards in PATH/process-PPPP-of-QQQQ/, and process 0 writes one merged
manifest at PATH whose shard entries are relative paths into those folders (plus a `processes`
list); it is read exactly like a single-process index.

Retrieval (`top_k`) streams the index block by block and keeps, per query, the k best (score, row)
pairs seen so far, so memory is O(Q·(k + block)) plus one block of features; it never loads the whole
index (ATTRIBUTION.md §5: "block every n×m product; stream training gradients; … memory-map stores").
Ties are broken by the lower row index, which makes the result equal to a stable brute-force sort.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:  # POSIX advisory locks; released by the kernel when the holder dies (even with SIGKILL).
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

from sketching.base import Sketch, SketchState
from sketching.gradients import MODES, sketch_per_example_gradients

__all__ = [
    "FORMAT", "VERSION", "STORAGE_DTYPES", "SCORES", "REQUIRED_META",
    "params_hash", "IndexMismatchError", "IndexIncompleteError", "GradientIndex",
    "build_index", "sketched_features_fn", "top_k",
]

FORMAT = "gradsketch.gradient_index"
VERSION = 1
MANIFEST = "manifest.json"
EXAMPLE_IDS = "example_ids.npy"
SHARDS_DIR = "shards"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
SCORES = ("dot", "cosine")
REQUIRED_META = ("sketch", "m", "checkpoint")
TIMESTAMP_FIELDS = ("created_utc", "completed_utc")
DEFAULT_ARRAY_BLOCK = 4096

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


def params_hash(params: PyTree) -> str:
    """The checkpoint id: sha256 (hex) over every leaf's path (`jax.tree_util.keystr`), dtype, shape
    and row-major bytes, in `jax.tree_util` order. Equal parameters give equal hashes in any process;
    any change of a value, dtype, shape or parameter name changes it."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params_hash: params has no array leaves")
    for path, leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        header = f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n".encode()
        digest.update(len(header).to_bytes(8, "little"))
        digest.update(header)
        digest.update(array.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes through `.tmp-*` in the same folder, fsync, then `os.replace` (atomic on POSIX)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_npy(path: str, array: np.ndarray) -> None:
    """`np.save(path, array, allow_pickle=False)` through `atomic_write_bytes`."""
    atomic_write_bytes(path, _npy_bytes(array))


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _npy_bytes(array: np.ndarray) -> bytes:
    """The exact bytes `np.save` writes (deterministic: header + row-major data)."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _json_normalise(value: Any, field: str) -> Any:
    """`value` as it reads back from JSON (tuples become lists, numpy scalars plain numbers)."""
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__}")

    try:
        return json.loads(json.dumps(value, sort_keys=True, default=default))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{field} must be JSON-serialisable (str, int, float, bool, None, lists, dicts): {error}")


def _read_manifest(path: str) -> dict | None:
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return None
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a gradient index manifest (format={manifest.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{file} has version {manifest.get('version')!r}; this code reads version {VERSION}")
    return manifest


def _write_manifest(path: str, manifest: dict) -> None:
    atomic_write_bytes(os.path.join(path, MANIFEST),
                        (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _shard_name(i: int) -> str:
    return f"{SHARDS_DIR}/{i:05d}.npy"


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
        return np.asarray(stored["row"], np.float32) * np.asarray(stored["scale"], np.float32)[:, None]
    return np.array(stored, dtype=np.float32, copy=True)


@contextlib.contextmanager
def _build_lock(path: str):
    """Exclusive, non-blocking `flock` on PATH/.lock for the duration of a build."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process is building the index at {path} (it holds {LOCK}); "
                               "wait for it to finish or end it, then rerun") from None
        yield
    finally:
        os.close(fd)


def _remove_temporaries(path: str) -> list[str]:
    """Deletes the `.tmp-*` files a killed build left behind (safe: we hold the build lock)."""
    removed = []
    for folder in (path, os.path.join(path, SHARDS_DIR)):
        for tmp in glob.glob(os.path.join(folder, TMP_PREFIX + "*")):
            os.remove(tmp)
            removed.append(tmp)
    return removed


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
    """

    def __init__(self, path: str, manifest: dict):
        self.path = os.path.abspath(path)
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.num_examples: int = int(manifest["num_examples"])
        self.dim: int = int(manifest["dim"])
        self.shard_size: int = int(manifest["shard_size"])
        self.dtype: str = manifest["dtype"]
        self.shards: list[dict] = manifest["shards"]
        self.num_shards = len(self.shards)
        self._example_ids: np.ndarray | None = None
        self.shards_loaded = 0  # how many shard files iter_blocks has opened (for memory accounting)

    @classmethod
    def open(cls, path: str) -> "GradientIndex":
        """Opens a complete index; FileNotFoundError if there is none at `path`, IndexIncompleteError
        if its build has not finished or a shard file is missing."""
        manifest = _read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no gradient index at {path} ({MANIFEST} is missing); build it with build_index")
        if not manifest.get("complete"):
            done = len(glob.glob(os.path.join(path, SHARDS_DIR, "[0-9]*.npy")))
            raise IndexIncompleteError(
                f"the index at {path} is incomplete ({done} of {manifest['num_shards']} shards written); "
                "rerun build_index with the same arguments to resume it"
            )
        missing = [s["file"] for s in manifest["shards"] if not os.path.exists(os.path.join(path, s["file"]))]
        if missing:
            raise IndexIncompleteError(f"the index at {path} lacks shard files {missing[:5]}"
                                       f"{' ...' if len(missing) > 5 else ''}; rerun build_index to rewrite them")
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"GradientIndex({self.path!r}, N={self.num_examples}, m={self.dim}, shards={self.num_shards}, "
                f"dtype={self.dtype}, sketch={self.meta.get('sketch')!r})")

    @property
    def example_ids(self) -> np.ndarray:
        if self._example_ids is None:
            self._example_ids = np.load(os.path.join(self.path, EXAMPLE_IDS), allow_pickle=False)
        return self._example_ids

    @property
    def nbytes(self) -> int:
        """Bytes of all shard files on disk (the index size)."""
        return sum(os.path.getsize(os.path.join(self.path, s["file"])) for s in self.shards)

    def _load_shard(self, i: int) -> np.ndarray:
        """Shard i memory-mapped read-only (no copy until rows are sliced out)."""
        self.shards_loaded += 1
        shard = self.shards[i]
        array = np.load(os.path.join(self.path, shard["file"]), mmap_mode="r", allow_pickle=False)
        shape, dtype = _shard_layout(self.dtype, shard["stop"] - shard["start"], self.dim)
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"shard {shard['file']} of {self.path} has shape {array.shape} dtype {array.dtype}, "
                             f"expected {shape} {dtype}")
        return array

    def iter_blocks(self, block_size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (start, rows) with rows a float32 (b, m) copy of rows [start, start + b), in order.

        block_size=None yields one block per shard; otherwise blocks of `block_size` rows (the last
        may be shorter), assembled across shard boundaries. At most one shard is memory-mapped at a
        time, and only the rows of the current block are copied into memory.
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
        """Recomputes every shard's sha256 and compares it with the manifest; ValueError on a mismatch."""
        for shard in self.shards:
            digest = hashlib.sha256(_read_bytes(os.path.join(self.path, shard["file"]))).hexdigest()
            if digest != shard["sha256"]:
                raise ValueError(f"shard {shard['file']} of {self.path} is corrupt: sha256 {digest} != "
                                 f"{shard['sha256']} in the manifest")


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


def _existing_shard_ok(file: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """True when `file` is a readable .npy of the expected shape and dtype (its header is checked)."""
    if not os.path.exists(file):
        return False
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    return array.shape == shape and array.dtype == dtype


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
    see `_shard_layout`; rows are read back as float32). example_ids: (N,) unique ints or strings,
    default arange(N).

    An existing complete index with the same settings is reopened without recomputing; an
    interrupted one is resumed (only missing shards are computed); one with other settings raises
    IndexMismatchError. Non-finite features raise ValueError (nothing is written for that shard).
    """
    from tqdm.auto import tqdm

    wanted, ids_bytes = _wanted_manifest(num_examples, meta, shard_size, dtype, example_ids)
    num_examples, shard_size, meta, m = wanted["num_examples"], wanted["shard_size"], wanted["meta"], wanted["dim"]
    ranges = _shard_ranges(num_examples, shard_size)
    os.makedirs(os.path.join(path, SHARDS_DIR), exist_ok=True)
    with _build_lock(path):
        _remove_temporaries(path)
        manifest = _read_manifest(path)
        if manifest is not None:
            diff = _mismatches(manifest, wanted)
            if diff:
                raise IndexMismatchError(os.path.abspath(path), diff)
            created = manifest.get("created_utc")
        else:
            created = _now()
        ids_file = os.path.join(path, EXAMPLE_IDS)
        if not (os.path.exists(ids_file) and _read_bytes(ids_file) == ids_bytes):
            atomic_write_bytes(ids_file, ids_bytes)
        if manifest is None:
            _write_manifest(path, {**wanted, "complete": False, "shards": [], "created_utc": created})

        todo = [i for i, (start, stop) in enumerate(ranges)
                if not _existing_shard_ok(os.path.join(path, _shard_name(i)), *_shard_layout(dtype, stop - start, m))]
        complete = manifest is not None and manifest.get("complete") and not todo
        if complete:
            return GradientIndex(path, manifest)
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
            atomic_write_npy(os.path.join(path, _shard_name(i)), _encode(features, dtype))
        shards = []
        for i, (start, stop) in enumerate(ranges):
            digest = hashlib.sha256(_read_bytes(os.path.join(path, _shard_name(i)))).hexdigest()
            shards.append({"file": _shard_name(i), "start": start, "stop": stop, "sha256": digest})
        final = {**wanted, "complete": True, "shards": shards, "created_utc": created, "completed_utc": _now()}
        _write_manifest(path, final)
    return GradientIndex(path, final)


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
    """features_fn(indices) = [Φ ∇θ ℓ(z_i, θ)]_{i ∈ indices}, shape (len(indices), m) (SPEC §4.1).

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

    score="dot": s(q, t) = ⟨q, t⟩ (the sketched gradient-similarity score ⟨Φg_z, Φg_x⟩, SPEC §4.1);
    score="cosine": ⟨q, t⟩ / (‖q‖ ‖t‖), defined as 0 when either norm is 0;
    a callable score(q_block (Q, m), t_block (b, m)) -> (Q, b) for any other scorer (e.g. a bilinear
    form ⟨Pq, t⟩ with the queries preconditioned once by P before calling top_k).

    Streams the index (GradientIndex.iter_blocks, default one shard per block) or an (N, m) array
    (or np.memmap; default blocks of 4096 rows); memory is O(Q·(k + block) + block·m). Scores are
    computed and returned in float32 for a GradientIndex (whatever its storage dtype), and in
    result_type(float32, array dtype) for arrays (a callable's output is cast to that dtype).
    `indices` are row positions; map them to ids with `index.example_ids[indices]`.
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
        blocks = index_or_array.iter_blocks(block_size)
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
    q = q.astype(compute_dtype)
    num_q = q.shape[0]
    if score == "cosine":
        q_norm = np.linalg.norm(q, axis=1)[:, None]

    best_s = np.empty((num_q, 0), q.dtype)
    best_i = np.empty((num_q, 0), np.int64)
    for start, rows in blocks:
        rows = rows.astype(q.dtype, copy=False)
        if score == "dot":
            s = q @ rows.T
        elif score == "cosine":
            # ⟨q, t⟩ / (‖q‖‖t‖): only the matmul depends on the blocking, so rows whose inner
            # products are exactly equal (e.g. duplicates) tie exactly in every block layout.
            denominator = q_norm * np.linalg.norm(rows, axis=1)[None, :]
            s = np.divide(q @ rows.T, denominator, out=np.zeros((num_q, rows.shape[0]), q.dtype),
                          where=denominator > 0)
        else:
            s = np.asarray(score(q, rows))
            if s.shape != (num_q, rows.shape[0]):
                raise ValueError(f"score callable returned shape {s.shape}; expected (Q, b) = {(num_q, rows.shape[0])}")
            s = s.astype(q.dtype, copy=False)
        if np.isnan(s).any():
            raise ValueError(f"scores of rows [{start}, {start + rows.shape[0]}) contain NaN")
        s, idx = _block_candidates(s, start, k)
        best_s, best_i = _merge_top_k(best_s.astype(s.dtype, copy=False), best_i, s, idx, k)
    return best_s, best_i
