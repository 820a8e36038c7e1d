"""``testbed live run``'s timeline: the simulator's schema, filled from the live processes' own records.

One short live run of a faults scenario (a crash, then a node returning errors) is shared by the tests that
read its results; the endpoints the runner reads (``GET /lb-events``, the registry's ``GET /events``) and the
runner's reading of node breakers are tested on their own, with literal times.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from core.results import Outcome
from core.scenario import Scenario
from core.events import EventRing
from core.timeline import EVENT_KINDS
from experiments.cli_live import timeline_path
from experiments.scenarios import load
from live.balancer import STATE, BalancerConfig, make_balancer_app
from live.node import NodeConfig, make_node_app
from live.registry import make_registry_app
from live.run import LAST_READ_S, StateWatch, _fault, fault_schedule, live_timeline
from solutions.impl import simulate
from tests.live.test_live_run import SMALL, finished, run, started

FAULTS = """
name = "faults-short"
seed = 7
duration_s = 12
warmup_s = 1
[workload]
arrival = "poisson"
rate_per_s = 60
clients = 10
[balancer]
strategy = "least_connections"
health_check_interval_s = 0.5
retry_connect_failures = true
[[nodes]]
id = "node-1"
workers = 2
load_factor_ms = 25
backpressure = 20
circuit_breaker = true
[[nodes.faults]]
start_s = 3
end_s = 6
down = true
[[nodes]]
id = "node-2"
workers = 2
load_factor_ms = 25
backpressure = 20
circuit_breaker = { failure_threshold = 5, recovery_timeout_s = 1.0, half_open_max_calls = 2, success_threshold = 2 }
[[nodes.faults]]
start_s = 7
end_s = 10
error_rate = 0.8
[[nodes]]
id = "node-3"
workers = 2
load_factor_ms = 25
backpressure = 20
circuit_breaker = true
"""


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], dict, pathlib.Path]:
    """The finished ``testbed live run`` of :data:`FAULTS` at 0.5 s intervals, its results and its folder."""
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "faults.toml").write_text(FAULTS)
    out = tmp / "results.json"
    done = run("live", "run", str(tmp / "faults.toml"), "--interval", "0.5", "--json", str(out),
               "--plot", str(tmp / "timeline.png"), "--report", str(tmp / "report.html"),
               "--keep-requests", str(tmp / "requests.npz"), timeout=180)
    return done, finished(done, out), tmp


def events(r: dict, target: str, kind: str) -> list[tuple[float, str, str]]:
    return [(e["t"], e["from"], e["to"]) for e in r["timeline"]["events"] if e["target"] == target
            and e["kind"] == kind]


def played(r: dict, node: str, action: str) -> float:
    """When the runner's fault log says it did ``action`` (its first word) on ``node`` (run seconds)."""
    return next(f["at_s"] for f in r["faults"] if f["node"] == node and f["action"].split(":")[0] == action
                and f["result"] == "ok")


#: How late, after the runner's own record of a cause, its effect may show on a loaded 2-core machine
#: (a health check every 0.5 s, a registry TTL of 5 s, a scheduler that can lose a second or two): a missing
#: or misplaced event still fails, a slow machine does not.
SLACK_S = 4.0


def test_the_live_timeline_has_the_simulated_ones_schema(faults_run) -> None:
    _, r, tmp = faults_run
    sim = simulate(load(tmp / "faults.toml"), "solution", interval_s=0.5)["timeline"]
    live = r["timeline"]
    assert set(live) - {"events_missed"} == set(sim)
    assert live["interval_s"] == 0.5 and live["t"][:3] == [0.0, 0.5, 1.0] and len(live["t"]) >= 24
    assert set(live["overall"]) == set(sim["overall"]) and set(live["nodes"]) == set(sim["nodes"])
    for node, series in live["nodes"].items():
        assert set(series) == set(sim["nodes"][node])
        assert all(len(values) == len(live["t"]) for values in series.values())
    assert all(e["kind"] in EVENT_KINDS for e in live["events"])
    assert [e["t"] for e in live["events"]] == sorted(e["t"] for e in live["events"]) and live["events"][0]["t"] >= 0


