"""The cost of verifying checksums on read, on a 10^6-row gradient index (docs/reliability.md).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python docs/checksum_cost.py

Builds a temporary index of N = 10^6 random float32 rows of m = 128 (488 MiB) under /tmp, then
reports the CPU time (process_time, robust on a loaded machine) of opening it and running one top_k
of 16 queries with and without checksum verification, and of verify() alone; min of 3 runs.
"""
import os
import shutil
import tempfile
import time

import numpy as np

from attribution.index import GradientIndex, build_index, top_k

N, M, Q, K = 1_000_000, 128, 16, 10


def main() -> None:
    folder = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(folder, "index")
    try:
        build_index(path, lambda i: np.random.default_rng(int(i[0])).standard_normal((len(i), M), dtype=np.float32),
                    N, meta={"sketch": "none", "m": M, "checkpoint": "bench"}, shard_size=4096, progress=False)
        queries = np.random.default_rng(0).standard_normal((Q, M), dtype=np.float32)
        cases = {
            "open + top_k, verify_checksums=False": lambda: top_k(GradientIndex.open(path, verify_checksums=False), queries, K),
            "open + top_k, checksums verified (default)": lambda: top_k(GradientIndex.open(path), queries, K),
            "verify() alone (sha256 of every file)": lambda: GradientIndex.open(path).verify(),
        }
        times = {name: [] for name in cases}
        for _ in range(3):
            for name, fn in cases.items():
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
        size = GradientIndex.open(path).nbytes
        print(f"N={N} m={M}: {size / 2 ** 20:.0f} MiB in 244 shards; Q={Q} k={K}; CPU seconds, min of 3")
        for name, values in times.items():
            print(f"  {name}: {min(values):.2f} s")
        print(f"  sha256 throughput: {size / 2 ** 30 / min(times['verify() alone (sha256 of every file)']):.2f} GiB/s")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
