"""``testbed live run`` end to end: real processes, bounded runs, and nothing left behind."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import pytest

from experiments.scenarios import load
from solutions.impl import simulate
from experiments.cli_live import EXIT_GENERATOR_BEHIND
from tests.live.procs import TESTBED, Proc, wait_until

STARTED = re.compile(r"started (\S+) \(pid (\d+)\) on http://127\.0\.0\.1:(\d+)")


def scenario(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return str(path)


SMALL = """
name = "small"
seed = 1
duration_s = {duration}
warmup_s = 0.5
[workload]
arrival = "poisson"
rate_per_s = 40
clients = 5
[balancer]
strategy = "least_connections"
health_check_interval_s = 0.5
[[nodes]]
id = "a"
workers = 1
load_factor_ms = 10
[[nodes]]
id = "b"
workers = 2
load_factor_ms = 10
"""


def started(output: str) -> dict[str, tuple[int, int]]:
    """name -> (pid, port) of every process the runner said it started."""
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in STARTED.finditer(output)}


def gone(pid: int) -> bool:
    """The process is gone (or a zombie the runner will never reap because the runner is gone too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def port_free(port: int) -> bool:
    """Nothing listens there, and a server could listen there again (as servers do, with SO_REUSEADDR:
    connections the shutdown closed may sit in TIME_WAIT for a minute, which is not a bound port)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def assert_nothing_left(children: dict[str, tuple[int, int]]) -> None:
    wait_until(lambda: all(gone(pid) for pid, _ in children.values()), 10, "every child process to exit")
    wait_until(lambda: all(port_free(port) for _, port in children.values()), 10, "every port to be free")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TESTBED, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finished(done: subprocess.CompletedProcess[str], out: pathlib.Path) -> dict:
    """The results JSON of a finished ``testbed live run``. A functional test asserts on these results, not on
    how well the load generator kept up on a busy machine: exit status 4 is fine when the results say so."""
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert out.exists(), done.stdout + done.stderr
    r = json.loads(out.read_text())
    assert done.returncode == (0 if r["generator"]["kept_up"] else EXIT_GENERATOR_BEHIND), done.stdout + done.stderr
    return r


def live_run(tmp_path: pathlib.Path, text: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``testbed live run`` on a scenario given as TOML text: the finished process and its results JSON."""
    out = tmp_path / "results.json"
    done = run("live", "run", scenario(tmp_path, text), "--json", str(out), *args)
    return done, finished(done, out)


def test_live_run_writes_the_results_json_and_stops_everything(tmp_path) -> None:
    done, r = live_run(tmp_path, SMALL.format(duration=4))
    children = started(done.stdout)
    assert set(children) == {"registry", "a", "b", "balancer"}
    assert_nothing_left(children)

    assert r["mode"] == "live" and r["scenario"] == "small" and r["strategy"] == "least_connections"
    q = r["requests"]
    assert q["sent"] > 80 and q["ok"] == q["sent"] and q["errors"] == 0
    assert r["live_requests"] >= q["sent"]
    assert sum(n["requests"] for n in r["nodes"].values()) == q["sent"]
    assert sum(n["share"] for n in r["nodes"].values()) == pytest.approx(1.0)
    assert all(n["requests"] > 20 and n["utilization"] > 0.02 for n in r["nodes"].values())
    assert 9 <= r["latency_ms"]["mean"] < 40  # a 10 ms mean service time, not a stub's zero
    g = r["generator"]
    assert g["asked_rate_per_s"] == 40 and set(g["lag_ms"]) == {"p50", "p99", "max"}
    assert g["not_sent"] == {"max_in_flight": 0, "out_of_time": 0} and g["loop_errors"] == {}
    # The same keys as a simulated run of the same file, plus the live run's own.
    sim = simulate(load(tmp_path / "scenario.toml"), "solution")
    assert set(sim) - set(r) == {"simulated_requests"}
    assert set(r) - set(sim) == {"live_requests", "generator", "overhead_ms", "faults", "impl"}
    assert r["overhead_ms"]["samples"] == 40 and 0 < r["overhead_ms"]["p50"] < 50
    assert "[live] strategy=least_connections" in done.stdout and "load generator: asked 40.0/s" in done.stdout


def test_sigint_to_the_runner_stops_every_child_and_frees_every_port(tmp_path) -> None:
    runner = Proc("live", "run", scenario(tmp_path, SMALL.format(duration=120)), ready=r"sending .* to the balancer",
                  timeout=60)
    try:
        children = started(runner.output())
        assert set(children) == {"registry", "a", "b", "balancer"}
        assert all(not gone(pid) for pid, _ in children.values())
        time.sleep(0.5)  # a moment of traffic, so requests are in flight when the signal comes
        code = runner.stop(signal.SIGINT, timeout=30)
    finally:
        runner.stop()
    assert code == 130, runner.output()
    assert "interrupted: every process this run started has been stopped" in runner.output()
    assert_nothing_left(children)


def test_a_killed_runner_takes_its_children_with_it(tmp_path) -> None:
    # SIGKILL leaves the runner no chance to clean up: the kernel's parent-death signal does it.
    runner = Proc("live", "run", scenario(tmp_path, SMALL.format(duration=120)), ready=r"sending .* to the balancer",
                  timeout=60)
    try:
        children = started(runner.output())
        runner.stop(signal.SIGKILL)
    finally:
        runner.stop()
    assert_nothing_left(children)


CRASH = """
name = "crash"
seed = 3
duration_s = 8
warmup_s = 0.5
[workload]
arrival = "poisson"
rate_per_s = 60
clients = 5
[balancer]
strategy = "round_robin"
health_check_interval_s = 0.5
[[nodes]]
id = "slow"              # holds about 4 requests at any time: the crash must fail them
workers = 8
load_factor_ms = 200
service = "deterministic"
[[nodes.faults]]
start_s = 2
end_s = 5
down = true
[[nodes]]
id = "b"
workers = 4
load_factor_ms = 10
[[nodes]]
id = "c"
workers = 4
load_factor_ms = 10
"""


def test_a_node_that_crashes_mid_run_is_routed_around_and_its_failures_are_counted(tmp_path) -> None:
    done, r = live_run(tmp_path, CRASH)
    actions = [(f["node"], f["action"], f["result"]) for f in r["faults"]]
    assert actions == [("slow", "crash (SIGKILL)", "ok"), ("slow", "restart", "ok")]
    q = r["requests"]
    # What the crashed node held failed, and is counted; everything else got through.
    assert r["errors_detail"]["server"] >= 1
    assert q["errors"] == sum(r["errors_detail"].values()) and q["ok"] + q["errors"] == q["sent"]
    assert q["errors"] <= 15
    # Round robin gives each node a third; the crashed node was away about 3 s of 7.5.
    shares = {k: n["share"] for k, n in r["nodes"].items()}
    assert shares["slow"] < 0.27 and shares["b"] > 0.36 and shares["c"] > 0.36, shares
    assert f"errors: server {r['errors_detail']['server']}" in done.stdout
    assert_nothing_left(started(done.stdout))


def test_sim_and_live_agree_at_low_load(tmp_path) -> None:
    # The seed scenario at 30% load: the same arrivals (same seed) in both; only the system differs.
    s = load("seed").with_load(0.3).replace(strategy="least_connections", duration_s=25)
    sim = simulate(s, "solution")
    done = run("live", "run", "seed", "--load", "0.3", "--strategy", "least_connections", "--duration", "25",
               "--impl", "solution", "--json", str(tmp_path / "live.json"))
    live = finished(done, tmp_path / "live.json")
    assert live["requests"]["sent"] == sim["requests"]["sent"]  # the very same arrivals
    # Live = simulated + what a request costs outside queueing and service (two HTTP hops, processes
    # waking up), which the run measures before the load starts; the rest must be small.
    overhead = live["overhead_ms"]["p50"]
    assert 0 < overhead < 10
    # Within 15% below (a live system cannot serve faster than the model of its own service times),
    # and within 50% above: other work on the machine (CI shares two cores) slows the live processes'
    # CPU-bound service, which no model of this run sees; a live node doing the wrong work is caught either way.
    for key in ("mean", "p50"):
        want = sim["latency_ms"][key]
        assert 0.85 * want <= live["latency_ms"][key] - overhead <= 1.5 * want, (key, live["latency_ms"], want)
    for node in sim["nodes"]:
        assert abs(live["nodes"][node]["share"] - sim["nodes"][node]["share"]) < 0.05, node


def test_a_process_that_dies_on_its_own_ends_the_run_with_its_last_words(tmp_path) -> None:
    runner = Proc("live", "run", scenario(tmp_path, SMALL.format(duration=120)), ready=r"sending .* to the balancer",
                  timeout=60)
    try:
        children = started(runner.output())
        os.kill(children["balancer"][0], signal.SIGKILL)  # nobody asked it to go
        code = runner.popen.wait(30)
    finally:
        runner.stop()
    assert code == 1, runner.output()
    assert "the live run failed: balancer (pid" in runner.output() and "exited with status -9" in runner.output()
    assert "Traceback" not in runner.output()
    assert_nothing_left(children)


CLOSED = """
name = "closed"
seed = 4
duration_s = 4
warmup_s = 0.5
[workload]
arrival = "closed"
clients = 4
think_time_ms = 20
[balancer]
strategy = "round_robin"
[[nodes]]
id = "a"
workers = 2
load_factor_ms = 10
"""


def test_a_closed_loop_runs_live_and_follows_littles_law(tmp_path) -> None:
    done, r = live_run(tmp_path, CLOSED)
    g = r["generator"]
    assert g["asked_rate_per_s"] is None and r["offered_rate_per_s"] is None and sum(g["not_sent"].values()) == 0
    # Little's law for the clients: throughput = clients / (response time + think time).
    expected = 4 / ((r["latency_ms"]["mean"] + 20) / 1000)
    assert r["throughput_rps"] == pytest.approx(expected, rel=0.1)
    assert "closed loop, sent" in done.stdout
    assert_nothing_left(started(done.stdout))


def test_a_rate_far_above_what_this_machine_sends_is_named_first_and_ends_on_time(tmp_path) -> None:
    # 20,000 requests/s for 2 s: before, the generator sent all 40,000 late (tens of seconds, with tracebacks).
    # Now it sends for 2 s only, holds at most 200 outstanding, and waits at most 1 s for the last answers;
    # every scheduled request is either answered or counted as not sent.
    done, r = live_run(tmp_path, SMALL.format(duration=2), "--rate", "20000", "--max-in-flight", "200",
                       "--drain", "1")
    assert done.returncode == EXIT_GENERATOR_BEHIND
    warning = re.search(r"WARNING: asked 20,000 requests/s, but this machine carries about ([\d,]+)/s", done.stdout)
    assert warning and done.stdout.index("WARNING: asked") < done.stdout.index("sending poisson arrivals")
    g, q = r["generator"], r["requests"]
    assert g["kept_up"] is False and g["max_in_flight"] == 200 and g["peak_in_flight"] <= 200
    assert g["not_sent"]["max_in_flight"] > 0 and r["errors_detail"]["not_sent"] == sum(g["not_sent"].values())
    assert q["sent"] > 25_000  # the 30,000 arrivals of the window (1.5 s at 20,000/s), sent or not
    assert q["ok"] + q["errors"] == q["sent"] and q["errors"] == sum(r["errors_detail"].values())
    assert "not sent" in done.stdout and "(--max-in-flight)" in done.stdout
    assert_nothing_left(started(done.stdout))


@pytest.mark.parametrize("args, words", [
    (["closed-loop", "--rate", "10"], "is a closed loop: its load is set by clients and think_time_ms"),
    (["seed", "--rate", "10", "--load", "0.5"], "give --rate or --load, not both"),
    (["no-such-scenario"], "no such file, and not a shipped scenario"),
    (["seed", "--duration", "-1"], "--duration"),
])
def test_bad_live_run_arguments_are_refused_before_anything_starts(args, words) -> None:
    done = run("live", "run", *args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert "started" not in done.stdout
