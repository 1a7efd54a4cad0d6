"""The runner's command line: config files, presets, `--config.field=value` overrides, `--list`.

    python -m experiments.run --list
    python -m experiments.run --config configs/NAME.py[:preset] --workdir DIR [--config.a.b=value ...]

Every mistake a user can make here (a missing config file, an unknown preset, a misspelt or
ill-typed override) becomes one `UsageError` whose message names what was given, what is allowed
and the closest match; the runner prints it alone and exits with code 2.
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections

from experiments.common.config_checks import ConfigError, closest, unknown_field_message

__all__ = ["UsageError", "ConfigFile", "load_config", "apply_override", "config_files", "preset_table"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


class UsageError(ValueError):
    """A command-line mistake; the message says what was given and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    path: str            # as given, e.g. configs/demo.py
    preset: str          # "" for the default


def config_files() -> list[str]:
    """Every experiment config in configs/, as paths relative to the repository root."""
    return sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                  if not os.path.basename(p).startswith("_"))


def _import_file(path: str):
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if REPO_ROOT not in sys.path:  # configs import each other as `configs.x`
        sys.path.insert(0, REPO_ROOT)
    spec.loader.exec_module(module)
    return module


def _resolve(path: str) -> str:
    if os.path.isfile(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    if os.path.isfile(in_repo):
        return in_repo
    names = [os.path.basename(p) for p in config_files()]
    guess = closest(os.path.basename(path), names)
    hint = f" (did you mean configs/{guess}?)" if guess else ""
    raise UsageError(f"--config: no config file {path!r}{hint}; available: {', '.join('configs/' + n for n in names)}"
                     " (python -m experiments.run --list shows their presets)")


def presets_of(module) -> dict[str, str] | None:
    """{preset: one-line description} from the config module's PRESETS table ("" = the default);
    None when the module has no table (its get_config then checks the preset itself)."""
    table = getattr(module, "PRESETS", None)
    if isinstance(table, dict):
        return {("" if k is None else str(k)): str(v) for k, v in table.items()}
    if isinstance(table, (tuple, list)):
        return {"": "", **{("" if k is None else str(k)): "" for k in table}}
    return None


def parse_config_argument(value: str) -> ConfigFile:
    path, _, preset = value.partition(":")
    if not path:
        raise UsageError("--config is empty; give a config file, e.g. --config configs/demo.py:quick")
    return ConfigFile(path, preset)


def load_config(value: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `configs/NAME.py[:preset]`; UsageError for a missing file or unknown preset."""
    spec = parse_config_argument(value)
    path = _resolve(spec.path)
    module = _import_file(path)
    if not callable(getattr(module, "get_config", None)):
        raise UsageError(f"--config {spec.path}: the file has no get_config(arg=None) function")
    presets = presets_of(module)
    if presets is not None and spec.preset not in presets:
        guess = closest(spec.preset, [p for p in presets if p])
        hint = f" (did you mean {guess!r}?)" if guess else ""
        allowed = ", ".join(repr(p) if p else "'' (the default, no ':preset')" for p in presets)
        raise UsageError(f"--config {spec.path}:{spec.preset}: unknown preset{hint}; allowed presets: {allowed}")
    try:
        config = module.get_config(spec.preset or None)
    except ValueError as error:
        raise UsageError(f"--config {value}: {error}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UsageError(f"--config {value}: get_config returned {type(config).__name__}, expected a ConfigDict")
    return config


def _parse_value(text: str, current: Any, where: str) -> Any:
    """`text` as the type of the field's current value (strings stay as typed)."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}={text!r}; allowed values: true or false")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        kind = {int: "an int", float: "a number", tuple: "a tuple", list: "a list"}.get(type(current),
                                                                                         type(current).__name__)
        raise ConfigError(f"{where}={text!r} is not {kind} (the current value is {current!r})") from None
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(current, (tuple, list)) and not isinstance(value, (tuple, list)):
        return (value,)
    if isinstance(current, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type(value) is not type(current):
        raise ConfigError(f"{where}={text!r} is a {type(value).__name__}; the field holds a "
                          f"{type(current).__name__} (current value {current!r})")
    return value


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets config.<dotted> from the command-line text, naming the field and the valid fields on error."""
    parts = dotted.split(".")
    node, where = config, "config"
    for i, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            fields = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
            if not fields:
                raise ConfigError(f"{where}.{part}: {where} is a value ({node!r}), not a section")
            raise ConfigError(unknown_field_message(where, part, fields))
        if i == len(parts) - 1:
            full = f"{where}.{part}"
            value = _parse_value(text, node[part], full)
            try:
                node[part] = value
            except (TypeError, ValueError, AttributeError) as error:
                raise ConfigError(f"{full}={text!r}: {error}") from None
            return
        node, where = node[part], f"{where}.{part}"


def preset_spec(path: str, preset: str) -> str:
    """The --config argument naming a config file's preset: PATH, or PATH:PRESET."""
    return f"{path}:{preset}" if preset else path


def preset_table() -> list[tuple[str, str, str]]:
    """(config path, preset, description) for every config and preset, for `--list`."""
    rows = []
    for path in config_files():
        try:
            module = _import_file(os.path.join(REPO_ROOT, path))
        except Exception as error:  # a broken config file is listed with the reason, not hidden
            rows.append((path, "", f"(cannot be imported: {type(error).__name__}: {error})"))
            continue
        if not callable(getattr(module, "get_config", None)):
            continue
        for preset, description in (presets_of(module) or {"": ""}).items():
            rows.append((path, preset, description or "(no description)"))
    return rows


def format_preset_table(rows: Sequence[tuple[str, str, str]]) -> str:
    lines = ["configs and presets (run one with --config PATH[:PRESET]); times on 2 CPU cores, measured for the",
             "quick and small presets (docs/preset_times.md: one run each, first-time compilation included),",
             "estimated for the others:", ""]
    width = max(len(preset_spec(path, preset)) for path, preset, _ in rows)
    for path, preset, description in rows:
        name = preset_spec(path, preset)
        lines.append(f"  {name:<{width}}  {description}")
    return "\n".join(lines)
