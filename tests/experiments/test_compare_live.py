"""``testbed compare --mode live|both``: live points beside simulated ones, on real processes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

from tests.live.procs import TESTBED
from tests.live.test_live_run import SMALL


def compare(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(duration=4))
    return subprocess.run([TESTBED, "compare", str(path), *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_both_puts_each_live_run_beside_the_simulated_ones(tmp_path) -> None:
    out, png = tmp_path / "both.json", tmp_path / "both.png"
    done = compare(tmp_path, "--mode", "both", "--strategies", "round_robin,least_connections", "--reps", "2",
                   "--impl", "solution", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "both" and data["reps"] == 2
    assert data["loads"] == [40 / 300]  # the scenario's own rate: 40/s of (1 + 2) workers / 10 ms
    assert [r["strategy"] for r in data["live"]] == ["round_robin", "least_connections"]
    assert all(r["mode"] == "live" and r["requests"]["ok"] > 80 for r in data["live"])
    assert len(data["sim"]["runs"]) == 4 and len(data["sim"]["summary"]) == 2
    for diff, live in zip(data["differences"], data["live"]):
        same = next(r for r in data["sim"]["runs"] if r["strategy"] == live["strategy"] and r["rep"] == 0)
        want = (live["latency_ms"]["p50"] - same["latency_ms"]["p50"]) / same["latency_ms"]["p50"]
        assert abs(diff["latency_relative"]["p50"] - want) < 1e-12
        assert set(diff["share_pp"]) == {"a", "b"}
        assert same["requests"]["sent"] == live["requests"]["sent"]  # the same arrivals
    assert done.stdout.count("live vs sim") == 2 and "sim, seed 1" in done.stdout and "sim, 2 seeds" in done.stdout
    assert png.stat().st_size > 10_000


def test_live_alone_prints_the_sweep_table(tmp_path) -> None:
    out = tmp_path / "live.json"
    done = compare(tmp_path, "--mode", "live", "--strategies", "least_connections", "--loads", "0.1",
                   "--plot", "", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["sim"]["runs"] == [] and len(data["live"]) == 1 and data["live"][0]["load"] == 0.1
    assert "least_connections" in done.stdout and "(one run each" in done.stdout


def test_a_closed_loop_cannot_be_swept(tmp_path) -> None:
    done = subprocess.run([TESTBED, "compare", "closed-loop", "--mode", "live"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "needs an open-loop workload" in done.stderr and "Traceback" not in done.stderr
