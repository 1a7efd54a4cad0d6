"""Lanczos and Arnoldi over PyTrees, with an optional sketched Krylov basis.

One Krylov driver serves both methods. Starting from a unit vector v_1, step j computes w = A v_j and
orthogonalises it against the whole basis by classical Gram–Schmidt applied twice ("twice is enough",
as in Paige 1971 / Parlett's full reorthogonalisation; matfree's `reortho="full"` does the same):

    h  = Vᵀw;  w ← w − V h;   h' = Vᵀw;  w ← w − V h';   H[:, j] = h + h';  β_j = ‖w‖;  v_{j+1} = w / β_j

H is the (k+1) × k upper-Hessenberg matrix of Arnoldi, A V_k = V_{k+1} H. For a symmetric A it is, up
to rounding, the Lanczos tridiagonal T_k = tridiag(α; β) with α_j = H[j, j] and β_j = H[j+1, j]
(Lanczos with full re-orthogonalisation *is* Arnoldi on a symmetric operator, §2.5). `lanczos` keeps
the tridiagonal band of H and checks that the discarded part is at rounding level (a cheap test that
the operator is symmetric); `arnoldi` symmetrises the square block, 0.5 (H + Hᵀ), as jax-influence's
`distill` does, and also exposes the raw Hessenberg matrix for non-symmetric operators.

Ritz pairs: T_k = S diag(θ) Sᵀ (float64 `eigh`), Ritz vectors y_i = V_k s_i, and the residual
certificate ‖A y_i − θ_i y_i‖ = β_k |S[k−1, i]| (exact when the basis is orthonormal, §2.1).

Precision (project rule): the matvec runs in the model dtype; the basis and the dot
products are float64 when x64 is enabled (float32 with HIGHEST-precision matmuls otherwise); H, T and
`eigh` are float64 NumPy on the host.

Breakdown (§2.3): β_j ≤ 64 · eps(matvec dtype) · ‖A‖_est means the Krylov space is invariant; the run
stops there and returns the exact smaller T (no NaN, no division by ~0). num_iters > D raises.

Sketched basis (the paper's memory trick): with `sketch=`, Lanczos runs on the m × m
operator A_Φ = Φ A Φᵀ (u ↦ Φ(A(Φᵀu))), so the Krylov vectors live in R^m. k iterations then hold
D·O(1) numbers (one Φᵀu and one A-product at a time) plus k·m for the basis, instead of k·D. For a
JL-normalised Φ the top eigenvalues of Φ A Φᵀ approximate those of A up to a shift ≈ (tr A − λ)/m and
fluctuations ≈ ‖A‖_F/√m; Ritz vectors come back in sketch space, where gradient alignment
‖U_kᵀ Φ g‖² / ‖Φ g‖² is measured.
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
BREAKDOWN_FACTOR = 64.0  # tol_break = 64 · eps · ‖A‖ (CuPy PR #10098)

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


def check_positive_int(name: str, value) -> int:
    """`value` as an int, or ValueError naming `name` unless it is an int ≥ 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_count(name: str, value, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= upper:
        raise ValueError(f"{name} must be an int in [1, {upper}], got {value!r}")


def tridiagonal_from_hessenberg(hessenberg: np.ndarray, k: int) -> np.ndarray:
    """T_k from the band of H: diag α_j = H[j, j], off-diagonals β_j = H[j+1, j] (the subdiagonal, the
    norm actually used to normalise v_{j+1})."""
    diag = np.diag(hessenberg[:k, :k])
    off = np.array([hessenberg[j + 1, j] for j in range(k - 1)])
    return np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)


