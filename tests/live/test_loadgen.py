"""The load generator against an in-process server: the simulator's arrivals, read back right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from aiohttp import web

from core.results import Outcome
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
    stats = gen.generator_stats(0.0)
    assert stats["kept_up"] and stats["lag_ms"]["p50"] < 5


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
    }
    seen: list[str] = []
    server = await aiohttp_server(recording_app(seen, lambda n: replies[n]))
    gen = LoadGenerator(str(server.make_url("")).rstrip("/"), Workload(arrival="constant", rate_per_s=10.0),
                        seed=0, duration_s=0.55, node_ids=["a", "b"])
    await gen.run()
    c = gen.log.columns()
    order = np.argsort(c["arrival"])
    assert c["outcome"][order].tolist() == [Outcome.OK, Outcome.RATE_LIMITED, Outcome.CONNECT_ERROR,
                                            Outcome.NO_BACKEND, Outcome.SERVER_ERROR]
    assert c["node"][order].tolist() == [0, 1, 1, -1, -1]
    first = order[0]
    assert c["end"][first] - c["start"][first] == pytest.approx(0.040)  # the node's own service time
    assert np.isnan(c["start"][order[1:]]).all()


async def test_an_unreachable_target_is_a_connect_error_for_every_request() -> None:
    gen = LoadGenerator("http://127.0.0.1:9", Workload(arrival="constant", rate_per_s=20.0), seed=0,
                        duration_s=0.3, node_ids=["a"])
    await gen.run()
    assert len(gen.log) == 5 and (gen.log.columns()["outcome"] == Outcome.CONNECT_ERROR).all()


def test_a_generator_that_fell_behind_says_so() -> None:
    gen = LoadGenerator("http://127.0.0.1:9", Workload(rate_per_s=100.0), seed=0, duration_s=10.0, node_ids=["a"])
    for i in range(1000):  # scheduled every 10 ms, but sent ever later, up to 99 ms late
        gen.log.record(i * 0.01, 0, float("nan"), i * 0.01 + 0.2, Outcome.OK)
        gen.lag.append((i % 100) / 1000)
        gen.sent_at.append(i * 0.01 + (i % 100) / 1000)
    stats = gen.generator_stats(0.0)
    assert stats["kept_up"] is False
    assert "more than 98.0 ms late (limit 5 ms)" in stats["problems"][0]
    result = {"scenario": "s", "mode": "live", "strategy": "x", "seed": 0, "warmup_s": 0, "duration_s": 10,
              "requests": {k: 0 for k in ("sent", "ok", "rate_limited", "backpressure", "circuit_open", "errors")},
              "throughput_rps": 0.0, "latency_ms": {k: None for k in ("mean", "p50", "p90", "p95", "p99", "max")},
              "nodes": {}, "generator": stats}
    assert "WARNING: the load generator could not offer this load on this machine" in run_summary(result)
