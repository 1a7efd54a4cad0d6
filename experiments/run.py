"""The one experiment runner.

    python -m experiments.run --list
    python -m experiments.run --config configs/NAME.py[:preset] --workdir DIR [--config.key=value ...]

It loads the ml_collections config, applies the overrides, runs the experiment's
`validate_config` (every experiment has one) before any work, writes `DIR/config.json`, dispatches
to `experiments/<config.experiment>.py`'s `run(config, workdir) -> dict` and writes the returned
flat mapping of headline numbers to `DIR/summary.json`. The experiment appends to
`metrics.jsonl` through `experiments.common.workdir.Workdir.log`. A failed run leaves no `summary.json`.

A mistake in the command line or the config (unknown file, preset or field, a value the
experiment would reject) is printed as one message and exits with code 2; `--debug` shows the
traceback instead.

Reliability (docs/reliability.md): the runner holds an exclusive lock on `DIR/.lock` for the whole
run, so a second runner on the same folder is refused at once (exit 2, naming the holder's pid). The
config (without `quiet`) is the workdir's fingerprint, stored in `DIR/fingerprint.json`: rerunning a
folder with other settings is refused naming every differing field (exit 2), so a summary never mixes
the numbers of two settings, unless the config field `workdir_on_change="subfolder"` (accepted by
every config, e.g. `--config.workdir_on_change=subfolder`) sends the run to a fresh subfolder
`DIR/fp-<digest>/`. A run whose training diverges (non-finite loss or parameters) exits with code 1
naming the step, and writes no summary.json.

Compiled programs are kept in JAX's persistent compilation cache (default ~/.cache/gradsketch/jax;
the environment variable GRADSKETCH_COMPILATION_CACHE sets another folder, or "off"), so a rerun
with the same shapes skips most compilation.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import time
import warnings

import artifacts
import experiments
from experiments.common.command_line import (UsageError, apply_override, format_preset_table, load_config,
                                             preset_spec, preset_table)
from experiments.common.config_checks import ConfigError
from experiments.common.jsonl import RecordError
from experiments.common.train import TrainingDivergedError
from experiments.common.workdir import Workdir, atomic_write_json


def available_experiments() -> list[str]:
    """Every module directly in experiments/ except this runner: one per experiment kind. The shared
    stack lives in the packages experiments/common/ and experiments/tasks/, never listed here."""
    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__)
                  if not m.ispkg and m.name != "run" and not m.name.startswith("_"))


def load_experiment(name: str):
    """Imports `experiments.<name>`; a clear ConfigError for unknown names."""
    allowed = available_experiments()
    if not isinstance(name, str) or name not in allowed:
        raise ConfigError(f"config.experiment={name!r} is not an experiment; allowed values: {allowed}")
    module = importlib.import_module(f"experiments.{name}")
    for required in ("run", "validate_config"):
        if not callable(getattr(module, required, None)):
            raise ConfigError(f"experiments/{name}.py has no `{required}` function; every experiment defines "
                              "validate_config(config) and run(config, workdir)")
    return module


def check_workdir(path) -> str:
    if not isinstance(path, str) or not path.strip():
        raise UsageError("--workdir is empty; give a folder for the run's files (config.json, summary.json, ...), "
                         "e.g. --workdir runs/demo")
    return path


ON_CHANGE_FIELD = "workdir_on_change"
ON_CHANGE = ("error", "subfolder")
NOT_FINGERPRINTED = ("quiet", ON_CHANGE_FIELD)


def add_runner_fields(config) -> None:
    """Adds the runner's own optional field `workdir_on_change` (default "error") so that
    `--config.workdir_on_change=subfolder` works for every config."""
    if ON_CHANGE_FIELD not in config:
        with config.unlocked():
            config[ON_CHANGE_FIELD] = "error"


def workdir_fingerprint(config) -> dict:
    """The settings a workdir's files depend on: the whole config except `quiet` and runner fields."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_FINGERPRINTED}


def _check_workdir_fingerprint(path: str, fields: dict) -> None:
    """FingerprintMismatchError naming the differing fields when `path` holds the files of a run with
    other settings (its fingerprint.json, or the config.json of a folder written before fingerprints)."""
    hint = (f"use another --workdir, delete {path}, or pass --config.{ON_CHANGE_FIELD}=subfolder to run in a "
            "fresh subfolder")
    if os.path.exists(os.path.join(path, artifacts.FINGERPRINT_FILE)):
        artifacts.check_fingerprint(path, fields, what="workdir", write=False, hint=hint)
    elif os.path.exists(os.path.join(path, "config.json")):
        stored = {k: v for k, v in artifacts.read_json(os.path.join(path, "config.json")).items()
                  if k not in NOT_FINGERPRINTED}
        artifacts.check_fields(path, stored, fields, what="workdir", hint=hint)


