"""The whole exercise loop as a student lives it: paste the solution methods into the
exercise files, run ``testbed check``, and see properties, simulation and live run pass."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from solutions.impl import EXERCISES, is_implemented
from tests.solutions.test_properties import ROOT, pasted_source

PACKAGES = ("core", "live", "sim", "solutions", "experiments")


@pytest.fixture
def student_tree(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the project's packages with both exercises written (the solution methods pasted in)."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name, exercise in EXERCISES.items():
        (tmp_path / exercise.path).write_text(pasted_source(name))
    return tmp_path


def run_check(tree: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The copy comes first on the path, for the check and for every process the live step starts.
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.cli", "check", *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_pasted_solutions_pass_every_step_in_the_students_own_files(student_tree: pathlib.Path) -> None:
    done = run_check(student_tree, "--impl", "exercise", "--max-examples", "20")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "using your TokenBucket.is_allowed() from core/rate_limiter.py" in out
    assert "using your LeastConnectionsStrategy.select_node() from core/strategies.py" in out
    assert out.count("PASS  in simulation") == 2
    assert out.count("PASS  live (") == 2
    assert "Result: every check passes" in out


def test_the_untouched_stub_stops_at_the_first_step() -> None:
    if all(is_implemented(e) for e in EXERCISES.values()):
        pytest.skip("both exercises are written in this tree")
    done = subprocess.run([sys.executable, "-m", "experiments.cli", "check", "--impl", "exercise"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "NOT IMPLEMENTED YET" in done.stdout and "live" not in done.stdout and "simulation" not in done.stdout
