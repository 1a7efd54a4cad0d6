"""The repository stands on its own: no file points to design notes outside it, and no user-facing
text carries issue numbers or development history."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = re.compile(r"\.\./shared|\b(SPEC|LANDSCAPE|ATTRIBUTION)(\.md)?\s?§|\b(SPEC|LANDSCAPE|ATTRIBUTION|DESIGN)\.md\b"
                       r"|\(issues? [0-9]+|\bissues? [0-9]+[,;)§]|\bissue [0-9]+'s\b")


def tracked_text_files() -> list[str]:
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    return [f for f in files if f.endswith((".py", ".md", ".txt", ".cfg", ".toml")) or f in ("Makefile",)]


def test_no_pointer_outside_the_repository_and_no_issue_numbers():
    hits = []
    for name in tracked_text_files():
        if name == "tests/test_repository_text.py":
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if FORBIDDEN.search(line):
                    hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert hits == [], "\n".join(hits)
