"""One exercise written, the other still the stub: every command that takes ``--impl exercise``
runs what it can and refuses what it cannot, in one line, never a traceback.

A student may do the exercises in either order. An exercise's class is resolved
only where it is used (least connections as a strategy, the rate limiter on a
node with a rate limit), so the written one is graded, simulated and run live
on its own, and the stub is only reported where a command needs it: exit
status 3 and the stub's message (what to write, where).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from solutions.impl import EXERCISES, is_implemented
from tests.solutions.test_exercise_loop import PACKAGES
from tests.solutions.test_properties import ROOT, pasted_source

pytestmark = pytest.mark.skipif(any(is_implemented(e) for e in EXERCISES.values()),
                                reason="needs both stubs in this tree (an exercise is written here)")

NOT_IMPLEMENTED = 3


def half_done_tree(tmp_path: pathlib.Path, written: str) -> pathlib.Path:
    """A copy of the packages with only ``written`` pasted in; the other exercise stays the stub."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / EXERCISES[written].path).write_text(pasted_source(written))
    return tmp_path


def run_testbed(tree: pathlib.Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    env.pop("TESTBED_IMPL", None)
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ran(done: subprocess.CompletedProcess[str]) -> str:
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert done.returncode == 0, out
    return out


def refused(done: subprocess.CompletedProcess[str], stub: str) -> None:
    out = done.stdout + done.stderr
    assert "Traceback" not in out, out
    assert done.returncode == NOT_IMPLEMENTED, out
    assert f"exercise {stub!r} is not implemented yet: write {EXERCISES[stub].method}()" in out, out


def node_listens(tree: pathlib.Path, *args: str) -> str:
    """Start ``testbed node --port 0 ARGS``; its first stdout line must say where it listens. Stop it."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.cli", "node", "--port", "0", *args], cwd=tree,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert " listening on http://127.0.0.1:" in first, first + err
    assert proc.returncode == 0 and "Traceback" not in err, err
    return err


SMALL_SWEEP = ("--loads", "0.5", "--reps", "2", "--duration", "4", "--workers", "2")


def test_only_the_rate_limiter_written(tmp_path: pathlib.Path) -> None:
    tree = half_done_tree(tmp_path, "rate-limiter")
    out = ran(run_testbed(tree, "check", "rate-limiter", "--impl", "exercise", "--max-examples", "20"))
    assert "PASS  in simulation" in out and "PASS  live (" in out and "Result: every check passes" in out
    out = run_testbed(tree, "check", "--impl", "exercise", "--max-examples", "20", "--no-live").stdout
    assert "Result: not implemented yet" in out and "PASS  in simulation (rate-limited" in out

    ran(run_testbed(tree, "sim", "run", "rate-limited", "--impl", "exercise", "--duration", "4"))
    ran(run_testbed(tree, "sim", "run", "seed", "--impl", "exercise", "--duration", "4"))
    refused(run_testbed(tree, "sim", "run", "seed", "--strategy", "least_connections", "--impl", "exercise"),
            "least-connections")
    ran(run_testbed(tree, "sim", "compare", "rate-limited", "--impl", "exercise", "--strategies", "round_robin",
                *SMALL_SWEEP))
    refused(run_testbed(tree, "compare", "--impl", "exercise", *SMALL_SWEEP), "least-connections")
    ran(run_testbed(tree, "compare", "rate-limited", "--impl", "exercise", "--strategies", "round_robin",
                "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json"), *SMALL_SWEEP))
    assert "using your TokenBucket.is_allowed()" in node_listens(tree, "--impl", "exercise", "--rate-limit", "5")
    refused(run_testbed(tree, "balancer", "--port", "0", "--nodes", "5001", "--strategy", "least_connections",
                    "--impl", "exercise"), "least-connections")
    refused(run_testbed(tree, "live", "run", "seed", "--strategy", "least_connections", "--impl", "exercise"),
            "least-connections")


def test_only_least_connections_written(tmp_path: pathlib.Path) -> None:
    tree = half_done_tree(tmp_path, "least-connections")
    # The case: the live step used to start nodes that resolved the stubbed rate limiter.
    out = ran(run_testbed(tree, "check", "--max-examples", "20"))
    assert "using your LeastConnectionsStrategy.select_node()" in out
    assert "rate-limiter: TokenBucket.is_allowed() in core/rate_limiter.py is not implemented yet" in out
    assert out.count("PASS  live (") == 2 and "Result: every check passes" in out
    refused(run_testbed(tree, "check", "--impl", "exercise", "--no-live", "--max-examples", "20"), "rate-limiter")

    ran(run_testbed(tree, "sim", "run", "seed", "--strategy", "least_connections", "--impl", "exercise",
                "--duration", "4"))
    refused(run_testbed(tree, "sim", "run", "rate-limited", "--impl", "exercise"), "rate-limiter")
    ran(run_testbed(tree, "sim", "compare", "seed", "--impl", "exercise", *SMALL_SWEEP))
    refused(run_testbed(tree, "compare", "rate-limited", "--impl", "exercise", *SMALL_SWEEP), "rate-limiter")
    assert "not implemented" not in node_listens(tree, "--impl", "exercise")
    refused(run_testbed(tree, "node", "--port", "0", "--impl", "exercise", "--rate-limit", "5"), "rate-limiter")
    ran(run_testbed(tree, "live", "run", "seed", "--strategy", "least_connections", "--impl", "exercise",
                "--duration", "3"))
    refused(run_testbed(tree, "live", "run", "rate-limited", "--impl", "exercise"), "rate-limiter")
