"""Experiment `train_lm`: the tiny decoder-only transformer trained on the planted-facts corpus.

    python -m experiments.run --config configs/train_lm.py:quick --workdir runs/train_lm

Writes `corpus.json` (documents, which fact each plants, queries with their planting documents),
`tokenizer.json`, checkpoints under `checkpoints/` (a rerun resumes from the newest) and reports
`query_accuracy` (greedy next word after each planted fact's prompt is its answer),
`heldout_query_accuracy` (facts never written: ≈ 0 unless the model guesses) and the final loss.
The task itself lives in `experiments/tasks/planted_lm.py`.
"""
from __future__ import annotations

from experiments.common import models as models_lib
from experiments.common.workdir import Workdir
from experiments.tasks import planted_lm

validate_config = planted_lm.validate_config


def run(config, workdir: Workdir) -> dict:
    s = planted_lm.setup(config)
    result = planted_lm.train_model(config, workdir, s)
    return {
        "query_accuracy": result.eval_metrics["query_accuracy"],
        "heldout_query_accuracy": result.eval_metrics["heldout_query_accuracy"],
        "train_loss": result.eval_metrics["loss"],
        "num_documents": len(s.corpus.documents),
        "num_params": models_lib.count_params(result.params),
        "resumed_from_step": result.resumed_from,
    }
