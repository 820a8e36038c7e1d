"""Timelines: each series against a brute-force count of the same rows, whatever the chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.circuit_breaker import Signal, State, StateChange
from core.events import TimelineEvent
from core.registry import MembershipChange
from core.results import Outcome
from core.timeline import (
    INTERVAL_CENTROIDS, MAX_INTERVALS, Timeline, breaker_events, default_interval_s, membership_events,
    smallest_interval_s,
)

STEP = 0.5


def rows(n: int = 4000, nodes: int = 3, seed: int = 1, horizon: float = 10.0) -> dict[str, np.ndarray]:
    """Random rows in completion order: some never served (NaN start), some without a node."""
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0, horizon, n))
    wait = rng.exponential(0.2, n)
    service = rng.exponential(0.4, n)
    node = rng.integers(-1, nodes, n).astype(np.intc)
    outcome = rng.choice([int(o) for o in Outcome], n, p=[0.7, 0.05, 0.05, 0.05, 0.05, 0.04, 0.03, 0.03])
    outcome = np.where(node < 0, int(Outcome.NO_BACKEND), outcome).astype(np.int8)
    served = (outcome == Outcome.OK) | (outcome == Outcome.SERVER_ERROR)
    start = np.where(served, arrival + wait, np.nan)
    end = np.where(served, start + service, arrival + 0.001)
    cut = rng.random(n) < 0.02  # cut off by the balancer's timeout: the client's end before the service started
    end = np.where(cut & served, arrival + 0.01, end)
    order = np.argsort(end, kind="stable")
    return {"arrival": arrival[order], "node": node[order], "start": start[order], "end": end[order],
            "outcome": outcome[order]}


def timeline_of(columns: dict[str, np.ndarray], chunk: int, nodes: int = 3, **kw) -> dict:
    t = Timeline(interval_s=STEP, duration_s=10.0, node_ids=[f"n{i}" for i in range(nodes)], workers=[2] * nodes, **kw)
    for lo in range(0, columns["arrival"].size, chunk):
        t.fold({k: v[lo:lo + chunk] for k, v in columns.items()})
    return t.as_dict()


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return rows()


def test_counts_are_by_the_interval_the_response_completed_in(data) -> None:
    tl = timeline_of(data, chunk=997)
    k = np.floor(data["end"] / STEP).astype(int)
    n = len(tl["t"])
    assert tl["t"][:3] == [0.0, 0.5, 1.0] and n == k.max() + 1  # on past the run's end while responses complete
    assert tl["overall"]["requests"] == np.bincount(k, minlength=n).tolist()
    ok = data["outcome"] == Outcome.OK
    assert tl["overall"]["ok"] == np.bincount(k[ok], minlength=n).tolist()
    covered = np.full(n, STEP)
    covered[-1] = data["end"].max() - (n - 1) * STEP  # the last interval ends with the last response
    assert tl["end_s"] == pytest.approx(data["end"].max())
    assert tl["overall"]["throughput_rps"] == pytest.approx((np.bincount(k[ok], minlength=n) / covered).tolist())
    errors = np.isin(data["outcome"], [4, 5, 6, 7])
    assert tl["overall"]["errors"] == np.bincount(k[errors], minlength=n).tolist()
    for i in range(3):
        mine = data["node"] == i
        assert tl["nodes"][f"n{i}"]["requests"] == np.bincount(k[mine], minlength=n).tolist()
        assert tl["nodes"][f"n{i}"]["rate_limited"] == np.bincount(
            k[mine & (data["outcome"] == Outcome.RATE_LIMITED)], minlength=n).tolist()
    assert sum(tl["overall"]["requests"]) == data["arrival"].size


def test_in_flight_is_what_a_gauge_reads_at_each_interval_end(data) -> None:
    tl = timeline_of(data, chunk=333)
    ends = (np.arange(len(tl["t"])) + 1) * STEP
    a, e = data["arrival"], data["end"]
    want = [int(((a < t) & (e >= t)).sum()) for t in ends]
    assert tl["overall"]["in_flight"] == want
    mine = data["node"] == 1
    assert tl["nodes"]["n1"]["in_flight"] == [int(((a[mine] < t) & (e[mine] >= t)).sum()) for t in ends]


def test_utilization_is_service_time_inside_each_interval(data) -> None:
    tl = timeline_of(data, chunk=500)
    served = ~np.isnan(data["start"]) & (data["node"] >= 0)
    for i in range(3):
        s, e = data["start"][served & (data["node"] == i)], data["end"][served & (data["node"] == i)]
        want = [float(np.clip(np.minimum(e, lo + STEP) - np.maximum(np.minimum(s, e), lo), 0, None).sum())
                / (2 * min(STEP, tl["end_s"] - lo)) for lo in tl["t"]]
        assert tl["nodes"][f"n{i}"]["utilization"] == pytest.approx(want, abs=1e-9)
    assert tl["overall"]["utilization"] == pytest.approx(
        [sum(tl["nodes"][f"n{i}"]["utilization"][k] for i in range(3)) / 3 for k in range(len(tl["t"]))])


def test_share_is_of_the_requests_a_node_took(data) -> None:
    tl = timeline_of(data, chunk=4000)
    for k in range(len(tl["t"])):
        shares = [tl["nodes"][f"n{i}"]["share"][k] for i in range(3)]
        took = [tl["nodes"][f"n{i}"]["requests"][k] for i in range(3)]
        if sum(took):
            assert sum(shares) == pytest.approx(1.0)
            assert shares == pytest.approx([t / sum(took) for t in took])
        else:
            assert shares == [None] * 3


def test_percentiles_are_numpys_up_to_the_digest_size_and_none_when_empty(data) -> None:
    tl = timeline_of(data, chunk=123)
    k = np.floor(data["end"] / STEP).astype(int)
    ok = data["outcome"] == Outcome.OK
    response_ms = (data["end"] - data["arrival"]) * 1000.0
    checked = 0
    for i in range(3):
        for interval in range(len(tl["t"])):
            values = response_ms[ok & (data["node"] == i) & (k == interval)]
            got = [tl["nodes"][f"n{i}"][p][interval] for p in ("p50_ms", "p95_ms", "p99_ms")]
            if values.size == 0:
                assert got == [None] * 3
            elif values.size <= INTERVAL_CENTROIDS:
                assert got == pytest.approx(np.percentile(values, [50, 95, 99]).tolist(), rel=1e-6)
                checked += 1
    assert checked > 20


def test_chunking_changes_no_count(data) -> None:
    one, many = timeline_of(data, chunk=10**6), timeline_of(data, chunk=7)
    for name in ("requests", "ok", "errors", "in_flight", "circuit_open"):
        assert one["overall"][name] == many["overall"][name]
    assert one["nodes"]["n2"]["utilization"] == pytest.approx(many["nodes"]["n2"]["utilization"], abs=1e-9)


def test_over_the_node_cap_only_the_overall_series_are_kept(data) -> None:
    full, capped = timeline_of(data, chunk=1000), timeline_of(data, chunk=1000, node_series=2)
    assert capped["nodes"] == {} and capped["nodes_omitted"] == 3 and full["nodes_omitted"] == 0
    for name in ("requests", "ok", "in_flight"):
        assert capped["overall"][name] == full["overall"][name]
    assert capped["overall"]["utilization"] == pytest.approx(full["overall"]["utilization"])


@pytest.mark.parametrize("interval", [0, -1.0, math.nan, math.inf])
def test_an_interval_must_be_a_positive_number(interval) -> None:
    with pytest.raises(ValueError, match="an interval must be a positive number of seconds"):
        Timeline(interval_s=interval, duration_s=10, node_ids=["a"], workers=[1])


def test_too_many_intervals_names_the_smallest_interval_that_works() -> None:
    with pytest.raises(ValueError, match=r"needs 7,200 intervals, more than a timeline holds \(3,600\); give an "
                                         r"interval of 2 s or more"):
        Timeline(interval_s=1.0, duration_s=2 * MAX_INTERVALS, node_ids=["a"], workers=[1])
    with pytest.raises(ValueError, match=r"needs over 10\^15 intervals"):  # a tiny interval: no overflow
        Timeline(interval_s=1e-310, duration_s=90, node_ids=["a"], workers=[1])


def test_responses_beyond_the_last_interval_are_counted_as_later() -> None:
    t = Timeline(interval_s=1.0, duration_s=10, node_ids=["a"], workers=[1])
    t.fold({"arrival": np.array([1.0, 2.0]), "node": np.array([0, 0], dtype=np.intc),
            "start": np.array([1.0, 2.0]), "end": np.array([1.5, MAX_INTERVALS + 5.0]),
            "outcome": np.array([0, 0], dtype=np.int8)})
    tl = t.as_dict()
    assert tl["later"] == 1 and sum(tl["overall"]["requests"]) == 1
    assert len(tl["t"]) == 10  # nothing else completed after the run's end
    assert tl["overall"]["in_flight"] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]  # the late one is out all along


def test_events_come_out_sorted_and_converted() -> None:
    t = Timeline(interval_s=1.0, duration_s=10, node_ids=["a"], workers=[1])
    t.add_events(breaker_events("a", "breaker", [
        StateChange("a", State.CLOSED, State.OPEN, Signal.TRIP, 105.0),
        StateChange("a", State.OPEN, State.HALF_OPEN, Signal.COOL_DOWN_ELAPSED, 107.0)], t0=100.0))
    t.add_events(membership_events([MembershipChange("joined", "a", 100.5), MembershipChange("died", "a", 104.0),
                                    MembershipChange("revived", "a", 106.0)], t0=100.0))
    t.add_events([TimelineEvent(1.0, "a", "fault", "ok", "down")])
    events = t.as_dict()["events"]
    assert [e["t"] for e in events] == [0.5, 1.0, 4.0, 5.0, 6.0, 7.0]
    assert events[0] == {"t": 0.5, "target": "a", "kind": "membership", "from": "absent", "to": "joined"}
    assert events[2]["from"] == "alive" and events[4]["from"] == "dead"
    assert events[3] == {"t": 5.0, "target": "a", "kind": "breaker", "from": "CLOSED", "to": "OPEN",
                         "detail": "trip"}


def test_the_default_interval_is_a_second_or_the_first_round_one_that_fits() -> None:
    assert default_interval_s(90) == 1.0 and default_interval_s(3600) == 1.0
    assert [default_interval_s(d) for d in (3601, 7300, 18001, 40000, 92_000)] == [2.0, 5.0, 10.0, 20.0, 50.0]
    for d in (1, 3601, 10**6):
        Timeline(interval_s=default_interval_s(d), duration_s=d, node_ids=["a"], workers=[1])


@pytest.mark.parametrize("duration", [3601, 3600.5, 7777, 10**6, 12345.678, 3600 * 2.5])
def test_the_smallest_interval_named_fits_and_three_digits_lower_would_not(duration) -> None:
    smallest = smallest_interval_s(duration)
    Timeline(interval_s=smallest, duration_s=duration, node_ids=["a"], workers=[1])
    below = smallest - 10.0 ** (math.floor(math.log10(smallest)) - 2)
    with pytest.raises(ValueError, match=f"give an interval of {smallest:g} s or more"):
        Timeline(interval_s=below, duration_s=duration, node_ids=["a"], workers=[1])


def test_old_intervals_settle_to_their_percentiles_and_free_their_digests() -> None:
    """Memory holds digests for the last settle_s of completions only; what comes later for a settled interval
    still counts, and is named."""
    rng = np.random.default_rng(5)
    t = Timeline(interval_s=1.0, duration_s=600, node_ids=[f"n{i}" for i in range(20)], workers=[1] * 20,
                 settle_s=10.0)
    open_digests = []
    exact: dict[int, list[float]] = {}
    for second in range(600):
        arrival = second + np.sort(rng.uniform(0, 1, 100))
        response = rng.exponential(0.05, 100)
        t.fold({"arrival": arrival, "node": rng.integers(0, 20, 100).astype(np.intc), "start": arrival,
                "end": arrival + response, "outcome": np.zeros(100, dtype=np.int8)})
        open_digests.append(len(t._digests))
        for k, r in zip(np.floor(arrival + response).astype(int), response):
            exact.setdefault(int(k), []).append(r * 1000.0)
    assert max(open_digests) <= 20 * 13  # ~11 intervals of 20 nodes open at most, never 600 x 20
    t.fold({"arrival": np.array([3.0]), "node": np.array([0], dtype=np.intc), "start": np.array([3.0]),
            "end": np.array([3.5]), "outcome": np.array([0], dtype=np.int8)})  # late, for a settled interval
    tl = t.as_dict()
    assert tl["unsettled"] == 1 and tl["overall"]["ok"][3] == len(exact[3]) + 1
    for k in (0, 100, 599):  # settled or not, each interval's percentiles are numpy's (up to 200 values)
        assert [tl["overall"][p][k] for p in ("p50_ms", "p95_ms", "p99_ms")] == pytest.approx(
            np.percentile(exact[k], [50, 95, 99]).tolist(), rel=1e-6)
