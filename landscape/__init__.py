"""Loss-landscape studies on (sketched) Hessian-vector products: Lanczos/Arnoldi spectra, SLQ spectral
density, Hutchinson trace, the paper's spectrum metrics (RNEG, R ratios, outliers, gradient alignment),
and intrinsic dimension by subspace training through any sketch (`landscape.intrinsic_dimension`)."""
from landscape import intrinsic_dimension
from landscape.gauss_newton import softmax_ggn_matvec
from landscape.density import SpectralDensity, TraceEstimate, hutchinson, probe_vectors, slq
from landscape.lanczos import KrylovResult, arnoldi, lanczos
from landscape.metrics import (
    affine_relative_error,
    gap_outlier_count,
    gradient_alignment,
    outlier_count,
    r_ratios,
    relative_errors,
    rneg,
    subspace_overlap,
)
from landscape.operators import hvp_fn, mean_gradient, sharded_hvp_fn
from landscape.power_iteration import top_eigenvalue

__all__ = [
    "KrylovResult", "SpectralDensity", "TraceEstimate", "affine_relative_error", "arnoldi", "gap_outlier_count", "gradient_alignment",
    "hutchinson", "hvp_fn", "intrinsic_dimension", "lanczos", "mean_gradient", "outlier_count", "probe_vectors", "r_ratios",
    "relative_errors", "rneg", "sharded_hvp_fn", "slq", "softmax_ggn_matvec", "subspace_overlap", "top_eigenvalue",
]
