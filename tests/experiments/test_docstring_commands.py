"""Every `python -m experiments.run ...` command written in a config's or experiment's docstring
loads, takes its overrides and passes its experiment's validate_config (the checks that run before
any work), so the documented commands cannot rot."""
import ast
import glob
import os
import re
import shlex

import pytest

from experiments import run as runner
from experiments.common.command_line import apply_override, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A template command (`--config configs/NAME.py`, `--config.model.path=MODEL_DIR`) is not a command.
PLACEHOLDER = re.compile(r"(?<![\w./-])[A-Z][A-Z_]{2,}(?![\w])")
# Files that a documented command writes and the next documented command reads.
WRITTEN_BY_AN_EARLIER_COMMAND = ("runs/example",)


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        lines = doc.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            if line.startswith("python -m experiments.run") and "--config" in line and not PLACEHOLDER.search(line):
                tokens = []
                for token in shlex.split(line)[3:]:
                    if token.startswith("("):  # a trailing "(≤ 5 min, 2 CPU cores)" remark
                        break
                    tokens.append(token)
                found.append((os.path.relpath(path, ROOT), tokens))
            i += 1
    return found


COMMANDS = documented_commands()


def test_docstrings_document_commands():
    assert len(COMMANDS) >= 10
    assert {path for path, _ in COMMANDS} >= {"configs/demo.py", "configs/bench_sketch.py", "configs/train_lm.py"}


@pytest.mark.parametrize("where, tokens", COMMANDS, ids=[f"{p}:{' '.join(t)[:60]}" for p, t in COMMANDS])
def test_documented_command_validates(where, tokens):
    rest, overrides = runner._split_overrides(tokens)
    config_arg = rest[rest.index("--config") + 1]
    config = load_config(config_arg)
    for key, value in overrides:
        apply_override(config, key, value)
    module = runner.load_experiment(config.experiment)
    try:
        module.validate_config(config)
    except ValueError as error:
        needs = [p for p in WRITTEN_BY_AN_EARLIER_COMMAND if p in str(error) and not os.path.exists(p)]
        if not needs:
            raise
        assert "no such file" in str(error) or "not a folder" in str(error), error
        pytest.skip(f"reads {needs[0]}, which the documented command before it writes")
