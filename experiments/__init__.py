"""Experiments: the one runner (`python -m experiments.run`) and one module per experiment kind.

The reusable stack is in `experiments.common` (workdir files, models, data, tokenizers, training,
timing, plots, config checks) and the shared tasks in `experiments.tasks` (the planted-facts LM, the
classifier). An experiment module imports the library, `common` and `tasks`, never another experiment.
"""