def eigh_tridiagonal(diagonal: np.ndarray, off_diagonal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric tridiagonal matrix
    tridiag(off; diagonal; off), float64 LAPACK ?stemr via SciPy: O(k²), and free of the multi-threaded
    BLAS start-up that makes a dense `np.linalg.eigh` of a 60 × 60 matrix cost 0.1 s next to XLA's
    thread pool on a loaded machine."""
    diagonal = np.asarray(diagonal, np.float64)
    off_diagonal = np.asarray(off_diagonal, np.float64)
    if diagonal.size == 1:
        return diagonal.copy(), np.ones((1, 1))
    import scipy.linalg  # a dependency of scikit-learn, always installed with the project

    return scipy.linalg.eigh_tridiagonal(diagonal, off_diagonal)


def ritz_decomposition(t: np.ndarray, beta_last: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """eigh of the symmetric tridiagonal float64 matrix T → (θ descending, S with matching columns,
    residuals β_k |S[k−1, i]|)."""
    t = np.asarray(t, np.float64)
    values, vectors = eigh_tridiagonal(np.diag(t), np.diag(t, 1))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    return values, vectors, np.abs(beta_last) * np.abs(vectors[-1, :])


# ----------------------------------------------------------------------------------------------
# The compiled Krylov driver on flat vectors
# ----------------------------------------------------------------------------------------------

EXACT_ROWS_FROM = 256  # num_iters ≥ this: the basis has exactly num_iters + 1 rows (no padding, no copy)
ROW_BUCKET = 16        # below it: rows rounded up to a multiple of 16, so a new num_iters rarely recompiles
STATUS_RUNNING, STATUS_BREAKDOWN, STATUS_NONFINITE = 0, 1, 2


EXACT_ROWS_BYTES = 64 * 2 ** 20  # a basis this large is allocated exactly: the final trim would copy it


def basis_rows(num_iters: int, size: int = 0, itemsize: int = 8) -> int:
    """Rows allocated for the Krylov basis of a `num_iters`-step run on vectors of length `size` (the
    compiled program's static shape).

    Short runs on small vectors share a program per 16-row bucket (`num_iters` itself is a traced loop
    bound, so 50, 55 and 60 steps compile once; the padding costs at most 15 extra rows in each
    re-orthogonalisation, and the returned basis is trimmed to num_iters + 1 rows by a copy). Long runs
    (≥ 256 steps) and bases of ≥ 64 MiB allocate exactly num_iters + 1 rows, so the k·n basis is never
    padded or copied and the peak stays k·n + O(D)."""
    exact = int(num_iters) + 1
    if exact >= EXACT_ROWS_FROM or exact * int(size) * int(itemsize) >= EXACT_ROWS_BYTES:
        return exact
    return int(-(-exact // ROW_BUCKET) * ROW_BUCKET)


@dataclasses.dataclass(frozen=True)
class FlatProblem:
    """The static part of a compiled Krylov program: how a flat vector u ∈ R^n becomes A u ∈ R^n.

    n = D (u ↦ flatten(A(unflatten(u)))) or, with a sketch, n = m (u ↦ Φ A Φᵀ u). `matvec` is either
    `matvec(tree)` or, when `pure`, `matvec(args, tree)` with the arrays `args` passed to the compiled
    program as arguments (`landscape.operators.LinearOperator`): then a new parameter point reuses
    the compiled program instead of baking the parameters in as constants. Hashable: jit caches one
    program per (problem, basis shape, dtype)."""

    matvec: Callable
    pure: bool
    layout: Layout
    sketch: Sketch | None
    matvec_dtype: np.dtype
    reorthogonalize: bool = True

    def apply(self, dynamic, u: jax.Array) -> jax.Array:
        args, state = dynamic
        if self.sketch is None:
            tree = cast_to_layout(self.layout.unflatten(u), self.layout)
        else:
            tree = cast_to_layout(self.sketch.transpose(state, u), self.layout)
        out = self.matvec(args, tree) if self.pure else self.matvec(tree)
        return self.layout.flatten(out) if self.sketch is None else self.sketch.apply(state, out)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _arnoldi_step(problem: FlatProblem, dynamic, basis, hess, scale, status, steps, j, num_iters):
    """One Arnoldi step j for one start vector; a run whose status is no longer 0 is left unchanged.

    basis (rows, n) holds v_1..v_{j+1} (zeros below), hess (rows, rows−1) the Hessenberg columns so
    far, scale the running max ‖A v_i‖ (a lower bound on ‖A‖), status 0 running / 1 breakdown /
    2 non-finite matvec output, steps the number of steps taken."""
    eps = float(np.finfo(problem.matvec_dtype).eps)
    rows = basis.shape[0]
    row_ids = jnp.arange(rows)
    running = status == STATUS_RUNNING
    w = problem.apply(dynamic, basis[j]).astype(basis.dtype)
    finite = jnp.all(jnp.isfinite(w))
    w = jnp.where(finite, w, jnp.zeros_like(w))  # keep the carry clean; the host raises
    if problem.reorthogonalize:  # classical Gram–Schmidt twice against every stored row (unused rows are 0)
        h1 = _dot(basis, w)
        w1 = w - _dot(h1, basis)
        h2 = _dot(basis, w1)
        new = w1 - _dot(h2, basis)
        h = h1 + h2
    else:  # plain three-term Lanczos: only v_{j−1} and v_j
        mask = ((row_ids == j) | (row_ids == j - 1)).astype(basis.dtype)
        h = _dot(basis, w) * mask
        new = w - _dot(h, basis)
    new_scale = jnp.maximum(scale, jnp.sqrt(_dot(w, w)))
    beta = jnp.sqrt(_dot(new, new))
    broke = (j + 1 < num_iters) & (beta <= BREAKDOWN_FACTOR * eps * new_scale)
    column = jnp.where(row_ids == j + 1, jnp.where(broke, 0.0, beta), jnp.where(row_ids <= j, h, 0.0))
    zero = jnp.zeros((), j.dtype)
    old_column = jax.lax.dynamic_slice(hess, (zero, j), (rows, 1))[:, 0]
    column = jnp.where(running & finite, column.astype(hess.dtype), old_column)
    hess = jax.lax.dynamic_update_slice(hess, column[:, None], (zero, j))
    target = jnp.minimum(j + 1, rows - 1)
    old_row = jax.lax.dynamic_slice(basis, (target, zero), (1, basis.shape[1]))[0]
    write = running & finite & ~broke & (beta > 0)
    new_row = jnp.where(write, new / jnp.where(beta > 0, beta, 1.0), jnp.where(running & finite, 0.0, old_row))
    basis = jax.lax.dynamic_update_slice(basis, new_row[None, :], (target, zero))
    next_status = jnp.where(~finite, STATUS_NONFINITE, jnp.where(broke, STATUS_BREAKDOWN, STATUS_RUNNING))
    status = jnp.where(running, next_status, status).astype(jnp.int32)
    steps = jnp.where(running, j + 1, steps).astype(jnp.int32)
    scale = jnp.where(running, new_scale, scale)
    return basis, hess, scale, status, steps


def _krylov_loop(problem: FlatProblem, dynamic, basis, hess, scale, status, j, stop, num_iters):
    """Arnoldi steps j..stop−1 of one run inside one XLA while-loop (no host round trip); stops early
    at a breakdown or at the first non-finite matvec output. Returns (j, basis, hess, scale, status)."""

    def cond(carry):
        j, _, _, _, status = carry
        return (j < stop) & (status == STATUS_RUNNING)

    def body(carry):
        j, basis, hess, scale, status = carry
        basis, hess, scale, status, _ = _arnoldi_step(problem, dynamic, basis, hess, scale, status, j, j, num_iters)
        return j + 1, basis, hess, scale, status

    return jax.lax.while_loop(cond, body, (j, basis, hess, scale, status))


# The basis and H are updated in place, chunk after chunk (donated buffers).
_krylov_steps = jax.jit(_krylov_loop, static_argnums=0, donate_argnums=(2, 3))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _krylov_batch(problem: FlatProblem, dynamic, starts: jax.Array, rows: int, num_iters):
    """Full runs from the rows of `starts` side by side (SLQ probes): one while-loop with a shared step
    counter whose body is the vmapped Arnoldi step (a finished probe is left unchanged; the loop ends
    when every probe has finished). Returns (hess (p, rows, rows−1), steps (p,), status (p,))."""
    basis, hess, scale, status, _ = jax.vmap(lambda s: _initial_state(s, rows))(starts)
    steps = jnp.zeros_like(status)
    step = jax.vmap(lambda b, h, s, st, k, j: _arnoldi_step(problem, dynamic, b, h, s, st, k, j, num_iters),
                    in_axes=(0, 0, 0, 0, 0, None))

    def cond(carry):
        j, _, _, _, status, _ = carry
        return (j < num_iters) & jnp.any(status == STATUS_RUNNING)

    def body(carry):
        j, basis, hess, scale, status, steps = carry
        basis, hess, scale, status, steps = step(basis, hess, scale, status, steps, j)
        return j + 1, basis, hess, scale, status, steps

    _, _, hess, _, status, steps = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), basis, hess, scale, status, steps))
    return hess, steps, status


STATUS_BAD_START = 3


@functools.partial(jax.jit, static_argnums=(0, 3))
def _krylov_from_start(problem: FlatProblem, dynamic, start: jax.Array, rows: int, num_iters):
    """A whole run in one program (normalise the start, allocate, loop): one dispatch and one host read
    per call. A zero or non-finite start vector skips the loop with status STATUS_BAD_START."""
    norm = jnp.sqrt(_dot(start, start))
    good = jnp.isfinite(norm) & (norm > 0)
    basis, hess, scale, status, j = _initial_state(jnp.where(good, start, jnp.zeros_like(start)).at[0].add(
        jnp.where(good, 0.0, 1.0).astype(start.dtype)), rows)
    status = jnp.where(good, status, STATUS_BAD_START).astype(jnp.int32)
    j, basis, hess, _, status = _krylov_loop(problem, dynamic, basis, hess, scale, status, j, num_iters, num_iters)
    return j, basis, hess, status, norm


def _initial_state(start: jax.Array, rows: int):
    norm = jnp.sqrt(_dot(start, start))
    basis = jnp.zeros((rows, start.shape[0]), start.dtype).at[0].set(start / norm)
    hess = jnp.zeros((rows, rows - 1), start.dtype)
    return basis, hess, jnp.zeros((), start.dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)


_initial_state_jit = jax.jit(_initial_state, static_argnums=1)


def _norm(x: jax.Array) -> float:
    return float(jnp.sqrt(jnp.dot(x, x, precision=_HIGHEST)))


def _check_start(start: jax.Array) -> None:
    start_norm = _norm(start)
    if not np.isfinite(start_norm) or start_norm == 0.0:
        raise ValueError(f"start vector has norm {start_norm}; it must be finite and non-zero")


def _raise_nonfinite(iteration: int) -> None:
    raise FloatingPointError(
        f"the operator returned a non-finite vector (NaN or Inf) at Krylov iteration {iteration}; check the "
        "matvec (e.g. a loss that overflows, log(0), or a diverged checkpoint) before computing its spectrum")


def _krylov(problem: FlatProblem, dynamic, start: jax.Array, num_iters: int, *, progress: bool,
            description: str, stop_after: int | None = None) -> tuple[np.ndarray, jax.Array, int, bool]:
    """Runs up to `num_iters` Arnoldi steps; returns (H (k+1, k) float64, basis (num_iters+1, n), k, breakdown).

    One compiled call for the whole run when progress is off (one host read at the end); with
    progress, one call per chunk of ≈ num_iters/20 steps on donated (in-place) buffers."""
    rows = basis_rows(num_iters, start.shape[0], start.dtype.itemsize)
    bound = jnp.asarray(num_iters, jnp.int32)
    if not progress:
        if stop_after is not None:  # warm_up: compile the single-call program by running `stop_after` steps
            bound = jnp.asarray(stop_after, jnp.int32)
        j, basis, hess, status, norm = _krylov_from_start(problem, dynamic, start, rows, bound)
        steps, code, hess, norm = jax.device_get((j, status, hess, norm))
        steps, code = int(steps), int(code)
        if code == STATUS_BAD_START:
            raise ValueError(f"start vector has norm {float(norm)}; it must be finite and non-zero")
    else:
        _check_start(start)
        basis, hess, scale, status, j = _initial_state_jit(start, rows)
        chunk = max(1, -(-num_iters // 20)) if stop_after is None else stop_after
        with tqdm(total=num_iters, desc=description, disable=not progress, leave=False) as bar:
            done = 0
            while True:
                stop = jnp.asarray(min(done + chunk, num_iters), jnp.int32)
                j, basis, hess, scale, status = _krylov_steps(problem, dynamic, basis, hess, scale, status, j, stop,
                                                              bound)
                steps, code = (int(x) for x in jax.device_get((j, status)))
                bar.update(steps - done)
                done = steps
                if code != STATUS_RUNNING or done >= num_iters or stop_after is not None:
                    break
    if code == STATUS_NONFINITE:
        _raise_nonfinite(steps - 1)
    hessenberg = np.asarray(hess, np.float64)[: steps + 1, :steps]
    if basis.shape[0] != num_iters + 1:
        basis = basis[: num_iters + 1]
    return hessenberg, basis, steps, code == STATUS_BREAKDOWN


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


def make_problem(matvec: Matvec, layout: Layout, sketch: Sketch | None, state, *,
                 reorthogonalize: bool = True) -> tuple[FlatProblem, Any]:
    """(static problem, dynamic arguments) of the compiled Krylov program for `matvec`.

    A matvec that exposes `pure_fn(args, tree)` and `args` (`landscape.operators.LinearOperator`, what
    `hvp_fn` returns) passes `args` (parameters, batches) as program arguments; any other matvec must
    be a traceable function of its input tree and is compiled with whatever it closes over."""
    pure_fn = getattr(matvec, "pure_fn", None)
    if pure_fn is not None:
        return (FlatProblem(pure_fn, True, layout, sketch, layout.compute_dtype, reorthogonalize),
                (matvec.args, state))
    if not callable(matvec):
        raise ValueError(f"matvec must be callable, got {type(matvec).__name__}")
    return FlatProblem(matvec, False, layout, sketch, layout.compute_dtype, reorthogonalize), (None, state)


def _run(matvec, template, num_iters, key, *, sketch, start, start_distribution, reorthogonalize, progress,
         description, stop_after=None):
    layout = Layout.from_template(template)
    check_positive_int("num_iters", num_iters)
    dtype = basis_dtype()
    key_start, key_sketch = jax.random.split(key)
    if sketch is None:
        n = layout.size
        sketch_obj = state = None
        if start is not None:
            start = layout.flatten(start)
    else:
        sketch_obj, state = _resolve_sketch(sketch, key_sketch, template)
        n = sketch_obj.m
        if start is not None:
            start = jnp.asarray(start)
            if start.shape != (n,):
                raise ValueError(f"start has shape {start.shape}; with a sketch it must be ({n},)")
    if num_iters > n:
        where = "the sketch dimension m" if sketch is not None else "the number of parameters D"
        raise ValueError(f"num_iters={num_iters} exceeds {where} = {n}; a Krylov space has at most {n} dimensions")
    if start is None:
        start = _start_vector(key_start, n, dtype, start_distribution)
    problem, dynamic = make_problem(matvec, layout, sketch_obj, state, reorthogonalize=reorthogonalize)
    hessenberg, basis, k, breakdown = _krylov(problem, dynamic, start.astype(dtype), int(num_iters),
                                              progress=progress, description=description, stop_after=stop_after)
    return layout, sketch_obj, state, hessenberg, basis, k, breakdown


def warm_up(matvec: Matvec, template: PyTree, num_iters: int, key: jax.Array, *,
            sketch: Sketch | tuple | None = None, reorthogonalize: bool = True, progress: bool = False) -> None:
    """Compiles the Krylov program that `lanczos` / `arnoldi` with these arguments (and this `progress`
    setting: one program for a whole run, another for chunked runs with a progress bar) will use, one
    per operator, template, sketch and `basis_rows(num_iters)`, by running a single step, so that a
    benchmark can time or measure the memory of a run without XLA's compiler in it."""
    _run(matvec, template, num_iters, key, sketch=sketch, start=None, start_distribution="rademacher",
         reorthogonalize=reorthogonalize, progress=progress, description="warm-up", stop_after=1)


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
         eigenvectors).
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


@functools.partial(jax.jit, static_argnums=0)
def _apply_problem(problem: FlatProblem, dynamic, u: jax.Array) -> jax.Array:
    return problem.apply(dynamic, u).astype(u.dtype)


def direct_residuals(result: KrylovResult, matvec: Matvec, indices) -> np.ndarray:
    """‖A y_i − θ_i y_i‖ computed with one operator application per Ritz pair (A = Φ H Φᵀ for a sketched
    basis): the check of the certificate β_k|s_k| (`result.residual_norms`) that includes rounding, so
    it bottoms out near eps·‖A‖ where the certificate may read exactly 0 (a converged pair's last
    eigenvector component can be below LAPACK's support threshold)."""
    indices = np.atleast_1d(np.asarray(indices))
    vectors = result.ritz_vectors(indices)
    layout = result.layout if result.layout is not None else result.sketch_state.layout
    problem, dynamic = make_problem(matvec, layout, result.sketch, result.sketch_state)
    out = []
    with basis_precision(vectors):
        for row, index in zip(vectors, indices):
            residual = _apply_problem(problem, dynamic, row) - result.eigenvalues[int(index)] * row
            out.append(float(jnp.sqrt(jnp.dot(residual, residual, precision=_HIGHEST))))
    return np.asarray(out)


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
    """Arnoldi iteration (Schioppa et al. 2022's influence code path).

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
