"""The one experiment runner.

    python -m experiments.run --config configs/NAME.py[:preset] --workdir DIR [--config.key=value ...]

It loads the ml_collections config, validates it, writes `DIR/config.json`, dispatches to
`experiments/<config.experiment>.py`'s `run(config, workdir) -> dict` and writes the returned flat
mapping of headline numbers to `DIR/summary.json`. `metrics.jsonl` is appended to by the experiment
through `experiments.common.workdir.Workdir.log`. A failed run leaves no `summary.json`.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import experiments
from experiments.common.workdir import Workdir, atomic_write_json

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally `:preset`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created if missing).")
_QUIET = flags.DEFINE_bool("quiet", False, "Silence progress bars.")

def available_experiments() -> list[str]:
    """Every module directly in experiments/ except this runner: one per experiment kind. The shared
    stack lives in the packages experiments/common/ and experiments/tasks/, never listed here."""
    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__)
                  if not m.ispkg and m.name != "run" and not m.name.startswith("_"))


def load_experiment(name: str):
    """Imports `experiments.<name>`; a clear ValueError for unknown names."""
    allowed = available_experiments()
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"config.experiment={name!r} is not an experiment; allowed values: {allowed}")
    module = importlib.import_module(f"experiments.{name}")
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"experiments/{name}.py has no `run(config, workdir)` function")
    return module


def run_experiment(config, workdir_path: str, quiet: bool = False) -> dict:
    """Runs one config end to end and returns the summary (also written to summary.json)."""
    if "experiment" not in config:
        raise ValueError("config.experiment is missing; it names the module in experiments/ to run")
    workdir = Workdir(workdir_path)
    summary_path = workdir.file("summary.json")
    if os.path.exists(summary_path):  # a stale summary must never outlive a new (maybe failing) run
        os.remove(summary_path)
    module = load_experiment(config.experiment)
    if hasattr(module, "validate_config"):
        module.validate_config(config)
    config_dict = config.to_dict()
    config_dict["quiet"] = bool(quiet)
    atomic_write_json(workdir.file("config.json"), config_dict)
    start = time.time()
    with config.unlocked():
        config.quiet = bool(quiet)
    summary = module.run(config, workdir)
    if not isinstance(summary, dict):
        raise TypeError(f"experiments/{config.experiment}.py run() returned {type(summary)}, expected dict")
    summary = dict(summary)
    summary["wall_time_s"] = time.time() - start
    atomic_write_json(summary_path, summary)
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("Both --config and --workdir are required.")
    run_experiment(_CONFIG.value, _WORKDIR.value, quiet=_QUIET.value)
    print(f"Results written to {os.path.abspath(_WORKDIR.value)} (summary.json, metrics.jsonl, config.json)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(app.run(main))
