"""The five packages type-check: ``python -m mypy`` with the settings in ``pyproject.toml`` finds nothing.

mypy runs as a subprocess from the project root, exactly as a developer runs
it, so this test and the command line cannot disagree. Its cache
(``.mypy_cache``) makes later runs take a few seconds.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (pip install -e '.[test]')")
def test_mypy_finds_no_errors() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mypy exited with {done.returncode}:\n{done.stdout}{done.stderr}"
