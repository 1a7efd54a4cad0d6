"""Every ```python block of README.md runs as written: each block as its own script in a fresh
temporary folder (CPU, offline), so a block that relies on names from another block, on a fixed
path, or on an API that changed fails here."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[tuple[int, str]]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text[:match.start()].count("\n") + 1
        blocks.append((line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_written(tmp_path, line, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2"}
    script = tmp_path / "block.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"README.md block at line {line} failed:\n{out.stderr[-3000:]}"


def test_readme_preset_table_is_generated_from_the_configs():
    from tools import readme_presets
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert readme_presets.render(text) == text, "README's preset table is stale: run python -m tools.readme_presets"
