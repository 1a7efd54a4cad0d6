"""Building blocks shared by the sketches.

* `random_signs`, `random_normal`: random diagonals B = diag(±1) and G = diag(N(0,1)), regenerated
  from a key (signs come from 32 random bits per uint32 word, so they are cheap to regenerate).
* `fwht`: orthonormal Walsh–Hadamard transform in Sylvester order, applied as a Kronecker product of
  small dense ±1 matrices, H_{ab} = H_a ⊗ H_b, i.e. a few small matmuls.
* `dht`: orthonormal discrete Hartley transform (Re F − Im F)/√n, any length, via the real FFT.
* `haar_orthogonal`: Haar-distributed orthogonal matrix, QR with the sign fix of Mezzadri (2007)
 .
* `kron_apply`: (F_1 ⊗ … ⊗ F_k) x for row-major x, without forming the Kronecker product
 .
* `haar_rows`: the first r rows of a Haar orthogonal b×b matrix (QR of a b×r Gaussian with the sign
  fix), the factors of the paper's QK (eq. 8, App. C.5).
* `factor_permutations`, `permuted_sylvester`: one random permutation per Kronecker factor and the
  Sylvester factors with permuted rows or columns, the paper's H^{π1} / H^{π2} (eq. 6).
* `Mixer`: the orthogonal "pre-conditioner" of AFFD/AFJL (the paper's Table 4 axis HN / FFT / Q).

All matmuls use `precision=HIGHEST`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sketching.layout import next_power_of_two

HIGHEST = jax.lax.Precision.HIGHEST

# Fixed fold_in tags, one per random component: never reuse a key for two components.
TAG_SIGNS = 1
TAG_GAUSSIAN = 2
TAG_PERMUTATION = 3
TAG_SIGNS_2 = 4
TAG_INDICES = 5
TAG_HASH = 6
TAG_MIXER_1 = 100
TAG_MIXER_2 = 150
TAG_KRONECKER = 200
TAG_DENSE_BLOCK = 1000


def component_key(key: jax.Array, tag: int, index: int | None = None) -> jax.Array:
    """Independent key for one random component (and optionally one block/factor of it)."""
    k = jax.random.fold_in(key, tag)
    return k if index is None else jax.random.fold_in(k, index)


def random_signs(key: jax.Array, n: int, dtype) -> jax.Array:
    """n i.i.d. Rademacher signs (±1) of `dtype`, 32 signs per random uint32 word."""
    words = jax.random.bits(key, ((n + 31) // 32,), jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (words[:, None] >> shifts[None, :]) & jnp.uint32(1)
    return (1 - 2 * bits.reshape(-1)[:n].astype(jnp.int32)).astype(dtype)


def random_normal(key: jax.Array, shape, dtype) -> jax.Array:
    return jax.random.normal(key, shape, dtype)


def sylvester(b: int, dtype=np.float32) -> np.ndarray:
    """The unnormalised b×b Sylvester–Hadamard matrix (b a power of two), entries ±1."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {b}")
    h = np.ones((1, 1), dtype)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h


