"""Lanczos and Arnoldi over PyTrees, with an optional sketched Krylov basis (LANDSCAPE.md §2, SPEC §4.2).

One Krylov driver serves both methods. Starting from a unit vector v_1, step j computes w = A v_j and
orthogonalises it against the whole basis by classical Gram–Schmidt applied twice ("twice is enough",
LANDSCAPE §2.1; matfree's `reortho="full"` does the same):

    h  = Vᵀw;  w ← w − V h;   h' = Vᵀw;  w ← w − V h';   H[:, j] = h + h';  β_j = ‖w‖;  v_{j+1} = w / β_j

H is the (k+1) × k upper-Hessenberg matrix of Arnoldi, A V_k = V_{k+1} H. For a symmetric A it is, up
to rounding, the Lanczos tridiagonal T_k = tridiag(α; β) with α_j = H[j, j] and β_j = H[j+1, j]
(Lanczos with full re-orthogonalisation *is* Arnoldi on a symmetric operator, §2.5). `lanczos` keeps
the tridiagonal band of H and checks that the discarded part is at rounding level (a cheap test that
the operator is symmetric); `arnoldi` symmetrises the square block, 0.5 (H + Hᵀ), as jax-influence's
`distill` does, and also exposes the raw Hessenberg matrix for non-symmetric operators.

Ritz pairs: T_k = S diag(θ) Sᵀ (float64 `eigh`), Ritz vectors y_i = V_k s_i, and the residual
certificate ‖A y_i − θ_i y_i‖ = β_k |S[k−1, i]| (exact when the basis is orthonormal, §2.1).

Precision (LANDSCAPE §1, project rule): the matvec runs in the model dtype; the basis and the dot
products are float64 when x64 is enabled (float32 with HIGHEST-precision matmuls otherwise); H, T and
`eigh` are float64 NumPy on the host.

Breakdown (§2.3): β_j ≤ 64 · eps(matvec dtype) · ‖A‖_est means the Krylov space is invariant; the run
stops there and returns the exact smaller T (no NaN, no division by ~0). num_iters > D raises.

Sketched basis (the paper's memory trick, SPEC §4.2): with `sketch=`, Lanczos runs on the m × m
operator A_Φ = Φ A Φᵀ (u ↦ Φ(A(Φᵀu))), so the Krylov vectors live in R^m. k iterations then hold
D·O(1) numbers (one Φᵀu and one A-product at a time) plus k·m for the basis, instead of k·D. For a
JL-normalised Φ the top eigenvalues of Φ A Φᵀ approximate those of A up to a shift ≈ (tr A − λ)/m and
fluctuations ≈ ‖A‖_F/√m (SPEC §3.5); Ritz vectors come back in sketch space, where gradient alignment
‖U_kᵀ Φ g‖² / ‖Φ g‖² is measured (SPEC §4.2).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from sketching import Sketch
from sketching.layout import Layout

PyTree = Any
Matvec = Callable[[PyTree], PyTree]
START_DISTRIBUTIONS = ("rademacher", "gaussian")
BREAKDOWN_FACTOR = 64.0  # tol_break = 64 · eps · ‖A‖ (CuPy PR #10098, LANDSCAPE §2.3)

_HIGHEST = jax.lax.Precision.HIGHEST


def basis_dtype() -> np.dtype:
    """float64 when x64 is enabled (the project rule for Krylov arithmetic), else float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def basis_precision(array) -> Any:
    """A context in which arithmetic on `array` keeps its dtype: x64 on for float64 Krylov vectors (the
    result may be used after the `jax.enable_x64` block that produced it)."""
    return jax.enable_x64(True) if np.dtype(array.dtype) == np.float64 else contextlib.nullcontext()


def _default_symmetry_tol(matvec_dtype: np.dtype) -> float:
    """Relative size of the non-tridiagonal part of H above which the operator is called non-symmetric.

    Rounding keeps it near eps · num_iters; a non-symmetric operator makes it O(1)."""
    return 1e-6 if np.dtype(matvec_dtype) == np.float64 else 1e-2


