"""The adversarial input suite (Gaussian, spikes, constant, strided, low rank …), unit-normalised, as float32 numpy vectors."""
import numpy as np


def adversarial_suite(d: int, m: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = {}
    xs["gaussian"] = rng.standard_normal(d)
    spike = np.zeros(d)
    spike[d // 3] = 1
    xs["one_hot"] = spike
    xs["constant"] = np.ones(d)
    sparse = np.zeros(d)
    idx = rng.choice(d, 5, replace=False)
    sparse[idx] = rng.standard_normal(5)
    xs["sparse"] = sparse
    block = np.zeros(d)  # "embedding rows": a few contiguous blocks
    block[100:164] = 1.0
    block[d // 2:d // 2 + 64] = -2.0
    xs["block"] = block
    strided = np.zeros(d)
    strided[::m] = 1.0  # the indicator of {i ≡ 0 mod m} (test T4)
    xs["mod_m"] = strided
    half = np.zeros(d)
    half[: d // 2] = 1.0  # Walsh-aligned (Theorem 3.1's x* for D = 2n')
    xs["half"] = half
    side = int(np.sqrt(d))
    a, b = rng.standard_normal(side), rng.standard_normal(d // side)
    xs["rank_one"] = np.concatenate([np.kron(a, b), np.zeros(d - side * (d // side))])
    return {k: (v / np.linalg.norm(v)).astype(np.float32) for k, v in xs.items()}
