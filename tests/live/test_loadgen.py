"""The load generator against an in-process server: the simulator's arrivals, read back right."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time

import numpy as np
import pytest
from aiohttp import web

from core.results import Outcome, summarize
from core.scenario import Workload
from core.workload import open_loop, streams
from experiments.report import run_summary
from live.loadgen import LoadGenerator


def recording_app(seen: list[str], reply) -> web.Application:
    async def work(request: web.Request) -> web.Response:
        seen.append(request.headers.get("X-Client-ID", ""))
        return reply(len(seen))
    app = web.Application()
    app.router.add_get("/work", work)
    return app


async def test_open_loop_sends_the_simulators_arrivals_with_their_clients(aiohttp_server) -> None:
    seen: list[str] = []
    server = await aiohttp_server(recording_app(seen, lambda n: web.json_response(
        {"service_ms": 0.0}, headers={"X-Node-ID": "b"})))
    workload = Workload(rate_per_s=200.0, clients=7)
    gen = LoadGenerator(str(server.make_url("")).rstrip("/"), workload, seed=5, duration_s=1.5, node_ids=["a", "b"])
    await gen.run()

    schedule = list(itertools.takewhile(lambda p: p[0] < 1.5, (
        (t, client) for t, client in _times(open_loop(workload, *streams(5, 2))))))
    c = gen.log.columns()
    assert len(gen.log) == len(schedule) == gen.sent == gen.completed
    assert sorted(c["arrival"].tolist()) == pytest.approx([t for t, _ in schedule])
    assert sorted(seen) == sorted(client for _, client in schedule)  # every client id, as often as scheduled
    assert (c["outcome"] == Outcome.OK).all() and (c["node"] == 1).all()
    assert (c["end"] >= c["arrival"]).all()
    # How well it kept up, with a margin a busy machine keeps (with a CPU-bound neighbour on these 2 cores,
    # server and generator in one loop: p50 5.4 ms, p99 44 ms late): every request sent, the median well
    # within the 5 ms between arrivals' worth of slack a busy loop needs, none a quarter of a second late.
    stats = gen.generator_stats(0.0)
    assert stats["sent_rate_per_s"] == stats["scheduled_rate_per_s"] and stats["not_sent"] == {
        "max_in_flight": 0, "out_of_time": 0}
    assert stats["lag_ms"]["p50"] < 25 and stats["lag_ms"]["p99"] < 250, stats["lag_ms"]


def _times(pairs):
    t = 0.0
    for gap, client in pairs:
        t += gap
        yield t, client


async def test_responses_are_read_back_as_outcomes_nodes_and_service_starts(aiohttp_server) -> None:
    replies = {
        1: web.json_response({"service_ms": 40.0}, headers={"X-Node-ID": "a"}),
        2: web.json_response({"error": {"status": 429, "code": "rate_limited", "message": "x"}}, status=429,
                             headers={"X-Node-ID": "b"}),
        3: web.json_response({"error": {"status": 502, "code": "backend_unreachable", "message": "x",
                                        "backend": "b"}}, status=502),
        4: web.json_response({"error": {"status": 503, "code": "no_healthy_backend", "message": "x"}}, status=503),
        5: web.Response(status=500, text="<html>not json</html>"),
        6: web.json_response({"error": {"status": 500, "code": "work_failed", "message": "x", "node_id": "a",
                                        "service_ms": 30.0}}, status=500, headers={"X-Node-ID": "a"}),
    }
    seen: list[str] = []
    server = await aiohttp_server(recording_app(seen, lambda n: replies[n]))
    gen = LoadGenerator(str(server.make_url("")).rstrip("/"), Workload(arrival="constant", rate_per_s=10.0),
                        seed=0, duration_s=0.65, node_ids=["a", "b"])
    await gen.run()
    c = gen.log.columns()
    order = np.argsort(c["arrival"])
    assert c["outcome"][order].tolist() == [Outcome.OK, Outcome.RATE_LIMITED, Outcome.CONNECT_ERROR,
                                            Outcome.NO_BACKEND, Outcome.SERVER_ERROR, Outcome.SERVER_ERROR]
    assert c["node"][order].tolist() == [0, 1, 1, -1, -1, 0]
    first, failed = order[0], order[5]
    assert c["end"][first] - c["start"][first] == pytest.approx(0.040)  # the node's own service time
    assert c["end"][failed] - c["start"][failed] == pytest.approx(0.030)  # failed work was served too
    assert np.isnan(c["start"][order[1:5]]).all()  # refusals and errors without a node's work: never served


async def test_an_unreachable_target_is_a_connect_error_for_every_request() -> None:
    gen = LoadGenerator("http://127.0.0.1:9", Workload(arrival="constant", rate_per_s=20.0), seed=0,
                        duration_s=0.3, node_ids=["a"])
    await gen.run()
    assert len(gen.log) == 5 and (gen.log.columns()["outcome"] == Outcome.CONNECT_ERROR).all()


def rows(gen: LoadGenerator, n: int, lag_s, response_s) -> None:
    """``n`` requests scheduled every 10 ms, the i-th sent ``lag_s(i)`` late and answered ``response_s(i)`` later."""
    for i in range(n):
        arrival = i * 0.01
        gen.log.record(arrival, 0, float("nan"), arrival + lag_s(i) + response_s(i), Outcome.OK)
        gen.lag.append(lag_s(i))


def summary_of(stats: dict) -> str:
    result = {"scenario": "s", "mode": "live", "strategy": "x", "seed": 0, "warmup_s": 0, "duration_s": 10,
              "requests": {k: 0 for k in ("sent", "ok", "rate_limited", "backpressure", "circuit_open", "errors")},
              "throughput_rps": 0.0, "latency_ms": {k: None for k in ("mean", "p50", "p90", "p95", "p99", "max")},
              "nodes": {}, "generator": stats}
    return run_summary(result)


def test_a_generator_that_fell_behind_says_so() -> None:
    gen = LoadGenerator("http://127.0.0.1:9", Workload(rate_per_s=100.0), seed=0, duration_s=10.0, node_ids=["a"])
    rows(gen, 1000, lambda i: (i % 100) / 1000, lambda i: 0.02)  # 20 ms responses, sent up to 99 ms late
    stats = gen.generator_stats(0.0)
    assert stats["kept_up"] is False
    assert stats["lag_in_latency_ms"]["moved"]["mean"] == pytest.approx(49.5)
    assert "its own delay moved the mean latency by 49.5 ms of 69.5" in stats["problems"][0]
    assert "WARNING: the load generator could not offer this load on this machine" in summary_of(stats)


def test_a_busy_machine_that_sends_a_few_requests_6_ms_late_still_kept_up() -> None:
    # What a CPU-bound neighbour does: 2% of the requests leave 6 ms late, under 10-40 ms responses.
    gen = LoadGenerator("http://127.0.0.1:9", Workload(rate_per_s=100.0), seed=0, duration_s=10.0, node_ids=["a"])
    rows(gen, 1000, lambda i: 0.006 if i % 50 == 7 else 0.0002, lambda i: 0.010 + 0.030 * ((i * 37) % 100) / 100)
    stats = gen.generator_stats(0.0)
    assert stats["lag_ms"]["p99"] == pytest.approx(6.0)
    assert stats["kept_up"] is True, stats["problems"]
    assert max(stats["lag_in_latency_ms"]["moved"].values()) < 1.0
    assert "note: 1% of the requests went out more than 6.0 ms late" in summary_of(stats)
    assert "WARNING" not in summary_of(stats)


def silent_app() -> tuple[web.Application, list]:
    """/work never answers (until the server is closed)."""
    hold: list = []

    async def work(request: web.Request) -> web.Response:
        hold.append(request)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")
    app = web.Application()
    app.router.add_get("/work", work)
    return app, hold


async def test_outstanding_requests_are_capped_and_the_drain_is_bounded(aiohttp_server) -> None:
    app, hold = silent_app()
    server = await aiohttp_server(app)
    gen = LoadGenerator(str(server.make_url("")).rstrip("/"), Workload(arrival="constant", rate_per_s=100.0),
                        seed=0, duration_s=0.5, node_ids=["a"], timeout_s=60.0, max_in_flight=5, drain_s=0.2)
    # No response ever comes and each request would wait 60 s: only the drain bound ends the run.
    await asyncio.wait_for(gen.run(), 10)
    c = gen.log.columns()
    assert len(gen.log) == 5 and (c["outcome"] == Outcome.TIMEOUT).all()  # cut at the drain: timeouts, not lost
    assert len(gen.unsent["max_in_flight"]) == 44 and len(gen.unsent["out_of_time"]) == 0
    stats = gen.generator_stats(0.0)
    assert stats["not_sent"] == {"max_in_flight": 44, "out_of_time": 0} and stats["cut_at_drain"] == 5
    assert stats["peak_in_flight"] == 5 and stats["kept_up"] is False
    assert "it did not send 44 requests because 5 were outstanding (--max-in-flight)" in stats["problems"]
    summary = summarize(gen.log, scenario="s", mode="live", seed=0, strategy="x", duration_s=0.5, warmup_s=0.0,
                        node_ids=["a"], node_workers=[1], not_sent=gen.not_sent)
    assert summary["requests"]["sent"] == 49 and summary["errors_detail"] == {
        "server": 0, "connect": 0, "no_backend": 0, "timeout": 5, "not_sent": 44}


class SlowSender:
    """A pool whose every request costs the generator 2 ms of CPU: it cannot send more than ~500/s."""

    async def request(self, *args):
        started = time.perf_counter()
        while time.perf_counter() - started < 0.002:
            pass
        return 200, [], b'{"service_ms": 0}'

    def close(self) -> None:
        pass


async def test_a_generator_too_slow_for_the_rate_stops_at_its_duration_and_counts_the_rest() -> None:
    workload = Workload(arrival="constant", rate_per_s=4000.0)
    gen = LoadGenerator("http://127.0.0.1:9", workload, seed=0, duration_s=0.5, node_ids=["a"])
    gen.pool = SlowSender()  # type: ignore[assignment]
    await asyncio.wait_for(gen.run(), 10)
    late = len(gen.unsent["out_of_time"])
    assert len(gen.log) + late == 2000  # every arrival of the 0.5 s: sent, or recorded as not sent
    assert late > 1000 and len(gen.unsent["max_in_flight"]) == 0
    stats = gen.generator_stats(0.0)
    assert stats["kept_up"] is False and f"({late} not sent when its time was up)" in stats["problems"][-1]


async def test_a_generator_a_moment_late_at_the_end_still_sends_its_last_arrivals() -> None:
    class FirstIsSlow(SlowSender):
        """The first request holds the loop until 0.55 s: the arrivals due at 0.2-0.4 s leave after the end."""

        async def request(self, *args):
            while not gen.log and time.perf_counter() - gen.t0 < 0.55:
                pass
            return 200, [], b'{"service_ms": 0}'

    gen = LoadGenerator("http://127.0.0.1:9", Workload(arrival="constant", rate_per_s=10.0), seed=0,
                        duration_s=0.5, node_ids=["a"])
    gen.pool = FirstIsSlow()  # type: ignore[assignment]
    await asyncio.wait_for(gen.run(), 10)
    assert len(gen.log) == 4 and len(gen.not_sent) == 0  # 0.1 .. 0.4 s, the last three sent late, not dropped


async def test_whatever_the_transport_throws_is_recorded_and_counted_never_printed(caplog) -> None:
    class Broken:
        async def request(self, *args):
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

        def close(self) -> None:
            pass

    gen = LoadGenerator("http://127.0.0.1:9", Workload(arrival="constant", rate_per_s=20.0), seed=0,
                        duration_s=0.3, node_ids=["a"])
    gen.pool = Broken()  # type: ignore[assignment]
    await gen.run()
    gc.collect()  # an unretrieved task exception is logged when the task is collected
    assert len(gen.log) == 5 and (gen.log.columns()["outcome"] == Outcome.SERVER_ERROR).all()
    assert gen.generator_stats(0.0)["loop_errors"] == {"RuntimeError": 5}
    assert "never retrieved" not in caplog.text


def test_the_default_drain_waits_as_long_as_the_balancer_can_take() -> None:
    """Nothing the simulator would count as answered is cut: by default a live run waits for its last
    responses as long as the balancer's timeout (plus a margin), and a generator as long as its own."""
    from live.limits import default_drain_s
    from live.loadgen import LoadGenerator

    assert default_drain_s(30.0) == 31.0
    gen = LoadGenerator("http://127.0.0.1:1", Workload(), seed=0, duration_s=1.0, node_ids=["a"], timeout_s=12.0)
    assert gen.drain_s == 12.0
