"""Stochastic Lanczos quadrature (SLQ) spectral density and Hutchinson trace (LANDSCAPE.md §3, §4).

SLQ [Ubaru, Chen, Saad 2017; Ghorbani et al. 2019]. For each of n_v Rademacher probes z^(l) ∈ {±1}^D:
  1. run k Lanczos steps from v_1 = z / ‖z‖ → T^(l);
  2. T^(l) = U diag(θ^(l)) Uᵀ (float64 `eigh`); nodes θ_i^(l), weights τ_i^(l) = U[0, i]² — the squared
     FIRST ROW of the eigenvector matrix (PyHessian's bug squared the whole matrix; LANDSCAPE §5), Σ_i τ_i = 1;
  3. φ(t) = (1/n_v) Σ_l Σ_i τ_i^(l) N(t; θ_i^(l), σ²), evaluated on a grid and renormalised to Σ φ Δt = 1.
Why: v_1ᵀ f(A) v_1 = e_1ᵀ f(T) e_1 = Σ_i τ_i f(θ_i) is k-point Gauss quadrature for the spectral measure
seen from v_1, exact for polynomials of degree ≤ 2k − 1; tr f(A) ≈ (D / n_v) Σ_l Σ_i τ_i^(l) f(θ_i^(l)).
Smoothing follows Ghorbani et al.'s code: `sigma_squared` is a *relative variance*, the Gaussian variance
is sigma_squared · max(1, λ_max − λ_min); the grid extends 1% of the range beyond the extreme nodes.

Hutchinson: tr(A) ≈ (1/n) Σ_l z_lᵀ A z_l with Rademacher z_l (per-probe variance 2(‖A‖_F² − Σ_j A_jj²));
diag(A) ≈ (1/n) Σ_l z_l ⊙ A z_l. A fixed number of probes, reported as mean ± standard error (no
PyHessian-style early stop, LANDSCAPE §4). The same `probe_vectors` feed both estimators, so
D · mean_l Σ_i τ_i^(l) θ_i^(l) equals the Hutchinson estimate exactly (τθ summed is e_1ᵀ T e_1 = α_1).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from landscape.lanczos import basis_dtype, flat_operator, lanczos
from sketching.layout import Layout

PyTree = Any


def probe_vectors(key: jax.Array, num_probes: int, size: int, dtype=None) -> jax.Array:
    """(num_probes, size) Rademacher probes; probe l is drawn from fold_in(key, l) (any subset reproducible)."""
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    dtype = basis_dtype() if dtype is None else dtype
    return jnp.stack([jax.random.rademacher(jax.random.fold_in(key, l), (size,), dtype) for l in range(num_probes)])


def quadrature_from_tridiagonal(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-quadrature nodes θ (ascending) and weights τ_i = U[0, i]² of a symmetric tridiagonal T."""
    values, vectors = np.linalg.eigh(np.asarray(t, np.float64))
    return values, vectors[0, :] ** 2


