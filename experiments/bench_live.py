"""Benchmark: the live processes under wrk, against baselines measured in the same run.

    testbed bench live [--seconds S] [--connections N] [--json PATH]

Needs ``wrk`` (Debian: ``apt-get install wrk``) and, for the proxy baseline,
``nginx`` (``apt-get install nginx-light``); a missing tool is reported and its
cases skipped. Everything listens on 127.0.0.1 on free ports, every process is
stopped by PID, and each wrk run is bounded by ``--seconds``.

Cases, each ``GET /health``:

1. a node with every middleware on (rate limiter with a limit no one reaches,
   backpressure, circuit breaker, trusted proxy) against a bare aiohttp app
   that returns the same JSON: the price of the middleware;
2. the node directly, through ``testbed balancer``, and through nginx as the
   proxy: throughput under load (``--connections``) and, at a moderate load
   (4 connections), the p50 latency the proxy adds;
3. a second ``testbed balancer`` in front of the same node with its dashboard
   open (:class:`DashboardViewer`: one ``GET /dashboard/events`` stream read
   for the whole run, as a browser tab would): what a watched balancer
   costs, against the unwatched one, in the same rounds.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

__all__ = ["run"]

BARE_APP = """
import sys
from aiohttp import web
async def health(request):
    return web.json_response({"status": "ok", "node_id": "bare", "active_requests": 1, "workers": 1,
                              "busy_workers": 0, "queued": 0}, headers={"X-Node-ID": "bare"})
app = web.Application()
app.router.add_get("/health", health)
try:  # the same event loop as the testbed processes, so the comparison is like for like
    import os, uvloop
    loop = uvloop.new_event_loop() if os.environ.get("TESTBED_LOOP", "auto") != "asyncio" else None
except ImportError:
    loop = None
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=loop)
"""

NGINX_CONF = """
worker_processes 1;
error_log {prefix}/error.log;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream node {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout} s")


class _Proc:
    def __init__(self, args: list[str], port: int) -> None:
        self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = port
        self.pid = self.popen.pid
        try:
            _wait_port(port)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _testbed(*args: str) -> _Proc:
    port = _free_port()
    exe = str(pathlib.Path(sys.executable).with_name("testbed"))
    return _Proc([exe, *args, "--port", str(port)], port)


class DashboardViewer:
    """A browser tab on a balancer's dashboard: one ``GET /dashboard/events`` stream, read on a thread until
    :meth:`close`; ``snapshots`` counts the events it received (a stream that went quiet would show)."""

    def __init__(self, port: int) -> None:
        self.snapshots = 0
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._sock.sendall(b"GET /dashboard/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        self._thread = threading.Thread(target=self._read, name="dashboard-viewer", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._sock.makefile("rb") as stream:
            try:
                for line in stream:
                    if line.startswith(b"data:"):
                        self.snapshots += 1
            except (OSError, ValueError):
                return  # closed

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}

#: What the README promises (issue 11, "Speed stays"): node >= 0.85x a bare app, balancer >= 0.55x nginx,
#: under 0.7 ms added at p50; and (issue 13) a balancer with its dashboard open >= 0.95x its throughput unwatched.
TARGETS = {"middleware": 0.85, "balancer": 0.55, "added_p50_ms": 0.7, "dashboard": 0.95}


