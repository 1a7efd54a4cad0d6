"""Approximate top-k retrieval over a gradient index with FAISS (inner-product metric).

Exact retrieval (`attribution.index.top_k`) scores every stored row: s(q, t) = ⟨q, t⟩ for all N rows,
O(N·m) per query. An inverted-file index ("ivf", Jégou et al. 2011) clusters the rows into `nlist`
cells by k-means on a sample, stores each row in the list of its nearest centroid, and scores a
query only against the rows of the `nprobe` cells whose centroids have the largest inner product with
it: about N·nprobe/nlist products per query. "hnsw" (Malkov & Yashunin 2018) searches a navigable
small-world graph with beam width `ef_search`; "flat" scores everything (exact, for tests).
Both approximate the same ranking as `top_k(score="dot")`; their quality is recall@k against it,

    recall@k = |ANN_k(q) ∩ exact_k(q)| / k, averaged over queries,

which depends on how clustered the rows are (uniformly spread rows need nprobe close to nlist).

    ann = build_ann(index, kind="ivf", nlist=1024, nprobe=16)    # index: GradientIndex or (N, m) array
    scores, rows = ann_top_k(ann, queries, k=10)                 # like attribution.index.top_k

The rows are streamed from the index block by block (`GradientIndex.iter_blocks`) into FAISS, which
holds them in memory (float32, or float16 codes with `storage="fp16"`: 2·N·m bytes). Row numbers are
the index's row positions (map them to ids with `index.example_ids[rows]`). FAISS (`faiss-cpu`) is an
optional dependency, imported only when an ANN index is built.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from attribution.index import GradientIndex

__all__ = ["KINDS", "STORAGES", "AnnIndex", "import_faiss", "build_ann", "ann_top_k"]

KINDS = ("ivf", "hnsw", "flat")
STORAGES = ("float32", "fp16")
INSTALL_HINT = "approximate retrieval needs FAISS: pip install faiss-cpu (or the `ann` extra: pip install -e .[ann])"


def import_faiss():
    """The `faiss` module; ImportError naming `pip install faiss-cpu` when it is not installed."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return faiss