def test_per_interval_requests_add_up_to_the_runs_rows(faults_run) -> None:
    _, r, tmp = faults_run
    t = r["timeline"]
    overall = t["overall"]
    assert sum(overall["requests"]) + t["later"] == r["live_requests"]
    for k, total in enumerate(overall["requests"]):
        kinds = sum(overall[name][k] for name in ("ok", "rate_limited", "backpressure", "circuit_open", "errors"))
        assert kinds == total
        assert sum(n["requests"][k] for n in t["nodes"].values()) <= total  # the rest had no node
    rows = np.load(tmp / "requests.npz")  # every request's row, as the generator recorded it
    assert sum(overall["requests"]) == rows["node"].size and t["later"] == 0
    for i, (node, series) in enumerate(t["nodes"].items()):
        assert sum(series["requests"]) == int((rows["node"] == i).sum()), node
    # The crashed node took nothing while it was down: from half a second after it was killed (what it held
    # fails then) to its restart, as the runner recorded them (a busy machine can play both late).
    killed, restarted = played(r, "node-1", "crash (SIGKILL)"), played(r, "node-1", "restart")
    down = t["nodes"]["node-1"]["requests"][int(killed / 0.5) + 2:int(restarted / 0.5)]
    assert len(down) >= 2 and sum(down) == 0, down


def test_the_fault_spans_are_what_the_runner_played_not_the_schedule(faults_run) -> None:
    _, r, _ = faults_run
    killed, restarted = played(r, "node-1", "crash (SIGKILL)"), played(r, "node-1", "restart")
    on, off = played(r, "node-2", "faults on"), played(r, "node-2", "faults off")
    assert 3.0 <= killed < restarted and 6.0 <= restarted and 7.0 <= on < off and 10.0 <= off
    assert events(r, "node-1", "fault") == [(killed, "ok", "down"), (restarted, "down", "ok")]
    assert events(r, "node-2", "fault") == [(on, "ok", "error_rate 0.8"), (off, "error_rate 0.8", "ok")]


def test_the_crash_and_the_return_are_on_the_timeline(faults_run) -> None:
    _, r, _ = faults_run
    killed, restarted = played(r, "node-1", "crash (SIGKILL)"), played(r, "node-1", "restart")
    health = events(r, "node-1", "health")
    assert [(old, new) for _, old, new in health] == [("up", "down"), ("down", "up")], health
    assert killed <= health[0][0] <= killed + SLACK_S  # refused connections or the next check
    assert restarted - 1.0 <= health[1][0] <= restarted + SLACK_S  # a check of the new process (it listened)
    membership = events(r, "node-1", "membership")
    assert ("alive", "died") in [(old, new) for _, old, new in membership]
    assert all(t > killed for t, _, _ in membership)  # nothing of node-1 changed before its crash
    died = next(t for t, old, new in membership if new == "died")
    assert died <= killed + 5.0 + SLACK_S  # silent for the registry's TTL (5 s), then dead


def test_node_2s_breaker_and_ejector_trip_while_it_fails(faults_run) -> None:
    _, r, _ = faults_run
    # From when the runner had the answer to its POST (the node took the fault a moment before: 1 s of slack).
    on = played(r, "node-2", "faults on") - 1.0
    breaker, ejector = events(r, "node-2", "breaker"), events(r, "node-2", "ejector")
    assert breaker and breaker[0][1:] == ("CLOSED", "OPEN") and on <= breaker[0][0] <= on + SLACK_S, breaker
    assert ejector and ejector[0][1:] == ("CLOSED", "OPEN") and on <= ejector[0][0] <= on + SLACK_S, ejector
    # Each trips before it moves on (OPEN -> HALF_OPEN ...), and nothing of node-2 changed before its fault.
    assert all(t >= on for t, _, _ in breaker + ejector)
    assert not events(r, "node-3", "breaker")  # nothing happened to it


