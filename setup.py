"""Installable package: gradient / HVP sketches, loss-landscape studies and training-data attribution."""
from setuptools import setup

setup(
    name="gradsketch",
    version="0.1.0",
    description=(
        "JAX sketches of gradients and Hessian-vector products (Schioppa, NeurIPS 2024) for "
        "training-data attribution and loss-landscape studies"
    ),
    python_requires=">=3.10",
    packages=["artifacts", "sketching", "landscape", "attribution", "experiments", "experiments.common", "experiments.tasks", "configs"],
    install_requires=[
        "jax>=0.4.35",
        "jaxlib>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "numpy>=1.26",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "transformers>=4.40,<5",  # 5.x has no Flax models
        "tokenizers>=0.19",       # the shipped attribution example's word-level tokenizer
        "scikit-learn>=1.3",      # the bundled digits data set
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scipy>=1.11", "faiss-cpu>=1.7"],
        "bench": ["matfree>=0.6"],  # only for experiments/bench_lanczos.py (skipped without it)
        "ann": ["faiss-cpu>=1.7"],  # only for attribution/ann.py (approximate top-k)
    },
)