@dataclasses.dataclass(frozen=True)
class SpectralDensity:
    """SLQ output: per-probe quadrature nodes/weights (lists: a probe may stop early on a breakdown)."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    dimension: int

    @property
    def num_probes(self) -> int:
        return len(self.nodes)

    def moment(self, power: int) -> float:
        """(1/n_v) Σ_l Σ_i τ_i θ_i^power ≈ tr(A^power) / D."""
        return float(np.mean([np.sum(w * t ** power) for t, w in zip(self.nodes, self.weights)]))

    def trace(self) -> float:
        """D · first moment: the SLQ estimate of tr(A)."""
        return self.dimension * self.moment(1)

    def _zero_band(self, relative_tol: float) -> float:
        if not relative_tol >= 0:
            raise ValueError(f"relative_tol must be >= 0, got {relative_tol!r}")
        low, high = self.extremes()
        return relative_tol * max(abs(low), abs(high))

    def negative_mass(self, relative_tol: float = 1e-3) -> float:
        """Σ_l Σ_i τ_i 1[θ_i < −ε] / n_v with ε = relative_tol · max|θ|: the fraction of the spectrum
        clearly below zero. The band matters for networks: their Hessians have a large (near-)null space
        that Gauss quadrature represents by one heavy node at ≈ 0 whose sign is arbitrary (a trained
        digits MLP: one node at −2e−4 with weight 0.73, while λ_max = 4)."""
        band = self._zero_band(relative_tol)
        return float(np.mean([np.sum(w[t < -band]) for t, w in zip(self.nodes, self.weights)]))

    def near_zero_mass(self, relative_tol: float = 1e-3) -> float:
        """Σ_l Σ_i τ_i 1[|θ_i| ≤ ε] / n_v: the weight of the (near-)null space."""
        band = self._zero_band(relative_tol)
        return float(np.mean([np.sum(w[np.abs(t) <= band]) for t, w in zip(self.nodes, self.weights)]))

    def extremes(self) -> tuple[float, float]:
        all_nodes = np.concatenate(self.nodes)
        return float(all_nodes.min()), float(all_nodes.max())

    def density(self, grid: np.ndarray | None = None, *, sigma_squared: float = 1e-5,
                num_points: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """(grid, φ(grid)) with the smoothing described in the module docstring; Σ φ Δt = 1 on a uniform grid."""
        if not sigma_squared > 0:
            raise ValueError(f"sigma_squared must be > 0, got {sigma_squared!r}")
        low, high = self.extremes()
        variance = sigma_squared * max(1.0, high - low)
        if grid is None:
            pad = 0.01 * max(high - low, 1e-12) + 3.0 * np.sqrt(variance)
            grid = np.linspace(low - pad, high + pad, num_points)
        grid = np.asarray(grid, np.float64)
        phi = np.zeros_like(grid)
        for nodes, weights in zip(self.nodes, self.weights):
            phi += gaussian_mixture(grid, nodes, weights, variance)
        phi /= self.num_probes
        spacing = np.diff(grid)
        if np.allclose(spacing, spacing[0]):
            phi /= np.sum(phi) * spacing[0]
        return grid, phi


def gaussian_mixture(grid: np.ndarray, centres: np.ndarray, weights: np.ndarray, variance: float) -> np.ndarray:
    """Σ_i w_i N(grid; centre_i, variance)."""
    diff = grid[:, None] - np.asarray(centres, np.float64)[None, :]
    kernel = np.exp(-0.5 * diff ** 2 / variance) / np.sqrt(2.0 * np.pi * variance)
    return kernel @ np.asarray(weights, np.float64)


def slq(matvec: Callable[[PyTree], PyTree], template: PyTree, num_iters: int, num_probes: int, key: jax.Array, *,
        progress: bool = False) -> SpectralDensity:
    """SLQ spectral density of a symmetric operator (full re-orthogonalisation, LANDSCAPE §3)."""
    layout = Layout.from_template(template)
    probes = probe_vectors(key, num_probes, layout.size)
    nodes, weights = [], []
    for probe in tqdm(probes, desc="slq probes", disable=not progress, leave=False):
        result = lanczos(matvec, template, num_iters, key, start=layout.unflatten(probe))
        theta, tau = quadrature_from_tridiagonal(result.tridiagonal)
        nodes.append(theta)
        weights.append(tau)
    return SpectralDensity(nodes, weights, layout.size)


@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate: mean ± standard error over `samples` (z_lᵀ A z_l); `diagonal` if requested."""

    mean: float
    stderr: float
    samples: np.ndarray
    diagonal: PyTree | None = None


def hutchinson(matvec: Callable[[PyTree], PyTree], template: PyTree, num_probes: int, key: jax.Array, *,
               diagonal: bool = False, progress: bool = False) -> TraceEstimate:
    """tr(A) (and optionally diag(A)) from `num_probes` Rademacher probes (module docstring)."""
    layout = Layout.from_template(template)
    apply_flat = flat_operator(matvec, layout)
    probes = probe_vectors(key, num_probes, layout.size)
    samples, diag_sum = [], None
    for probe in tqdm(probes, desc="hutchinson", disable=not progress, leave=False):
        product = apply_flat(probe).astype(probe.dtype)
        samples.append(float(jnp.dot(probe, product, precision=jax.lax.Precision.HIGHEST)))
        if diagonal:
            term = probe * product
            diag_sum = term if diag_sum is None else diag_sum + term
    samples = np.asarray(samples, np.float64)
    stderr = float(np.std(samples, ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    diag_tree = layout.unflatten(diag_sum / num_probes) if diagonal else None
    return TraceEstimate(float(samples.mean()), stderr, samples, diag_tree)