def test_failed_work_counts_in_utilization(faults_run) -> None:
    """node-2 fails 80% of its work from 7 s: that work kept its workers busy too (its 500 says how long), so
    the timeline's utilization of node-2 adds up to the service time of every request it served, failed or not."""
    _, r, tmp = faults_run
    rows = np.load(tmp / "requests.npz")
    served = (rows["node"] == 1) & ~np.isnan(rows["start"])
    failed = served & (rows["outcome"] == Outcome.SERVER_ERROR)
    assert failed.sum() >= 5  # the failures that tripped its breaker (5 in a row): each carries its service time
    service = rows["end"][failed] - rows["start"][failed]
    assert (service > 0).all() and np.median(service) < 0.5
    busy_s = float(np.sum(rows["end"][served] - np.clip(rows["start"][served], 0.0, None)))
    line = r["timeline"]
    step, workers = line["interval_s"], 2
    covered = [min(step, line["end_s"] - t) for t in line["t"]]  # the last interval covers less
    counted_s = sum(u * workers * c for u, c in zip(line["nodes"]["node-2"]["utilization"], covered))
    assert counted_s == pytest.approx(busy_s, rel=1e-6)
    ok_only_s = float(np.sum(rows["end"][served & ~failed] - np.clip(rows["start"][served & ~failed], 0.0, None)))
    assert counted_s >= ok_only_s + 0.9 * float(service.sum())  # not the OK responses' alone


def test_the_plot_and_the_report_are_written(faults_run) -> None:
    done, _, tmp = faults_run
    assert (tmp / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp / "report.html").read_text()
    assert "<html" in html.lower() and "node-1" in html
    assert f"wrote {tmp / 'timeline.png'}" in done.stdout and f"wrote {tmp / 'report.html'}" in done.stdout