@dataclasses.dataclass
class AnnIndex:
    """A FAISS index over the rows of a gradient index (`build_ann`). `faiss_index` is the FAISS
    object; `nprobe` (ivf) / `ef_search` (hnsw) are the default search parameters."""

    faiss_index: Any
    kind: str
    num_examples: int
    dim: int
    nprobe: int | None = None
    ef_search: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the serialised FAISS index (its in-memory size, approximately)."""
        faiss = import_faiss()
        return int(faiss.serialize_index(self.faiss_index).nbytes)


def _blocks(index_or_array, block_size: int | None) -> Iterator[tuple[int, np.ndarray]]:
    if isinstance(index_or_array, GradientIndex):
        yield from index_or_array.iter_blocks(block_size)
        return
    step = 65536 if block_size is None else block_size
    for start in range(0, index_or_array.shape[0], step):
        yield start, np.asarray(index_or_array[start:start + step])


def _shape(index_or_array) -> tuple[int, int]:
    if isinstance(index_or_array, GradientIndex):
        return index_or_array.num_examples, index_or_array.dim
    shape = getattr(index_or_array, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"index must be a GradientIndex or a 2-D (N, m) array, got "
                         f"{shape if shape is not None else type(index_or_array).__name__}")
    return int(shape[0]), int(shape[1])


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _training_sample(index_or_array, num_rows: int, size: int, block_size: int | None) -> np.ndarray:
    """Every ⌈N / size⌉-th row (an evenly strided sample, so rows stored in order of documents or
    classes are all represented), as float32."""
    stride = max(1, -(-num_rows // size))
    picked = []
    for start, rows in _blocks(index_or_array, block_size):
        first = (-start) % stride
        picked.append(np.asarray(rows[first::stride], np.float32))
    return np.ascontiguousarray(np.concatenate(picked))


def build_ann(index, *, kind: str = "ivf", nlist: int | None = None, nprobe: int = 16, storage: str = "float32",
              train_size: int = 65536, hnsw_m: int = 32, ef_search: int = 128, block_size: int | None = None,
              seed: int = 0) -> AnnIndex:
    """A FAISS inner-product index over every row of `index` (a GradientIndex or an (N, m) array).

    kind="ivf": IVF with `nlist` cells (default ≈ √N, at most N / 39 so k-means has ≥ 39 points per
    centroid), k-means trained on an evenly strided sample of `train_size` rows (seeded by `seed`),
    searched with `nprobe` cells; storage="fp16" keeps the rows as float16 codes (half the memory),
    "float32" exactly. kind="hnsw": an HNSW graph with `hnsw_m` links per node, searched with beam
    `ef_search` (always float32). kind="flat": exhaustive (exact; a reference).
    Rows are added in blocks of `block_size` (default: one shard of the index).
    """
    faiss = import_faiss()
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed values: {list(KINDS)}")
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r}; allowed values: {list(STORAGES)}")
    num_rows, dim = _shape(index)
    nprobe, train_size = _positive("nprobe", nprobe), _positive("train_size", train_size)
    hnsw_m, ef_search = _positive("hnsw_m", hnsw_m), _positive("ef_search", ef_search)
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "ivf":
        if nlist is None:
            nlist = max(1, min(int(round(np.sqrt(num_rows))), num_rows // 39))
        nlist = _positive("nlist", nlist)
        if nlist > num_rows:
            raise ValueError(f"nlist={nlist} exceeds the number of rows N={num_rows}")
        codes = "SQfp16" if storage == "fp16" else "Flat"
        faiss_index = faiss.index_factory(dim, f"IVF{nlist},{codes}", metric)
        sample = _training_sample(index, num_rows, max(train_size, nlist), block_size)
        faiss.extract_index_ivf(faiss_index).cp.seed = int(seed)
        faiss_index.train(sample)
        del sample
        faiss.extract_index_ivf(faiss_index).nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        faiss_index = faiss.IndexHNSWFlat(dim, hnsw_m, metric)
        faiss_index.hnsw.efSearch = ef_search
    else:
        faiss_index = faiss.IndexFlatIP(dim)
    for _, rows in _blocks(index, block_size):
        faiss_index.add(np.ascontiguousarray(rows, np.float32))
    if faiss_index.ntotal != num_rows:
        raise RuntimeError(f"FAISS holds {faiss_index.ntotal} rows after adding the index's {num_rows}")
    return AnnIndex(faiss_index, kind, num_rows, dim, nprobe=min(nprobe, nlist) if kind == "ivf" else None,
                    ef_search=ef_search if kind == "hnsw" else None)


def ann_top_k(ann: AnnIndex, queries: np.ndarray, k: int, *, nprobe: int | None = None,
              ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate `attribution.index.top_k(..., score="dot")`: (scores float32 (Q, k), row indices
    int64 (Q, k)), each row by decreasing inner product. `nprobe` / `ef_search` override the
    index's defaults for this call. When the probed cells hold fewer than k rows, the missing
    entries are index -1 with score -inf."""
    faiss = import_faiss()
    k = _positive("k", k)
    if k > ann.num_examples:
        raise ValueError(f"k={k} exceeds the number of indexed examples N={ann.num_examples}")
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != ann.dim:
        raise ValueError(f"queries must have shape (Q, {ann.dim}) (m of the index), got {q.shape}")
    q = np.ascontiguousarray(q, np.float32)
    if not np.all(np.isfinite(q)):
        raise ValueError("queries hold non-finite values; their scores would be meaningless")
    if ann.kind == "ivf":
        faiss.extract_index_ivf(ann.faiss_index).nprobe = _positive("nprobe", nprobe if nprobe is not None
                                                                    else ann.nprobe)
    elif ann.kind == "hnsw":
        ann.faiss_index.hnsw.efSearch = _positive("ef_search", ef_search if ef_search is not None else ann.ef_search)
    scores, rows = ann.faiss_index.search(q, k)
    scores = np.asarray(scores, np.float32)
    rows = np.asarray(rows, np.int64)
    scores[rows < 0] = -np.inf
    return scores, rows