def wrk(port: int, seconds: float, connections: int) -> dict[str, float]:
    """Requests/s and p50/p99 latency (ms) of GET /health for ``seconds``."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                          f"http://127.0.0.1:{port}/health"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no Requests/sec line:\n{out}")
    rps = float(found.group(1))
    lat = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} responses were not 2xx; the comparison would be meaningless")
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"]}


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The least disturbed of several runs: the highest throughput, the lowest latencies and CPU cost."""
    return {"rps": max(r["rps"] for r in runs), "p50_ms": min(r["p50_ms"] for r in runs),
            "p99_ms": min(r["p99_ms"] for r in runs), "cpu_us": min(r["cpu_us"] for r in runs)}


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes ``pids`` (and their children, e.g. nginx's workers) have used."""
    total = 0.0
    for pid in pids:
        try:
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue  # not Linux, or gone
        total += (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (fields 14, 15 of stat)
        total += cpu_seconds([int(c) for c in children])
    return total


def _interleaved(cases: dict[str, tuple[int, list[int]]], rounds: int, seconds: float,
                 connections: int) -> dict[str, dict[str, float]]:
    """Each case once per round, round after round (A B C A B C ...), best of the rounds: a noisy
    spell of the machine then hits every case alike instead of skewing one ratio.

    A case is a port and the server processes that serve it; ``cpu_us`` is their CPU time per request,
    a cost that other work on a busy machine inflates far less than it cuts throughput."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (port, pids) in cases.items():
            before = cpu_seconds(pids)
            result = wrk(port, seconds, connections)
            used = cpu_seconds(pids) - before
            result["cpu_us"] = used / max(1.0, result["rps"] * seconds) * 1e6
            runs[name].append(result)
    return {name: _best(r) for name, r in runs.items()}


def run(seconds: float = 5.0, connections: int = 32, json_path: str | None = None,
        echo: Callable[[str], None] = print, rounds: int = 3) -> int:
    if not shutil.which("wrk"):
        echo("wrk is not installed (Debian: apt-get install wrk); nothing measured")
        return 1
    import importlib.util
    loop = os.environ.get("TESTBED_LOOP", "auto")
    loop = "uvloop" if loop != "asyncio" and importlib.util.find_spec("uvloop") else "asyncio"
    results: dict[str, Any] = {"seconds": seconds, "connections": connections, "rounds": rounds,
                               "cpus": os.cpu_count(), "loop": loop}
    procs: list[_Proc] = []
    tmp = tempfile.mkdtemp(prefix="testbed-bench-")
    try:
        bare_port = _free_port()
        bare = _Proc([sys.executable, "-c", BARE_APP, str(bare_port)], bare_port)
        procs.append(bare)
        full = _testbed("node", "--id", "full", "--rate-limit", "1000000000", "--backpressure", "100000",
                        "--circuit-breaker", "--trust-proxy", "127.0.0.1", "--impl", "solution")
        procs.append(full)
        plain = _testbed("node", "--id", "plain")
        procs.append(plain)
        lb = _testbed("balancer", "--nodes", str(plain.port), "--impl", "solution")
        procs.append(lb)
        watched = _testbed("balancer", "--nodes", str(plain.port), "--impl", "solution")
        procs.append(watched)
        nginx_port = None
        if shutil.which("nginx"):
            nginx_port = _free_port()
            conf = pathlib.Path(tmp, "nginx.conf")
            conf.write_text(NGINX_CONF.format(prefix=tmp, upstream=plain.port, port=nginx_port))
            procs.append(_Proc(["nginx", "-p", tmp, "-c", str(conf), "-g", "daemon off;"], nginx_port))
        else:
            echo("nginx is not installed (Debian: apt-get install nginx-light); the nginx case is skipped")

        for p in procs:  # warm up every server (imports, first connections)
            wrk(p.port, 1, 4)
        viewer = DashboardViewer(watched.port)

        echo(f"GET /health, wrk 1 thread, {connections} connections, {seconds:g} s per run, best of {rounds} "
             f"interleaved rounds, {loop} event loop")
        echo(f"  {'target':<34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}")
        cases = {"bare aiohttp app": (bare.port, [bare.pid]), "node, all middleware": (full.port, [full.pid]),
                 "node, direct": (plain.port, [plain.pid]), "balancer -> node": (lb.port, [lb.pid, plain.pid]),
                 "balancer -> node, dashboard open": (watched.port, [watched.pid, plain.pid])}
        if nginx_port:
            cases["nginx -> node"] = (nginx_port, [procs[-1].pid, plain.pid])
        seen = viewer.snapshots
        loaded = _interleaved(cases, rounds, seconds, connections)
        for name, r in loaded.items():
            echo(f"  {name:<34}{r['rps']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['cpu_us']:>12.1f}")
        results["loaded"] = loaded
        echo("  (CPU: of every server process on the path, per request: the cost, whatever else the machine runs)")
        ratio = loaded["node, all middleware"]["rps"] / loaded["bare aiohttp app"]["rps"]
        echo(f"  => the node with all middleware serves {ratio:.2f}x a bare app (target >= {TARGETS['middleware']})")
        results["middleware_over_bare"] = ratio
        if nginx_port:
            ratio = loaded["balancer -> node"]["rps"] / loaded["nginx -> node"]["rps"]
            echo(f"  => the balancer proxies {ratio:.2f}x nginx's throughput (target >= {TARGETS['balancer']})")
            results["balancer_over_nginx"] = ratio
        ratio = loaded["balancer -> node, dashboard open"]["rps"] / loaded["balancer -> node"]["rps"]
        cost = loaded["balancer -> node, dashboard open"]["cpu_us"] / loaded["balancer -> node"]["cpu_us"]
        echo(f"  => with its dashboard open ({viewer.snapshots - seen} snapshots streamed meanwhile) the balancer "
             f"serves {ratio:.2f}x its throughput unwatched, at {cost:.2f}x the CPU per request "
             f"(target >= {TARGETS['dashboard']})")
        results["dashboard_over_unwatched"] = ratio
        results["dashboard_cpu_over_unwatched"] = cost
        results["dashboard_snapshots"] = viewer.snapshots - seen
        viewer.close()

        echo(f"Moderate load: 4 connections, {seconds:g} s per run, best of {rounds}")
        moderate = _interleaved({name: cases[name] for name in ("node, direct", "balancer -> node")}, rounds,
                                seconds, 4)
        for name, r in moderate.items():
            echo(f"  {name:<34}{r['rps']:>10,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['cpu_us']:>12.1f}")
        added = moderate["balancer -> node"]["p50_ms"] - moderate["node, direct"]["p50_ms"]
        echo(f"  => the balancer adds {added:.2f} ms at p50 (target < {TARGETS['added_p50_ms']} ms)")
        results["moderate"] = moderate
        results["balancer_added_p50_ms"] = added
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        echo(f"wrote {json_path}")
    return 0
