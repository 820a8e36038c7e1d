"""The balancer's dashboard over HTTP (``live/dashboard.py``): the page and its files, the event stream's JSON,
one snapshot shared by every viewer, the cap on streams, nodes that do not answer or answer nonsense, shutdown."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any, Callable

import pytest
from aiohttp import web

from core._validate import ConfigError
from live.balancer import BalancerConfig, make_balancer_app
from live.dashboard import CSP, DASHBOARD, DashboardConfig, node_view
from live.node import NodeConfig, make_node_app
from solutions.impl import strategy_class
from tests.live.polling import until
from tests.live.procs import Proc, free_port, request

FAST = DashboardConfig(interval_s=0.2, node_timeout_s=0.2)


async def node_urls(aiohttp_server: Any, *configs: dict[str, Any]) -> list[str]:
    servers = [await aiohttp_server(make_node_app(NodeConfig(node_id=f"node-{i + 1}", **c)))
               for i, c in enumerate(configs)]
    return [str(s.make_url("")).rstrip("/") for s in servers]


async def balancer(aiohttp_client: Any, urls: list[str], dashboard: DashboardConfig = FAST, **config: Any) -> Any:
    cfg = BalancerConfig(nodes=tuple(urls), seed=1, **config)
    app = make_balancer_app(cfg, strategy_cls=strategy_class(cfg.strategy, "solution"), dashboard=dashboard)
    return await aiohttp_client(app)


def recording_backend(paths: list[str], answers: dict[str, Callable[[], Any]] | None = None) -> web.Application:
    """A backend that notes every path asked and answers 200 (or what ``answers`` says for a path)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        paths.append(request.path)
        answer = (answers or {}).get(request.path)
        if answer is not None:
            return await answer()
        return web.json_response({"status": "ok"})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def read_event(resp: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    """The next ``data:`` event of an SSE response, parsed."""
    async with asyncio.timeout(timeout_s):
        while True:
            line = await resp.content.readline()
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                assert (await resp.content.readline()) == b"\n", "an event is one data line and a blank line"
                return json.loads(line[6:])


async def event_where(resp: Any, check: Callable[[dict[str, Any]], bool], what: str,
                      timeout_s: float = 10.0) -> dict[str, Any]:
    """The first event for which ``check`` holds, within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                event = await read_event(resp)
                if check(event):
                    return event
    except TimeoutError:
        raise AssertionError(f"no event with {what} within {timeout_s:g} s") from None


async def test_the_page_and_its_files_are_the_balancers_own(aiohttp_client: Any, aiohttp_server: Any) -> None:
    seen: list[str] = []
    backend = await aiohttp_server(recording_backend(seen))
    lb = await balancer(aiohttp_client, [str(backend.make_url("")).rstrip("/")])
    page = await lb.get("/dashboard")
    assert page.status == 200 and page.content_type == "text/html"
    assert page.headers["Content-Security-Policy"] == CSP and "script-src 'self'" in CSP
    html = await page.text()
    assert '<script src="/dashboard/dashboard.js" defer></script>' in html and "<script>" not in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing from elsewhere: no CDN, no fonts
    for name, kind in (("dashboard.js", "application/javascript"), ("dashboard.css", "text/css")):
        resp = await lb.get(f"/dashboard/{name}")
        assert resp.status == 200 and resp.content_type == kind and len(await resp.read()) > 1000
    js = await (await lb.get("/dashboard/dashboard.js")).text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "eval(" not in js
    for path in ("/dashboard/nothing/here", "/dashboard/", "/dashboard/dashboard.html"):
        missing = await lb.get(path)
        assert missing.status == 404 and (await missing.json())["error"]["code"] == "not_found"
    head = await lb.head("/dashboard/events")
    assert head.status == 200 and head.headers["Content-Type"] == "text/event-stream"
    assert (await lb.get("/other")).status == 200  # the proxy still proxies
    assert [p for p in seen if p != "/health"] == ["/other"], "a /dashboard path reached the backend"


async def test_the_stream_carries_the_balancers_books_and_the_nodes_state(aiohttp_client: Any,
                                                                          aiohttp_server: Any) -> None:
    urls = await node_urls(aiohttp_server, {"circuit_breaker": True, "backpressure": 10, "error_rate": 1.0},
                           {"circuit_breaker": False})
    lb = await balancer(aiohttp_client, urls, eject_after_failures=0)
    async with lb.get("/dashboard/events") as stream:
        assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
        assert stream.headers["Cache-Control"] == "no-cache"
        assert await stream.content.readline() == b"retry: 2000\n"
        first = await read_event(stream)
        assert first["balancer"]["per_s"] is None  # the first snapshot is the baseline of the rates
        statuses = [(await lb.get("/work")).status for _ in range(6)]
        assert sorted(statuses) == [200] * 3 + [500] * 3
        event = await event_where(stream, lambda e: e["balancer"]["requests"] == 6 and all(
            b["node"]["reach"] == "ok" for b in e["backends"]) and e["backends"][1]["samples"] == 3,
            "six requests counted, both nodes answering and node-2's answers in the window")
    assert event["seq"] > first["seq"] and event["interval_s"] == 0.2 and event["window_s"] == 5.0
    assert event["membership"] == {"source": "static", "registry": None, "members": 2, "healthy": 2, "available": 2,
                                   "max_backends": 1000, "left_out": 0, "refused": 0}
    assert event["rejections"]["500"]["total"] == 3
    assert event["rejections"]["no_healthy_backend"] == {"total": 0, "per_s": 0.0}
    assert event["rejections"]["failed"]["total"] == 0  # the 500s are the node's, not the balancer's
    faulty, plain = event["backends"]
    assert (faulty["url"], plain["url"]) == tuple(urls) and event["shown"] == event["total"] == 2
    assert faulty["errors"] == 3 and faulty["requests"] == plain["requests"] == 3
    assert faulty["healthy"] and faulty["ejector"] is None  # ejection off (eject_after_failures=0)
    assert faulty["node"]["breaker"]["state"] in ("CLOSED", "OPEN")
    assert faulty["node"]["queue"]["max"] == 10 and faulty["node"]["queue"]["current"] == 0
    assert plain["node"] == {"breaker": "off", "queue": "off", "reach": "ok"}
    assert plain["p50_ms"] is not None and plain["p50_ms"] <= plain["p95_ms"]
    assert faulty["p50_ms"] is None  # only 2xx/3xx answers make latencies


async def test_one_snapshot_serves_every_viewer(aiohttp_client: Any, aiohttp_server: Any) -> None:
    seen: list[str] = []
    backend = await aiohttp_server(recording_backend(seen))
    lb = await balancer(aiohttp_client, [str(backend.make_url("")).rstrip("/")])
    dash = lb.server.app[DASHBOARD]
    for _ in range(20):
        assert (await lb.get("/health")).status == 200
    assert dash.version == 0 and "/circuit-status" not in seen  # no viewer: no snapshot, no poll
    streams = [await lb.get("/dashboard/events") for _ in range(3)]
    try:
        runs = [[(await read_event(s))["seq"] for _ in range(4)] for s in streams]
        polls = seen.count("/circuit-status")
        assert polls == seen.count("/queue-stats")
        assert polls <= max(map(max, runs)) + 1, f"{polls} polls for {max(map(max, runs))} snapshots"
        assert all(seq >= 1 for run in runs for seq in run)
    finally:
        for s in streams:
            s.close()
    await until(lambda: _true(dash.viewers == 0), what="the streams' viewers gone")


async def _true(value: bool) -> bool:
    return value


async def test_streams_are_capped_and_a_closed_one_frees_its_place(aiohttp_client: Any,
                                                                   aiohttp_server: Any) -> None:
    urls = await node_urls(aiohttp_server, {})
    lb = await balancer(aiohttp_client, urls, dashboard=DashboardConfig(max_streams=2, interval_s=0.2,
                                                                       node_timeout_s=0.2))
    first, second = await lb.get("/dashboard/events"), await lb.get("/dashboard/events")
    assert first.status == second.status == 200
    busy = await lb.get("/dashboard/events")
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    error = (await busy.json())["error"]
    assert error["code"] == "dashboard_busy" and error["max_streams"] == 2 and "--dashboard-max-streams" in error["message"]
    assert (await lb.get("/dashboard")).status == 200  # the page itself is not capped
    await read_event(second)
    first.close()  # the balancer learns it at its next write

    async def admitted() -> bool:
        resp = await lb.get("/dashboard/events")
        if resp.status == 200:
            await read_event(resp)
            resp.close()
            return True
        resp.release()
        return False
    await until(admitted, what="a new stream admitted once one closed")
    second.close()
    none = await balancer(aiohttp_client, urls, dashboard=DashboardConfig(max_streams=0))
    assert (await none.get("/dashboard/events")).status == 503


async def test_a_silent_node_and_a_dead_one_show_as_such_without_holding_the_snapshot(
        aiohttp_client: Any, aiohttp_server: Any) -> None:
    never = asyncio.Event()

    async def hang() -> web.StreamResponse:
        await never.wait()
        raise AssertionError("unreachable")
    seen: list[str] = []
    silent = await aiohttp_server(recording_backend(seen, {"/circuit-status": hang, "/queue-stats": hang}))
    dead = f"http://127.0.0.1:{free_port()}"
    lb = await balancer(aiohttp_client, [str(silent.make_url("")).rstrip("/"), dead], health_interval_s=60,
                        unhealthy_after=10, eject_after_failures=0,
                        dashboard=DashboardConfig(interval_s=0.2, node_timeout_s=0.1))
    assert [(await lb.get("/work")).status for _ in range(4)] == [200] * 4  # refused by the dead one: retried
    async with lb.get("/dashboard/events") as stream:
        event = await event_where(stream, lambda e: e["seq"] >= 2, "two snapshots")
    quiet, gone = event["backends"]
    assert quiet["node"] == {"breaker": None, "queue": None, "reach": "no answer"}
    assert gone["node"]["reach"] == "unreachable"
    # The balancer's own failures: every attempt on the dead backend was refused (and retried elsewhere).
    assert event["rejections"]["failed"]["total"] == gone["errors"] == gone["requests"] >= 1
    never.set()


@pytest.mark.parametrize("path, status, body, shown", [
    ("/circuit-status", 200, {"state": "<img src=x onerror=alert(1)>", "name": "<script>", "consecutive_failures":
                              "many", "retry_after_s": 1e999, "counts": {"rejected": 3}},
     {"state": "?", "consecutive_failures": None, "retry_after_s": None, "rejected": 3}),
    ("/circuit-status", 200, {"state": "OPEN", "counts": []},
     {"state": "OPEN", "consecutive_failures": None, "retry_after_s": None, "rejected": None}),
    ("/queue-stats", 200, {"current": True, "max": 10, "extra": "<b>"},
     {"current": None, "max": 10, "peak": None, "utilization_percent": None, "rejected": None,
      "waiting_for_worker": None, "in_service": None, "workers": None}),
    ("/queue-stats", 404, {"error": {"code": "not_enabled"}}, "off"),
    ("/queue-stats", 404, "nope", "answered 404"),
    ("/circuit-status", 200, [1, 2], "not JSON"),
    ("/circuit-status", 200, "[[[[" * 10_000, "not JSON"),
])
def test_only_known_fields_of_a_nodes_answer_reach_the_page(path: str, status: int, body: Any, shown: Any) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode().replace(b"Infinity", b"1e999")
    assert node_view(path, status, raw) == shown


async def test_a_backend_id_cannot_break_the_event_framing(aiohttp_client: Any, aiohttp_server: Any) -> None:
    urls = await node_urls(aiohttp_server, {})
    lb = await balancer(aiohttp_client, urls)
    hostile = "x\n\ndata: {\"forged\": true}\r\n<img src=x onerror=alert(1)>\u2028"
    lb.server.app[DASHBOARD].lb.join(hostile, urls[0], 1)  # as a registry listing could, were ids not checked
    async with lb.get("/dashboard/events") as stream:
        event = await read_event(stream)  # one data line, then the blank line: checked by read_event
    assert [b["id"] for b in event["backends"]] == [urls[0], hostile]


async def test_shutdown_ends_the_open_streams(aiohttp_client: Any, aiohttp_server: Any) -> None:
    urls = await node_urls(aiohttp_server, {})
    lb = await balancer(aiohttp_client, urls)
    stream = await lb.get("/dashboard/events")
    await read_event(stream)
    async with asyncio.timeout(10):  # not the server's shutdown timeout (60 s) waiting for the stream
        await lb.server.close()
        assert await stream.content.read() == b""  # the stream ended cleanly
    stream.close()


@pytest.mark.parametrize("field, value", [("max_streams", -1), ("interval_s", 0.01), ("window_s", 0.5),
                                          ("node_timeout_s", 2.0), ("node_concurrency", 0), ("max_rows", 0)])
def test_a_bad_setting_names_itself(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        DashboardConfig(**{field: value})


SMALL_RUN = """
name = "small"
seed = 1
duration_s = 3
warmup_s = 0.5
[workload]
arrival = "poisson"
rate_per_s = 30
clients = 3
[balancer]
health_check_interval_s = 0.5
[[nodes]]
id = "a"
workers = 1
load_factor_ms = 5
circuit_breaker = true
[[nodes]]
id = "b"
workers = 1
load_factor_ms = 5
"""


def test_live_run_prints_the_dashboard_url_and_serves_it_while_the_run_lasts(tmp_path: Any) -> None:
    path = tmp_path / "small.toml"
    path.write_text(SMALL_RUN)
    run = Proc("live", "run", str(path), "--dashboard", timeout=60,
               ready=r"dashboard: http://127\.0\.0\.1:(\d+)/dashboard \(up while the run lasts\)")
    try:
        status, headers, html = request(f"{run.url}/dashboard")
        assert status == 200 and headers["Content-Type"].startswith("text/html") and "dashboard.js" in html
        conn = http.client.HTTPConnection("127.0.0.1", run.port, timeout=10)
        conn.request("GET", "/dashboard/events")
        stream = conn.getresponse()
        assert stream.status == 200
        for _ in range(10):  # the first snapshot whose node polls all came back (each gets 0.5 s)
            line = b""
            while not line.startswith(b"data: "):
                line = stream.readline()
            nodes = {b["id"]: b["node"] for b in json.loads(line[6:])["backends"]}
            if all(node["reach"] == "ok" for node in nodes.values()):
                break
        conn.close()
        assert nodes["a"]["breaker"]["state"] == "CLOSED" and nodes["b"]["breaker"] == "off"
        assert run.popen.wait(60) == 0
    finally:
        run.stop()
