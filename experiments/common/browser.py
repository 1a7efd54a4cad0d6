"""A headless Chromium for looking at HTML reports: the rendered DOM and a PNG screenshot.

Chromium comes from the system packages (Debian: `apt-get install chromium`); `find_browser()` returns
None where none is installed, so callers (tests) can skip with that reason.

    python -m experiments.common.browser REPORT.html OUT.png     # a screenshot of a report
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

__all__ = ["BROWSERS", "find_browser", "rendered_dom", "screenshot"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
          "--disable-extensions", "--allow-file-access-from-files")


def find_browser() -> str | None:
    """The first Chromium-family executable on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)


def rendered_dom(html_file: str, *, browser: str | None = None, timeout: float = 60.0) -> str:
    """The page's DOM after the browser has parsed and laid it out (`--dump-dom`)."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium-family browser on PATH (looked for {list(BROWSERS)})")
    done = _run(browser, ["--dump-dom", "file://" + os.path.abspath(html_file)], timeout)
    if done.returncode != 0 or "<html" not in done.stdout.lower():
        raise RuntimeError(f"{browser} could not render {html_file} (exit {done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def screenshot(html_file: str, png_file: str, *, width: int = 1200, height: int = 1400,
               browser: str | None = None, timeout: float = 60.0) -> str:
    """A PNG of the page's first `width` × `height` pixels."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium-family browser on PATH (looked for {list(BROWSERS)})")
    done = _run(browser, [f"--window-size={width},{height}", f"--screenshot={os.path.abspath(png_file)}",
                          "file://" + os.path.abspath(html_file)], timeout)
    if done.returncode != 0 or not os.path.isfile(png_file):
        raise RuntimeError(f"{browser} could not screenshot {html_file} (exit {done.returncode}): {done.stderr[-500:]}")
    return png_file


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m experiments.common.browser REPORT.html OUT.png")
    print(screenshot(sys.argv[1], sys.argv[2]))