def run_experiment(config, workdir_path: str, quiet: bool = False) -> dict:
    """Runs one config end to end and returns the summary (also written to summary.json), holding
    the workdir lock and checking its fingerprint first (module docstring)."""
    check_workdir(workdir_path)
    if "experiment" not in config:
        raise ConfigError("config.experiment is missing; it names the module in experiments/ to run")
    on_change = config.get(ON_CHANGE_FIELD, "error")
    if on_change not in ON_CHANGE:
        raise ConfigError(f"config.{ON_CHANGE_FIELD}={on_change!r}; allowed values: {list(ON_CHANGE)}")
    if ON_CHANGE_FIELD in config:
        with config.unlocked():
            del config[ON_CHANGE_FIELD]
    module = load_experiment(config.experiment)
    try:
        module.validate_config(config)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # every rejection before work is a config error
        raise ConfigError(str(error).strip("'\"")) from error
    fields = workdir_fingerprint(config)
    os.makedirs(workdir_path, exist_ok=True)
    with artifacts.exclusive_lock(os.path.join(workdir_path, ".lock"),
                                  what=f"running an experiment in {os.path.abspath(workdir_path)}"):
        try:
            _check_workdir_fingerprint(workdir_path, fields)
        except artifacts.FingerprintMismatchError:
            if on_change != "subfolder":
                raise
            workdir_path = artifacts.subfolder_for(workdir_path, fields)
            print(f"the settings differ from the run in {os.path.dirname(os.path.abspath(workdir_path))}; "
                  f"running in the subfolder {workdir_path}", file=sys.stderr)
            os.makedirs(workdir_path, exist_ok=True)
            with artifacts.exclusive_lock(os.path.join(workdir_path, ".lock"),
                                          what=f"running an experiment in {os.path.abspath(workdir_path)}"):
                _check_workdir_fingerprint(workdir_path, fields)
                return _run_locked(module, config, workdir_path, fields, quiet)
        return _run_locked(module, config, workdir_path, fields, quiet)


def _run_locked(module, config, workdir_path: str, fields: dict, quiet: bool) -> dict:
    stale = os.path.join(workdir_path, "summary.json")
    if os.path.exists(stale):  # a stale summary must never outlive a new (maybe failing) run
        os.remove(stale)
    artifacts.write_fingerprint(workdir_path, fields)
    workdir = Workdir(workdir_path)
    summary_path = workdir.file("summary.json")
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


COMPILATION_CACHE_ENV = "GRADSKETCH_COMPILATION_CACHE"


def compilation_cache_dir() -> str | None:
    """Where compiled XLA programs are kept between runs: $GRADSKETCH_COMPILATION_CACHE ("off" or an
    empty value disables it), else $XDG_CACHE_HOME/gradsketch/jax (default ~/.cache/gradsketch/jax)."""
    value = os.environ.get(COMPILATION_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gradsketch", "jax")


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache, so that a rerun (same shapes, same program) loads its
    programs instead of compiling them again. Programs that compile in under 0.2 s are not stored."""
    folder = compilation_cache_dir()
    if folder is None:
        return None
    import jax

    if jax.config.jax_compilation_cache_dir == folder:  # already set up by the caller (e.g. the tests)
        return folder
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return folder


def silence_library_noise() -> None:
    """Hide messages that are not the user's concern: JAX probing for absent TPU/GPU backends and
    transformers' Flax deprecation / unused-weights notices. Real warnings stay visible."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=".*Flax.*deprecat.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Ff]lax.*deprecat.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; this only guards partial installs
        pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description="Run one experiment from an ml_collections config. Any config field can be overridden "
                    "with --config.FIELD=VALUE (nested: --config.train.num_steps=100). Compiled programs are "
                    f"cached in ~/.cache/gradsketch/jax ({COMPILATION_CACHE_ENV}=DIR or =off to change).",
        epilog="Configs and presets:\n" + "\n".join(
            f"  {preset_spec(path, preset)}  {desc}" for path, preset, desc in _safe_table()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a config file, optionally with a preset: configs/NAME.py[:PRESET]")
    parser.add_argument("--workdir", help="the run's output folder (created if missing)")
    parser.add_argument("--quiet", action="store_true", help="silence progress bars")
    parser.add_argument("--list", action="store_true", help="list every config and preset with its expected CPU time")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")
    return parser


def _safe_table():
    try:
        return preset_table()
    except Exception:  # --help must work even if a config is broken; --list reports the reason
        return []


def _split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=v` / `--config.a.b v` from the runner's own flags."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{arg} needs a value: {arg}=VALUE")
                value = argv[i + 1]
                i += 1
            if not key:
                raise UsageError(f"{arg}: give a field name, e.g. --config.seed=1")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    silence_library_noise()
    enable_compilation_cache()
    try:
        rest, overrides = _split_overrides(argv)
        parser = _parser()
        args = parser.parse_args(rest)
        if args.list:
            print(format_preset_table(preset_table()))
            return 0
        if args.config is None or args.workdir is None:
            raise UsageError("both --config and --workdir are required (python -m experiments.run --list shows the "
                             "configs), e.g. --config configs/demo.py:quick --workdir runs/demo")
        check_workdir(args.workdir)
        config = load_config(args.config)
        add_runner_fields(config)
        for key, value in overrides:
            apply_override(config, key, value)
        summary = run_experiment(config, args.workdir, quiet=args.quiet)
    except (UsageError, ConfigError, RecordError, artifacts.FingerprintMismatchError, artifacts.LockedError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    del summary
    print(f"Results written to {os.path.abspath(args.workdir)} (summary.json, metrics.jsonl, config.json)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
