"""Experiment `finetune_classifier`: fine-tune a classifier on the generated C-class text set
(all-MiniLM-L6-v2 + head by default, or a local transformers checkpoint, or the tiny transformer),
or train logreg / MLP / CNN on scikit-learn's digits (the task: `experiments/tasks/classifier.py`).

    python -m experiments.run --config configs/finetune_classifier.py:quick --workdir runs/ft

Reports `test_accuracy`, `test_loss`, `train_loss` and the parameter count; checkpoints under
`checkpoints/` (a rerun resumes from the newest).
"""
from __future__ import annotations

from experiments.common import models as models_lib
from experiments.common import train as train_lib
from experiments.common.workdir import Workdir
from experiments.tasks import classifier

validate_config = classifier.validate_config


def run(config, workdir: Workdir) -> dict:
    setup = classifier.prepare(config)
    model, t = setup.model, config.train
    losses = models_lib.make_loss_fns(model)
    result = train_lib.train(
        losses.loss_fn, setup.params, setup.optimizer, setup.batch_at, t.num_steps, workdir=workdir,
        checkpoint_every=t.checkpoint_every, eval_fn=setup.evaluate, eval_every=t.eval_every, log_every=t.log_every,
        quiet=config.get("quiet", False), description=f"train {model.name}",
    )
    return {
        **result.eval_metrics,
        "train_loss": result.final_loss,
        "num_params": models_lib.count_params(result.params),
        "resumed_from_step": result.resumed_from,
    }