def power_of_two_blocks(n: int, max_block: int) -> tuple[int, ...]:
    """Splits n = 2^k into factors of at most `max_block` (all equal but maybe the last)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"length must be a power of two, got {n}")
    blocks, rest = [], n
    while rest > 1:
        b = min(max_block, rest)
        blocks.append(b)
        rest //= b
    return tuple(blocks) or (1,)


def kron_apply(factors, x: jax.Array) -> jax.Array:
    """(F_1 ⊗ … ⊗ F_k) x with F_i of shape (m_i, n_i) and x of shape (..., Π n_i), row-major.

    With X = x.reshape(n_1, …, n_k) the i-th factor contracts axis i of X ((A ⊗ B) x = (A X Bᵀ).reshape(-1) for row-major X). Leading axes of x are batch axes.
    """
    in_shape = tuple(int(f.shape[1]) for f in factors)
    if x.shape[-1] != math.prod(in_shape):
        raise ValueError(f"kron_apply: vector length {x.shape[-1]} != product of factor columns {in_shape}")
    batch = x.shape[:-1]
    y = x.reshape((-1,) + in_shape)
    # Contract the last axis with the last factor, then rotate the new axis to the front of the
    # factor axes; after k steps the axes are (m_1, …, m_k) in order. Every step is one plain matmul,
    # which keeps XLA's layouts simple under vmap (measured faster than per-axis tensordots).
    for f in reversed(factors):
        y = jnp.matmul(y, f.T, precision=HIGHEST)
        y = jnp.moveaxis(y, -1, 1)
    return y.reshape(batch + (-1,))


def leading_rows(factors, m: int) -> tuple[list, int]:
    """Factors of R_{m'}(F_1 ⊗ … ⊗ F_k), the first m' ≥ m rows of a Kronecker product of square
    factors, with m' = c·t_j the smallest such block of rows: in row-major order row r has digits
    r_i = ⌊r / t_i⌋ mod b_i (t_i = b_{i+1}⋯b_k), so the rows r < c·t_j are exactly those with r_i = 0
    for i < j, r_j < c and any r_{i>j}. Factor i keeps its first ⌈m / t_i⌉ rows (at most b_i).
    Returns (factors, m'); the first m of the m' rows are the first m rows of the product."""
    blocks = [int(f.shape[0]) for f in factors]
    out, kept = [], 1
    for i, f in enumerate(factors):
        trailing = math.prod(blocks[i + 1:])
        rows = min(blocks[i], -(-m // trailing) if kept == 1 else blocks[i])
        out.append(f[:rows])
        kept *= rows
    return out, kept


def _weighted_slab_sum(y: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
    """Σ_a weights[a] · y[..., a, ...] over `axis` (kept with size 1), as a loop that adds one slab at
    a time. Measured on 2 CPU cores for 8 × 2^25 float32: 0.09 s; a dot_general 0.69 s (it first
    transposes the whole tensor), a broadcast multiply + reduce 0.40 s."""
    def slab(a):
        return weights[a] * jax.lax.dynamic_index_in_dim(y, a, axis, keepdims=True)

    return jax.lax.fori_loop(1, y.shape[axis], lambda a, total: total + slab(a), slab(0))


def kron_apply_any_order(factors, x: jax.Array) -> jax.Array:
    """(F_1 ⊗ … ⊗ F_k) x like `kron_apply`, contracting the factors that shrink the tensor most
    first (smallest rows/columns ratio): with rectangular factors of few rows (the leading rows of
    a Kronecker transform, `leading_rows`) the tensor shrinks at once and R_m of the transform costs
    O(n) instead of O(n Σ b_i). Each step is one contraction of one axis, kept in place."""
    in_shape = tuple(int(f.shape[1]) for f in factors)
    if x.shape[-1] != math.prod(in_shape):
        raise ValueError(f"kron_apply: vector length {x.shape[-1]} != product of factor columns {in_shape}")
    batch = x.shape[:-1]
    y = x.reshape((-1,) + in_shape)
    order = sorted(range(len(factors)), key=lambda i: int(factors[i].shape[0]) / int(factors[i].shape[1]))
    for i in order:
        f = factors[i]
        if f.shape[0] == 1:
            y = _weighted_slab_sum(y, f[0], i + 1)
        else:
            y = jnp.moveaxis(jnp.tensordot(y, f, axes=([i + 1], [1]), precision=HIGHEST), -1, i + 1)
    return y.reshape(batch + (-1,))


def haar_rows(key: jax.Array, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
    """The first `rows` rows (shape (rows, cols)) of a Haar-distributed cols×cols orthogonal matrix.

    Paper App. C.5: draw a cols×rows Gaussian G, QR it (Householder, `rows` reflections), multiply Q
    by sign(diag R) (the sign fix of Mezzadri 2007; without it Q[0, 0] = −|g₀|/‖g‖ is always
    negative) and transpose. The columns of Q·diag(sign R) are the first `rows` columns of a Haar
    matrix, so the result has orthonormal rows and the law of Haar rows. O(cols·rows²) work; plain
    JAX ops (no LAPACK, see `haar_orthogonal`), so it runs under vmap over keys.
    """
    if not 1 <= rows <= cols:
        raise ValueError(f"haar_rows needs 1 <= rows <= cols, got rows={rows}, cols={cols}")
    g = jax.random.normal(key, (cols, rows), dtype)
    index = jnp.arange(cols)

    def reflect(k, carry):
        a, us, betas, signs = carry
        x = jnp.where(index >= k, a[:, k], 0)
        alpha = jnp.where(x[k] >= 0, 1, -1).astype(dtype) * jnp.linalg.norm(x)
        u = x + alpha * (index == k).astype(dtype)
        beta = 2 / jnp.maximum(jnp.dot(u, u), jnp.finfo(dtype).tiny)
        a = a - beta * jnp.outer(u, jnp.dot(u, a, precision=HIGHEST))
        signs = signs.at[k].set(jnp.where(-alpha >= 0, 1, -1).astype(dtype))  # sign of R_kk = -alpha
        return a, us.at[k].set(u), betas.at[k].set(beta), signs

    init = (g, jnp.zeros((rows, cols), dtype), jnp.zeros((rows,), dtype), jnp.ones((rows,), dtype))
    _, us, betas, signs = jax.lax.fori_loop(0, rows, reflect, init)

    def accumulate(j, q):  # Q = H_0 H_1 ⋯ H_{r-1} I[:, :r], applied right to left
        k = rows - 1 - j
        u = us[k]
        return q - betas[k] * jnp.outer(u, jnp.dot(u, q, precision=HIGHEST))

    q = jax.lax.fori_loop(0, rows, accumulate, jnp.eye(cols, rows, dtype=dtype))
    return (q * signs[None, :]).T


def factor_permutations(key: jax.Array, blocks: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """One independent uniform permutation of range(b) per Kronecker factor b (int32)."""
    return tuple(
        jax.random.permutation(jax.random.fold_in(key, i), b).astype(jnp.int32) for i, b in enumerate(blocks)
    )


def permuted_sylvester(blocks: tuple[int, ...], perms, axis: str, dtype) -> list[jax.Array]:
    """Unnormalised Sylvester factors H_b with rows (P H_b) or columns (H_b P) permuted by `perms`.

    Kronecker identity: ⊗_i (P_i H_i) = (⊗_i P_i)(⊗_i H_i), so `kron_apply` with these factors applies
    √n·P H_n (axis="rows", the paper's H^{π1}) or √n·H_n P (axis="columns", H^{π2}), P = ⊗_i P_i.
    """
    factors = []
    for b, perm in zip(blocks, perms):
        h = jnp.asarray(sylvester(b), dtype)
        factors.append(jnp.take(h, perm, axis=0 if axis == "rows" else 1))
    return factors


def fwht(x: jax.Array, max_block: int = 16) -> jax.Array:
    """Orthonormal Walsh–Hadamard transform of the last axis (length a power of two).

    H_n = H_{b_1} ⊗ … ⊗ H_{b_r} / √n in Sylvester order; symmetric and involutive (H_n² = I).
    """
    n = x.shape[-1]
    blocks = power_of_two_blocks(n, max_block)
    factors = [jnp.asarray(sylvester(b), x.dtype) for b in blocks]
    return kron_apply(factors, x) * jnp.asarray(1.0 / math.sqrt(n), x.dtype)


def dht(x: jax.Array) -> jax.Array:
    """Orthonormal discrete Hartley transform of the last axis, any length n.

    DHT(x)_k = (Re F_k − Im F_k)/√n with F = unnormalised DFT. Real, symmetric, involutive. Computed
    from the real FFT: F_{n−k} = conj(F_k), so DHT_{n−k} = (Re F_k + Im F_k)/√n.
    """
    n = x.shape[-1]
    f = jnp.fft.rfft(x, axis=-1)
    re, im = jnp.real(f), jnp.imag(f)
    head = re - im                                  # k = 0 .. n//2
    tail = (re + im)[..., 1:n - n // 2][..., ::-1]  # k = n//2+1 .. n-1
    out = jnp.concatenate([head, tail], axis=-1)
    return (out * (1.0 / math.sqrt(n))).astype(x.dtype)


def haar_orthogonal(key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
    """Haar-distributed n×n orthogonal matrix: Q of the QR of a Gaussian G, with the sign fix.

    Q·diag(sign(diag R)) is Haar (Mezzadri 2007). The QR is a Householder QR in
    plain JAX ops (a `fori_loop` of rank-one updates, O(n³)) rather than LAPACK: XLA's CPU runtime
    can wedge when several LAPACK QR calls run in one vmapped program (seen with jax 0.10.2 when
    `init` is vmapped over 128 keys), and sketch states are routinely built under vmap.
    """
    g = jax.random.normal(key, (n, n), dtype)
    rows = jnp.arange(n)

    def step(k, carry):
        a, q, signs = carry
        x = jnp.where(rows >= k, a[:, k], 0)           # column k below the diagonal
        alpha = jnp.where(x[k] >= 0, 1, -1).astype(dtype) * jnp.linalg.norm(x)
        u = x + alpha * (rows == k).astype(dtype)      # Householder vector: H x = -alpha e_k
        beta = 2 / jnp.maximum(jnp.dot(u, u), jnp.finfo(dtype).tiny)
        a = a - beta * jnp.outer(u, jnp.dot(u, a, precision=HIGHEST))
        q = q - beta * jnp.outer(jnp.dot(q, u, precision=HIGHEST), u)
        signs = signs.at[k].set(jnp.where(-alpha >= 0, 1, -1).astype(dtype))  # sign of R_kk = -alpha
        return a, q, signs

    init = (g, jnp.eye(n, dtype=dtype), jnp.ones((n,), dtype))
    _, q, signs = jax.lax.fori_loop(0, n, step, init)
    return q * signs[None, :]


MIXERS = ("hadamard", "hartley", "orthogonal")
PERMUTES = ("none", "rows", "columns")


@dataclasses.dataclass(frozen=True)
class Mixer:
    """An orthogonal transform R^n -> R^n used to flatten ("pre-condition") the input.

    kind: "hadamard" (Walsh–Hadamard, n a power of two; the paper's HN), "hartley" (any n; the
    paper's FFT option) or "orthogonal" (Q_1 ⊗ … ⊗ Q_r with Haar factors of at most `block`
    rows, n a power of two; the paper's Q option).
    permute: "none", "rows" or "columns": with kind="hadamard", every Sylvester factor gets its
    own random row (P H, the paper's H^{π1}) or column (H P, H^{π2}) permutation, drawn in
    `tables`. Ignored by "hartley" (not a Kronecker product) and "orthogonal" (a permuted Haar
    factor is again Haar, so the permutation would not change the law).
    Tables: the Haar factors ("orthogonal") or the per-factor permutations (permuted "hadamard").
    """

    kind: str
    n: int
    block: int = 16
    permute: str = "none"

    def __post_init__(self):
        if self.kind not in MIXERS:
            raise ValueError(f"preconditioner={self.kind!r}; allowed values: {list(MIXERS)}")
        if self.kind != "hartley" and self.n & (self.n - 1):
            raise ValueError(f"preconditioner={self.kind!r} needs a power-of-two length, got {self.n}")
        if self.permute not in PERMUTES:
            raise ValueError(f"permute={self.permute!r}; allowed values: {list(PERMUTES)}")

    @property
    def permuted(self) -> bool:
        return self.kind == "hadamard" and self.permute != "none"

    @staticmethod
    def padded_length(kind: str, size: int) -> int:
        """Smallest admissible n >= size for this kind."""
        if kind == "hartley":
            return int(size)
        return next_power_of_two(size)

    @property
    def blocks(self) -> tuple[int, ...]:
        return power_of_two_blocks(self.n, self.block)

    def tables(self, key: jax.Array, dtype) -> tuple:
        if self.permuted:
            return factor_permutations(key, self.blocks)
        if self.kind != "orthogonal":
            return ()
        return tuple(haar_orthogonal(jax.random.fold_in(key, i), b, dtype) for i, b in enumerate(self.blocks))

    def _permuted_factors(self, tables, dtype):
        return permuted_sylvester(self.blocks, tables, self.permute, dtype)

    def forward(self, tables: tuple, x: jax.Array) -> jax.Array:
        if self.permuted:
            scale = jnp.asarray(1.0 / math.sqrt(self.n), x.dtype)
            return kron_apply(self._permuted_factors(tables, x.dtype), x) * scale
        if self.kind == "hadamard":
            return fwht(x, self.block)
        if self.kind == "hartley":
            return dht(x)
        return kron_apply(tables, x)

    @property
    def kronecker(self) -> bool:
        """A Kronecker product of explicit factors (permuted Hadamard, orthogonal)."""
        return self.permuted or self.kind == "orthogonal"

    def _factors(self, tables, dtype) -> list:
        if self.permuted:
            return self._permuted_factors(tables, dtype)
        return list(tables)

    def forward_rows(self, tables: tuple, x: jax.Array, m: int) -> jax.Array:
        """The first m coordinates of `forward(x)`. For a Kronecker mixer only the factor rows those
        coordinates need are applied (`leading_rows`), smallest first: O(n + m Σ b_i) work instead of
        O(n Σ b_i). (AFFD keeps its full second transform: with this one its compiled temporaries
        grew from 5 to 6 D floats.)"""
        if not self.kronecker:
            return self.forward(tables, x)[..., :m]
        factors, _ = leading_rows(self._factors(tables, x.dtype), m)
        y = kron_apply_any_order(factors, x)[..., :m]
        return y * jnp.asarray(1.0 / math.sqrt(self.n), x.dtype) if self.permuted else y

    def transpose_rows(self, tables: tuple, w: jax.Array, m: int) -> jax.Array:
        """`transpose` of a vector that is zero beyond its first m coordinates, given those m: the
        adjoint of `forward_rows`."""
        if not self.kronecker:
            padded = jnp.zeros(w.shape[:-1] + (self.n,), w.dtype).at[..., :m].set(w)
            return self.transpose(tables, padded)
        factors, kept = leading_rows(self._factors(tables, w.dtype), m)
        v = jnp.zeros(w.shape[:-1] + (kept,), w.dtype).at[..., :m].set(w) if kept > m else w
        u = kron_apply_any_order([f.T for f in factors], v)
        return u * jnp.asarray(1.0 / math.sqrt(self.n), w.dtype) if self.permuted else u

    def transpose(self, tables: tuple, x: jax.Array) -> jax.Array:
        if self.permuted:
            scale = jnp.asarray(1.0 / math.sqrt(self.n), x.dtype)
            return kron_apply([f.T for f in self._permuted_factors(tables, x.dtype)], x) * scale
        if self.kind == "orthogonal":
            return kron_apply(tuple(q.T for q in tables), x)
        return self.forward(tables, x)  # Hadamard and Hartley are symmetric


def default_block() -> int:
    """Largest Hadamard/orthogonal Kronecker factor.

    Accelerators: 1024, the paper's choice ("roughly 1024 columns", Sec. 3; the matmul units want
    large factors). CPU: 64. One FWHT of 2^20 float32 on 2 CPU cores took 4.5 ms (block 16),
    2.6 ms (32), 2.6 ms (64), 4.5 ms (128), 5.8 ms (256), 12.2 ms (1024); 32 and 64 tie and the
    larger one gives the per-factor permutations of AFFD/AFJL more room (64! orders per factor).
    """
    return 64 if jax.default_backend() == "cpu" else 1024


def check_block(block) -> int:
    block = default_block() if block is None else block
    if not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2 (largest Hadamard/orthogonal factor), got {block!r}")
    return block


@dataclasses.dataclass(frozen=True)
class HadamardPlan:
    """Sizes of a sketch over the zero-padded vector of length n = 2^⌈log2 D⌉ (fjl, ffd)."""

    d: int
    n: int
    m: int
    block: int


def hadamard_plan(layout, m, block=None) -> HadamardPlan:
    return HadamardPlan(d=layout.size, n=next_power_of_two(layout.size), m=m, block=check_block(block))
