"""``testbed bench live``'s CPU accounting: the cost per request it reports beside throughput."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.bench_live import cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")


def _burn_until(pids: list[int], more_than_s: float) -> float:
    """CPU of ``pids`` once it has grown past ``more_than_s`` (polled, bounded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        used = cpu_seconds(pids)
        if used > more_than_s:
            return used
        time.sleep(0.05)
    raise AssertionError(f"CPU of {pids} never passed {more_than_s} s")


def test_counts_a_process_and_its_children() -> None:
    # A parent that sleeps and a child that spins: the parent's figure includes the child's CPU
    # (nginx's master does no work; its workers, children, do).
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
        "time.sleep(120)\n")], start_new_session=True)
    try:
        start = cpu_seconds([parent.pid])
        assert _burn_until([parent.pid], start + 0.3) > start + 0.3
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the group this test made: the parent and its spinning child
        parent.wait(10)
    # Gone: counted as nothing, not an error.
    assert cpu_seconds([parent.pid]) == 0.0


def test_unknown_pid_is_nothing() -> None:
    assert cpu_seconds([2 ** 22 + 7]) == 0.0


def test_the_dashboard_viewer_keeps_a_stream_open_and_counts_its_snapshots() -> None:
    from experiments.bench_live import DashboardViewer, _testbed

    node = _testbed("node", "--id", "watched-node")
    lb = None
    try:
        lb = _testbed("balancer", "--nodes", str(node.port))
        viewer = DashboardViewer(lb.port)
        try:
            deadline = time.monotonic() + 60
            while viewer.snapshots < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert viewer.snapshots >= 2  # one a second while the stream is open
        finally:
            viewer.close()
        assert not viewer._thread.is_alive()
    finally:
        for proc in (lb, node):
            if proc is not None:
                proc.stop()
