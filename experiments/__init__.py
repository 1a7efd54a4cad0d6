"""Experiments: the one runner (`python -m experiments.run`), shared helpers and one module per kind."""