@dataclasses.dataclass(frozen=True)
class KrylovResult:
    """Output of `lanczos` / `arnoldi`.

    eigenvalues:       (k,) float64 Ritz values, descending.
    ritz_coefficients: (k, k) float64; column i holds s_i for eigenvalues[i] (y_i = V_k s_i).
    residual_norms:    (k,) float64 certificates ‖A y_i − θ_i y_i‖ = β_k |s_i[k−1]|.
    hessenberg:        (k+1, k) float64, A V_k = V_{k+1} H (raw, before any symmetrisation).
    basis:             (k+1, n) Krylov vectors v_1..v_{k+1} (n = D, or m with a sketch); the last row
                       is zero after a breakdown.
    num_iters:         k, the number of steps actually run (< requested after a breakdown).
    breakdown:         True when the run stopped early on an invariant subspace.
    layout:            how R^D maps to the PyTree (None for a sketched basis).
    sketch, sketch_state: the sketch Φ of a sketched basis (None otherwise).
    """

    eigenvalues: np.ndarray
    ritz_coefficients: np.ndarray
    residual_norms: np.ndarray
    hessenberg: np.ndarray
    basis: jax.Array
    num_iters: int
    breakdown: bool
    layout: Layout | None
    sketch: Sketch | None = None
    sketch_state: Any = None

    @property
    def alphas(self) -> np.ndarray:
        """Diagonal of T (α_1..α_k)."""
        return np.diag(self.hessenberg[: self.num_iters, : self.num_iters]).copy()

    @property
    def betas(self) -> np.ndarray:
        """β_1..β_k (β_k couples v_{k+1}; β_1..β_{k−1} are the off-diagonal of T)."""
        k = self.num_iters
        return np.array([self.hessenberg[j + 1, j] for j in range(k)])

    @property
    def tridiagonal(self) -> np.ndarray:
        """T_k (k × k, float64, symmetric)."""
        return tridiagonal_from_hessenberg(self.hessenberg, self.num_iters)

    @property
    def sketched(self) -> bool:
        return self.sketch is not None

    def ritz_vectors(self, indices=None) -> jax.Array:
        """Flat Ritz vectors y_i = V_k s_i as rows, (len(indices), n); all k by default, in the basis dtype
        (float64 stays float64 even outside an x64 context)."""
        coeffs = self.ritz_coefficients if indices is None else self.ritz_coefficients[:, np.asarray(indices)]
        with basis_precision(self.basis):
            basis = self.basis[: self.num_iters]
            return jnp.matmul(jnp.asarray(coeffs.T, basis.dtype), basis, precision=_HIGHEST)

    @property
    def eigenvectors(self):
        """Ritz vectors in eigenvalue order: a PyTree whose leaves have a leading axis k (full basis)
        or a (k, m) array of unit vectors in sketch space (sketched basis)."""
        vectors = self.ritz_vectors()
        if self.sketched:
            return vectors
        return jax.vmap(self.layout.unflatten)(vectors)

    def top(self, k: int) -> np.ndarray:
        """The k largest Ritz values (descending)."""
        _check_count("k", k, self.num_iters)
        return self.eigenvalues[:k]

    def bottom(self, k: int) -> np.ndarray:
        """The k smallest Ritz values (ascending)."""
        _check_count("k", k, self.num_iters)
        return self.eigenvalues[::-1][:k]


def _check_count(name: str, value, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= upper:
        raise ValueError(f"{name} must be an int in [1, {upper}], got {value!r}")


def tridiagonal_from_hessenberg(hessenberg: np.ndarray, k: int) -> np.ndarray:
    """T_k from the band of H: diag α_j = H[j, j], off-diagonals β_j = H[j+1, j] (the subdiagonal, the
    norm actually used to normalise v_{j+1})."""
    diag = np.diag(hessenberg[:k, :k])
    off = np.array([hessenberg[j + 1, j] for j in range(k - 1)])
    return np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)


