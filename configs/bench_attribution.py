"""Attribution benchmark: EK-FAC fit + scoring, index build throughput, exact and approximate top-k.

Four sections, each timed within one run (see experiments/bench_attribution.py for the protocol):
`ekfac` (EK-FAC fit + pairwise scores on 10^4 digit images, MLP 64-64-10, vs kronfluence's figure
measured on the project machine), `index_build` (sequences/s of building a gradient index of MiniLM
with afjl / qk at m = 4096, and the overhead vs plain per-example gradients), `top_k` (exact
streaming top-k over 10^6 stored rows of m = 1024) and `ann` (FAISS inner-product retrieval over the
same rows: recall@k vs exact and speed-up; skipped with a note when faiss is not installed).

    python -m experiments.run --config configs/bench_attribution.py:quick --workdir runs/bench_attribution_quick
    python -m experiments.run --config configs/bench_attribution.py --workdir runs/bench_attribution
    python -m experiments.run --config configs/bench_attribution.py:quick --workdir runs/ba \\
        "--config.sections=('ekfac',)" --config.ekfac.num_train=2000

Presets: "" (default) = the sizes of the targets (10^4 digits, MiniLM at m = 4096, 10^6 rows:
2 GB of float16 shards written under the workdir); "quick" = the same sections with 10^5 rows,
fewer MiniLM sequences and the digits at full size.
"""
from __future__ import annotations

import ml_collections

# One line per preset for `python -m experiments.run --list` (times: 2 CPU cores, shared).
PRESETS = {
    "": "EK-FAC on 10^4 digits, MiniLM index build at m = 4096, top-k and FAISS over 10^6 rows × 1024 (≈ 3.5 min; 2 GB on disk, 5 GB RAM)",
    "quick": "the same sections, 10^5 rows × 1024, 16 MiniLM sequences (≈ 1 min)",
}

SECTIONS = ("ekfac", "index_build", "top_k", "ann")

# kronfluence's fit + pairwise scoring of 10,000 digits images with an MLP 64-64-10, measured once on
# this project's 2-core CPU machine (kronfluence is not a dependency; the number is quoted).
KRONFLUENCE_DIGITS_S = 32.5


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or ""
    if preset not in PRESETS:
        raise ValueError(f"configs/bench_attribution.py preset={preset!r}; allowed values: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.experiment = "bench_attribution"
    config.preset = preset
    config.seed = 0
    config.sections = SECTIONS

    # EK-FAC: fit (two passes over the training set) + scores of every training example against
    # `num_queries` test digits, as kronfluence's pairwise scores.
    config.ekfac = ml_collections.ConfigDict()
    config.ekfac.num_train = 10_000          # digits' training split repeated with shifts + noise
    config.ekfac.num_queries = 100           # test digits (unaugmented)
    config.ekfac.hidden = (64, 64)           # 64 inputs (8×8) → 64 → 64 → 10
    config.ekfac.noise = 0.05                # std of the Gaussian pixel noise of the copies (pixels in [0, 1])
    config.ekfac.max_shift = 1               # copies are shifted by up to this many pixels in x and y
    config.ekfac.batch_size = 1000           # fit and scoring batches (divides num_train: no ragged batch)
    config.ekfac.ragged_batch_size = 768     # a second fit with this batch size counts recompilations
    config.ekfac.labels = "sampled"          # fit_ekfac labels: sampled | exact | data
    config.ekfac.train_steps = 300           # Adam steps before attribution (not timed)
    config.ekfac.train_batch_size = 128
    config.ekfac.learning_rate = 3e-3
    config.ekfac.reference_s = KRONFLUENCE_DIGITS_S
    config.ekfac.target_speedup = 3.0

    # Index build: per-example gradients of all-MiniLM-L6-v2 (+ a 2-class head) on short sentences.
    config.index_build = ml_collections.ConfigDict()
    config.index_build.model = "minilm"      # minilm | transformer (a small random one, for tests)
    config.index_build.transformer = ml_collections.ConfigDict(
        {"num_layers": 1, "d_model": 32, "num_heads": 2, "mlp_ratio": 2})
    config.index_build.seq_len = 32
    config.index_build.batch_size = 8
    config.index_build.num_sequences = 32    # rows of each timed index build
    config.index_build.sketches = ("afjl", "qk")
    config.index_build.m = 4096
    config.index_build.mode = "explicit"     # sketching mode: explicit | implicit
    config.index_build.warmup = 1
    config.index_build.repeats = 3
    config.index_build.target_overhead = 1.25

    # Exact top-k over synthetic rows written through build_index.
    config.top_k = ml_collections.ConfigDict()
    config.top_k.num_rows = 1_000_000
    config.top_k.m = 1024
    config.top_k.num_queries = 64
    config.top_k.k = 10
    config.top_k.dtype = "float16"           # index storage: float32 | float16 | bfloat16
    config.top_k.shard_size = 65536
    config.top_k.distribution = "clustered"  # clustered | gaussian (rows and queries)
    config.top_k.num_clusters = 1024
    config.top_k.cluster_noise = 0.5         # per-row noise norm relative to the centre norm
    config.top_k.repeats = 2                 # timed steady-state calls (after one untimed)
    config.top_k.target_s = 10.0

    # Approximate top-k (FAISS) over the same rows.
    config.ann = ml_collections.ConfigDict()
    config.ann.kind = "ivf"                  # ivf | hnsw | flat
    config.ann.nlist = 1024
    config.ann.nprobe = 16
    config.ann.storage = "fp16"              # float32 | fp16 (the IVF lists' vectors)
    config.ann.train_size = 65536
    config.ann.hnsw_m = 32
    config.ann.ef_search = 128
    config.ann.target_recall = 0.95

    if preset == "quick":
        config.index_build.num_sequences = 16
        config.top_k.num_rows = 100_000
        config.top_k.shard_size = 16384
        config.ann.nlist = 256
        config.ann.nprobe = 8
        config.ann.train_size = 32768
    return config