# -- the CLI's checks, before anything starts ------------------------------------------------------------------
@pytest.mark.parametrize(("args", "words"), [
    (("--interval", "0"), "--interval"),
    (("--interval", "nan"), "--interval"),
    (("--interval", "inf"), "--interval"),
    (("--interval", "soon"), "--interval"),
    (("--interval", "0.01"), "needs 9,000 intervals, more than a timeline holds (3,600); give an interval of 0.025 s or more"),
    (("--plot", "/proc/no/such/timeline.png"), "cannot write"),
    (("--report", "/proc/no/such/report.html"), "cannot write"),
])
def test_bad_flags_are_usage_errors_before_any_process_starts(args: tuple[str, ...], words: str) -> None:
    done = run("live", "run", "faults", *args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and "Traceback" not in done.stdout + done.stderr
    assert not started(done.stdout)


# -- the endpoints the runner reads --------------------------------------------------------------------------
def test_an_event_ring_numbers_what_it_keeps_and_counts_what_a_late_reader_missed() -> None:
    ring: EventRing[str] = EventRing(maxlen=3)
    assert ring.since(0) == ([], 0, 0)
    ring.extend("abcde")  # a and b pushed out
    assert ring.since(0) == (["c", "d", "e"], 5, 2)
    assert ring.since(3) == (["d", "e"], 5, 0)
    assert ring.since(5) == ([], 5, 0)
    assert ring.since(9) == ([], 5, 0)  # a reader of an earlier process starts over from next


async def test_registry_events_list_membership_changes_from_since_on(aiohttp_client, clock) -> None:
    client = await aiohttp_client(make_registry_app(ttl_s=5.0, clock=clock))
    resp = await client.post("/register", json={"id": "node-1", "address": "http://127.0.0.1:5001"})
    assert resp.status == 201
    first = await (await client.get("/events")).json()
    assert first == {"events": [{"kind": "joined", "node_id": "node-1", "at": 1000.0}], "next": 1, "missed": 0}
    clock.advance(6)  # silent past the TTL: dead, noticed by the read itself
    later = await (await client.get("/events?since=1")).json()
    assert later == {"events": [{"kind": "died", "node_id": "node-1", "at": 1005.0}], "next": 2, "missed": 0}
    assert (await (await client.get("/events?since=2")).json())["events"] == []


async def test_events_kept_bounds_the_registrys_ring_and_a_late_reader_is_told(aiohttp_client, clock) -> None:
    client = await aiohttp_client(make_registry_app(ttl_s=5.0, clock=clock, events_kept=2))
    for i in range(3):
        resp = await client.post("/register", json={"id": f"node-{i}", "address": f"http://127.0.0.1:{5001 + i}"})
        assert resp.status == 201
    body = await (await client.get("/events?since=0")).json()
    assert [e["node_id"] for e in body["events"]] == ["node-1", "node-2"] and body["missed"] == 1
    assert body["next"] == 3


@pytest.mark.parametrize("query", ["since=-1", "since=abc", "since=", "since=1.5", "since=%C2%B2",
                                   f"since={2**53 + 1}", "since=1&since=2"])
async def test_a_bad_since_is_a_json_400_on_both_endpoints(aiohttp_client, clock, query: str) -> None:
    registry = await aiohttp_client(make_registry_app(clock=clock))
    balancer = await aiohttp_client(make_balancer_app(BalancerConfig(nodes=(), seed=1), clock=clock))
    for client, path in ((registry, "/events"), (balancer, "/lb-events")):
        resp = await client.get(f"{path}?{query}")
        assert resp.status == 400 and resp.content_type == "application/json", (path, query)
        error = (await resp.json())["error"]
        assert error["code"] == "bad_query" and error["field"] == "since" and error["status"] == 400


async def test_balancer_events_list_health_flips_and_ejector_moves(aiohttp_client, aiohttp_server, clock) -> None:
    app = make_balancer_app(BalancerConfig(nodes=(), seed=1, eject_after_failures=1), clock=clock)
    client = await aiohttp_client(app)
    node = await aiohttp_server(make_node_app(NodeConfig(node_id="n1")))  # its own checks pass: no flips of theirs
    lb = app[STATE]
    entry = lb.join("n1", str(node.make_url("")).rstrip("/"), 1)
    lb.state.checked(entry, False, now=1001.0)
    lb.state.checked(entry, True, now=1002.5)
    attempt = lb.state.pick(now=1003.0)
    lb.state.answered(attempt, status=500, elapsed_s=0.01, now=1003.25)
    body = await (await client.get("/lb-events")).json()
    assert body["events"] == [
        {"t": 1001.0, "target": "n1", "kind": "health", "from": "up", "to": "down"},
        {"t": 1002.5, "target": "n1", "kind": "health", "from": "down", "to": "up"},
        {"t": 1003.25, "target": "n1", "kind": "ejector", "from": "CLOSED", "to": "OPEN", "detail": "trip"},
    ] and body["next"] == 3 and body["missed"] == 0
    assert (await (await client.get("/lb-events?since=3")).json())["events"] == []
    # No request comes; the ejection's time is up all the same: the next read shows it, at its deadline.
    clock.advance(2000.0)
    later = await (await client.get("/lb-events?since=3")).json()
    assert later["events"] == [{"t": 1003.25 + lb.config.ejection_time_s, "target": "n1", "kind": "ejector",
                                "from": "OPEN", "to": "HALF_OPEN", "detail": "cool_down_elapsed"}]


# -- the runner's faults, as played ------------------------------------------------------------------------------
class _Stage:
    """A cluster that plays along: its node's breaker listens but never answers; a crash and a restart take
    the given seconds on the runner's clock (moved by hand: no waiting)."""

    def __init__(self, scenario: Scenario, now: list[float], port: int, crash_s: float, restart_s: float) -> None:
        self.scenario, self.now, self.crash_s, self.restart_s = scenario, now, crash_s, restart_s
        self.admin_token = "t"
        self.balancer = self.registry = None
        self.nodes = {"node-1": SimpleNamespace(running=True, pid=1, started_at=0.0, url=f"http://127.0.0.1:{port}")}

    async def crash(self, node_id: str) -> None:
        self.nodes[node_id].running = False
        self.now[0] += self.crash_s

    async def restart(self, node_id: str) -> bool:
        self.now[0] += self.restart_s
        return True


async def test_a_crash_shows_when_it_was_played_and_a_lost_breaker_read_is_counted(tmp_path, monkeypatch) -> None:
    (tmp_path / "f.toml").write_text(FAULTS)
    scenario = load(tmp_path / "f.toml")
    now = [100.0]
    monkeypatch.setattr("live.run.clock", lambda: now[0])
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers: the read times out
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        # The crash is due at 3 s; the node takes 3 s to die and its restart 4 s, so it is back at 10 s, not 6 s.
        stage = _Stage(scenario, now, silent.getsockname()[1], crash_s=3.0, restart_s=4.0)
        t0 = 97.0
        watch = StateWatch(stage, t0)  # type: ignore[arg-type]  # what _fault and StateWatch read of a cluster
        node_id, fault, on, off = fault_schedule(scenario)[0]
        assert node_id == "node-1" and (on.t, on.new, off.t, off.old) == (3.0, "down", 6.0, "down")
        log: list[dict[str, Any]] = []
        events_played: list = []
        try:
            await _fault(stage, node_id, fault, t0, log, watch, scheduled=(on, off),  # type: ignore[arg-type]
                         played=events_played)
        finally:
            watch.close()
    assert [(e.t, e.target, e.kind, e.old, e.new) for e in events_played] == [
        (3.0, "node-1", "fault", "ok", "down"), (10.0, "node-1", "fault", "down", "ok")]
    assert [(f["at_s"], f["action"]) for f in log] == [(3.0, "read the breaker before the crash"),
                                                       (3.0, "crash (SIGKILL)"), (10.0, "restart")]
    assert f"no answer within {LAST_READ_S:g} s" in log[0]["result"] and "events_missed" in log[0]["result"]
    assert watch.missed == 1 and len(watch.lost) == 1 and "node-1's breaker" in watch.lost[0]


def test_a_live_timeline_lists_no_scheduled_faults_and_settles_as_the_simulators(tmp_path) -> None:
    (tmp_path / "f.toml").write_text(FAULTS)
    scenario = load(tmp_path / "f.toml")
    timeline = live_timeline(scenario, interval_s=0.5)
    assert timeline.as_dict()["events"] == []  # the runner adds the faults as it plays them
    simulated = type(timeline).for_scenario(scenario, interval_s=0.5)
    assert (timeline.interval_s, timeline.settle_s, timeline.node_ids) == (
        simulated.interval_s, simulated.settle_s, simulated.node_ids)
    assert [e["kind"] for e in simulated.as_dict()["events"]] == ["fault"] * 4


# -- the runner's reading of node breakers ---------------------------------------------------------------------
def _watch(scenario: Scenario, t0: float) -> StateWatch:
    return StateWatch(SimpleNamespace(scenario=scenario), t0)  # type: ignore[arg-type]  # reads .scenario only


def _status(generation: int, *transitions: tuple[str, str, str, float]) -> dict[str, Any]:
    return {"generation": generation,
            "transitions": [{"from": a, "to": b, "signal": s, "at": at} for a, b, s, at in transitions]}


def test_breaker_reads_are_deduplicated_and_a_restart_resets_an_open_breaker(tmp_path) -> None:
    (tmp_path / "f.toml").write_text(FAULTS)
    watch = _watch(load(tmp_path / "f.toml"), t0=100.0)
    trip = ("CLOSED", "OPEN", "trip", 103.0)
    watch._breaker_read("node-1", 11, 90.0, _status(1, trip))
    watch._breaker_read("node-1", 11, 90.0, _status(1, trip))  # read again: nothing new
    # A new process (pid 12, listening at 106.5): its breaker starts CLOSED, the old one was OPEN.
    watch._breaker_read("node-1", 12, 106.5, _status(0))
    watch._breaker_read("node-1", 11, 90.0, _status(2, trip, ("OPEN", "HALF_OPEN", "cool_down_elapsed", 108.0)))
    watch._breaker_read("node-1", 12, 106.5, _status(1, ("CLOSED", "OPEN", "trip", 109.0)))
    got = [(e.t, e.old, e.new, e.detail) for e in watch.timeline_events()]
    assert got == [(3.0, "CLOSED", "OPEN", "trip"), (6.5, "OPEN", "CLOSED", "restarted"),
                   (9.0, "CLOSED", "OPEN", "trip")]  # the crashed process's late answer is ignored
    assert watch.missed == 0
    # Transitions its history no longer held (its generation moved by 3, two are listed): one missed.
    watch._breaker_read("node-1", 12, 106.5, _status(4, ("OPEN", "HALF_OPEN", "cool_down_elapsed", 110.0),
                                                     ("HALF_OPEN", "CLOSED", "probes_passed", 110.5)))
    assert watch.missed == 1
    watch.close()


def test_compare_both_overlays_the_simulated_and_live_timelines_of_each_point(tmp_path) -> None:
    (tmp_path / "small.toml").write_text(SMALL.format(duration=4))
    png = tmp_path / "both.png"
    done = run("compare", str(tmp_path / "small.toml"), "--mode", "both", "--strategies", "least_connections",
               "--loads", "0.1,0.2", "--reps", "1", "--impl", "solution", "--plot", str(png), "--json", "",
               timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == ["both-timeline-least_connections-0.10.png", "both-timeline-least_connections-0.20.png",
                     "both.png"]  # the sweep at PLOT, each point's timelines beside it
    for name in drawn:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"wrote {tmp_path / name}" in done.stdout
    assert timeline_path("out/c.png", "round_robin", 0.5) == pathlib.Path("out/c-timeline-round_robin-0.50.png")