def ritz_decomposition(t: np.ndarray, beta_last: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """eigh of the symmetric float64 matrix T → (θ descending, S with matching columns, residuals
    β_k |S[k−1, i]|)."""
    values, vectors = np.linalg.eigh(np.asarray(t, np.float64))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    return values, vectors, np.abs(beta_last) * np.abs(vectors[-1, :])


# ----------------------------------------------------------------------------------------------
# The Krylov driver on flat vectors
# ----------------------------------------------------------------------------------------------

@jax.jit
def _orthogonalise_full(basis: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two classical Gram–Schmidt passes against every row of `basis` (unused rows are zero)."""
    h1 = jnp.matmul(basis, w, precision=_HIGHEST)
    w = w - jnp.matmul(h1, basis, precision=_HIGHEST)
    h2 = jnp.matmul(basis, w, precision=_HIGHEST)
    w = w - jnp.matmul(h2, basis, precision=_HIGHEST)
    return w, h1 + h2


@jax.jit
def _orthogonalise_three_term(basis: jax.Array, w: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Plain Lanczos: subtract only the components along v_{j−1} and v_j (no re-orthogonalisation).
    Kept to demonstrate the loss of orthogonality and ghost eigenvalues (LANDSCAPE §2.1, test 5)."""
    rows = jnp.arange(basis.shape[0])
    mask = ((rows == j) | (rows == j - 1)).astype(basis.dtype)
    h = jnp.matmul(basis, w, precision=_HIGHEST) * mask
    return w - jnp.matmul(h, basis, precision=_HIGHEST), h


@functools.partial(jax.jit, donate_argnums=0)  # the basis is updated in place, not copied each step
def _normalise_into(basis: jax.Array, w: jax.Array, norm: jax.Array, row: jax.Array) -> jax.Array:
    return basis.at[row].set(w / norm)


def _norm(x: jax.Array) -> float:
    return float(jnp.sqrt(jnp.dot(x, x, precision=_HIGHEST)))


def _krylov(
    apply_flat: Callable[[jax.Array], jax.Array],
    start: jax.Array,
    num_iters: int,
    matvec_dtype: np.dtype,
    *,
    reorthogonalize: bool,
    progress: bool,
    description: str,
) -> tuple[np.ndarray, jax.Array, int, bool]:
    """Runs up to `num_iters` Arnoldi steps; returns (H (k+1, k) float64, basis (k_max+1, n), k, breakdown)."""
    n = start.shape[0]
    dtype = start.dtype
    basis = jnp.zeros((num_iters + 1, n), dtype)
    start_norm = _norm(start)
    if not np.isfinite(start_norm) or start_norm == 0.0:
        raise ValueError(f"start vector has norm {start_norm}; it must be finite and non-zero")
    basis = _normalise_into(basis, start, jnp.asarray(start_norm, dtype), 0)
    hessenberg = np.zeros((num_iters + 1, num_iters), np.float64)
    eps = float(np.finfo(matvec_dtype).eps)
    operator_scale = 0.0
    steps = tqdm(range(num_iters), desc=description, disable=not progress, leave=False)
    for j in steps:
        w = apply_flat(basis[j]).astype(dtype)
        operator_scale = max(operator_scale, _norm(w))  # ‖A v_j‖ ≤ ‖A‖, a lower bound that grows to it
        if not np.isfinite(operator_scale):
            raise FloatingPointError(f"the matvec returned a non-finite vector at iteration {j}")
        if reorthogonalize:
            w, h = _orthogonalise_full(basis, w)
        else:
            w, h = _orthogonalise_three_term(basis, w, j)
        beta = _norm(w)
        hessenberg[: j + 1, j] = np.asarray(h[: j + 1], np.float64)
        hessenberg[j + 1, j] = beta
        if j + 1 < num_iters and beta <= BREAKDOWN_FACTOR * eps * operator_scale:
            hessenberg[j + 1, j] = 0.0
            return hessenberg[: j + 2, : j + 1], basis, j + 1, True
        if j + 1 < num_iters or beta > 0.0:
            basis = _normalise_into(basis, w, jnp.asarray(beta, dtype), j + 1)
    return hessenberg, basis, num_iters, False


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

def _start_vector(key: jax.Array, n: int, dtype, distribution: str) -> jax.Array:
    if distribution not in START_DISTRIBUTIONS:
        raise ValueError(f"start_distribution={distribution!r}; allowed values: {list(START_DISTRIBUTIONS)}")
    if distribution == "rademacher":
        return jax.random.rademacher(key, (n,), dtype)
    return jax.random.normal(key, (n,), dtype)


def _resolve_sketch(sketch, key: jax.Array, template: PyTree):
    """`sketch` is a Sketch (state drawn from `key`) or a (Sketch, state) pair."""
    if isinstance(sketch, Sketch):
        return sketch, sketch.init(key, template)
    if isinstance(sketch, tuple) and len(sketch) == 2 and isinstance(sketch[0], Sketch):
        return sketch
    raise ValueError(f"sketch must be a sketching.Sketch or a (Sketch, state) pair, got {type(sketch).__name__}")


def cast_to_layout(tree: PyTree, layout: Layout) -> PyTree:
    """Casts each leaf to the template's dtype (tangents of a jvp must match the primal dtypes)."""
    leaves = [leaf.astype(dtype) for leaf, dtype in zip(jax.tree_util.tree_leaves(tree), layout.dtypes)]
    return jax.tree_util.tree_unflatten(layout.treedef, leaves)


def flat_operator(matvec: Matvec, layout: Layout) -> Callable[[jax.Array], jax.Array]:
    """The matvec on R^D: unflatten (cast to the template's leaf dtypes), apply, flatten."""

    to_tree = jax.jit(lambda flat: cast_to_layout(layout.unflatten(flat), layout))
    to_flat = jax.jit(layout.flatten)

    def apply_flat(flat):
        return to_flat(matvec(to_tree(flat)))

    return apply_flat


def sketched_operator(matvec: Matvec, sketch: Sketch, state, layout: Layout) -> Callable[[jax.Array], jax.Array]:
    """u ↦ Φ A Φᵀ u on R^m (one D-sized vector alive at a time)."""
    transpose = jax.jit(lambda u: cast_to_layout(sketch.transpose(state, u), layout))
    apply = jax.jit(lambda tree: sketch.apply(state, tree))

    def apply_sketched(u):
        return apply(matvec(transpose(u)))

    return apply_sketched


def _run(matvec, template, num_iters, key, *, sketch, start, start_distribution, reorthogonalize, progress,
         description):
    layout = Layout.from_template(template)
    if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
        raise ValueError(f"num_iters must be a positive int, got {num_iters!r}")
    dtype = basis_dtype()
    key_start, key_sketch = jax.random.split(key)
    if sketch is None:
        n = layout.size
        apply_flat = flat_operator(matvec, layout)
        sketch_obj = state = None
        if start is not None:
            start = layout.flatten(start)
    else:
        sketch_obj, state = _resolve_sketch(sketch, key_sketch, template)
        n = sketch_obj.m
        apply_flat = sketched_operator(matvec, sketch_obj, state, layout)
        if start is not None:
            start = jnp.asarray(start)
            if start.shape != (n,):
                raise ValueError(f"start has shape {start.shape}; with a sketch it must be ({n},)")
    if num_iters > n:
        where = "the sketch dimension m" if sketch is not None else "the number of parameters D"
        raise ValueError(f"num_iters={num_iters} exceeds {where} = {n}; a Krylov space has at most {n} dimensions")
    if start is None:
        start = _start_vector(key_start, n, dtype, start_distribution)
    hessenberg, basis, k, breakdown = _krylov(
        apply_flat, start.astype(dtype), int(num_iters), layout.compute_dtype,
        reorthogonalize=reorthogonalize, progress=progress, description=description)
    return layout, sketch_obj, state, hessenberg, basis, k, breakdown


def lanczos(
    matvec: Matvec,
    template: PyTree,
    num_iters: int,
    key: jax.Array,
    *,
    sketch: Sketch | tuple | None = None,
    start: PyTree | jax.Array | None = None,
    start_distribution: str = "rademacher",
    reorthogonalize: bool = True,
    symmetry_tol: float | None = -1.0,
    progress: bool = False,
) -> KrylovResult:
    """Lanczos with full re-orthogonalisation on a symmetric operator `matvec(tree) -> tree`.

    template: a PyTree of arrays shaped like the operator's input (e.g. the model parameters).
    key: draws the start vector (Rademacher by default, normalised) and, when `sketch` is a Sketch,
         its state. `start` overrides the random start (a PyTree, or an (m,) array with a sketch).
    sketch: None (Krylov basis in R^D) or a Sketch / (Sketch, state): run on Φ A Φᵀ with the basis in R^m.
    reorthogonalize: False gives plain three-term Lanczos (for demonstrations; not trustworthy for
         eigenvectors, LANDSCAPE §2.4 item 3).
    symmetry_tol: the largest relative non-tridiagonal part of H accepted (−1: a default by dtype,
         None: no check). Exceeding it raises ValueError: the operator is not symmetric.
    Returns a KrylovResult (eigenvalues descending; eigenvectors as a PyTree or in sketch space).
    """
    layout, sketch_obj, state, hessenberg, basis, k, breakdown = _run(
        matvec, template, num_iters, key, sketch=sketch, start=start, start_distribution=start_distribution,
        reorthogonalize=reorthogonalize, progress=progress, description="lanczos")
    if reorthogonalize and symmetry_tol is not None:
        tol = _default_symmetry_tol(layout.compute_dtype) if symmetry_tol == -1.0 else float(symmetry_tol)
        asymmetry = _asymmetry(hessenberg, k)
        if asymmetry > tol:
            raise ValueError(
                f"the operator is not symmetric: the Krylov projection VᵀAV has a non-tridiagonal part of "
                f"relative size {asymmetry:.3g} > symmetry_tol={tol:.3g}; use arnoldi() for non-symmetric operators")
    t = tridiagonal_from_hessenberg(hessenberg, k)
    values, vectors, residuals = ritz_decomposition(t, hessenberg[k, k - 1])
    return KrylovResult(values, vectors, residuals, hessenberg, basis, k, breakdown, None if sketch_obj else layout,
                        sketch_obj, state)


def _asymmetry(hessenberg: np.ndarray, k: int) -> float:
    """max |H_k − T_k| / max |T_k| over the square block, H_k's departure from a symmetric tridiagonal."""
    square = hessenberg[:k, :k]
    t = tridiagonal_from_hessenberg(hessenberg, k)
    scale = max(np.max(np.abs(t)), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(square - t)) / scale)


def arnoldi(
    matvec: Matvec,
    template: PyTree,
    num_iters: int,
    key: jax.Array,
    *,
    sketch: Sketch | tuple | None = None,
    start: PyTree | jax.Array | None = None,
    start_distribution: str = "gaussian",
    progress: bool = False,
) -> KrylovResult:
    """Arnoldi iteration (Schioppa et al. 2022's influence code path; LANDSCAPE §2.5).

    The raw Hessenberg matrix H ((k+1) × k, A V_k = V_{k+1} H) is returned as `.hessenberg` for any
    operator. Ritz pairs come from the symmetrised tridiagonal projection of the square block (zero
    outside the band, then 0.5 (H + Hᵀ)), which is the right object for Hessians and Gauss–Newton
    matrices; for a non-symmetric operator use `np.linalg.eig(result.hessenberg[:k, :k])` instead.
    Start: Gaussian by default, as jax-influence. Other arguments as `lanczos`.
    """
    layout, sketch_obj, state, hessenberg, basis, k, breakdown = _run(
        matvec, template, num_iters, key, sketch=sketch, start=start, start_distribution=start_distribution,
        reorthogonalize=True, progress=progress, description="arnoldi")
    square = hessenberg[:k, :k]
    band = np.triu(np.tril(square, 1), -1)
    symmetric = 0.5 * (band + band.T)
    values, vectors, residuals = ritz_decomposition(symmetric, hessenberg[k, k - 1])
    return KrylovResult(values, vectors, residuals, hessenberg, basis, k, breakdown, None if sketch_obj else layout,
                        sketch_obj, state)
