"""The balancer's dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

Against real processes (a registry, three nodes, a balancer following the registry) under a light load:
the page loads without console errors, its numbers move, a node's fault (``POST /admin/faults`` with the
node's admin token) turns its row's breaker or ejector state within 2 s, a node killed by PID shows down
and comes back once started again on its port. Against an in-process balancer whose backend ids are HTML:
the page shows them as text and runs nothing. ``DASHBOARD_SCREENSHOT=PATH`` also writes the screenshot of
the faulted dashboard there (``experiments/figures/dashboard.png`` in the README), after ``DASHBOARD_SECONDS``
(default 3) snapshots of history.

Playwright (``pip install playwright``) drives the system's Chromium through ``executable_path``: nothing is
downloaded. Without Chromium or Playwright every test here is skipped, saying which is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from live.balancer import BalancerConfig, make_balancer_app
from live.node import NodeConfig, make_node_app
from tests.live.procs import Proc

playwright_api = pytest.importorskip("playwright.async_api", reason="Playwright is not installed "
                                     "(pip install playwright; it drives the system's chromium)")

CHROMIUM = os.environ.get("TESTBED_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                "or set TESTBED_CHROMIUM to a Chromium binary)")

TOKEN = "browser-test-admin-token"
NODES = ("node-1", "node-2", "node-3")
HOSTILE = "<img src=x onerror=alert(1)>"


@dataclass
class Cluster:
    registry: Proc
    balancer: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    started: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.balancer is not None
        return self.balancer.url

    def start_node(self, node_id: str, port: int = 0) -> Proc:
        proc = Proc("node", "--port", str(port), "--id", node_id, "--registry", self.registry.url,
                    "--heartbeat-interval", "0.5", "--load-factor", "5", "--workers", "2", "--backpressure", "20",
                    "--circuit-breaker", "--faults", "--admin-token", TOKEN, "--impl", "solution")
        self.started.append(proc)
        self.nodes[node_id] = proc
        assert proc.port is not None
        self.ports[node_id] = proc.port
        return proc


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A registry (members expire 2 s after their last heartbeat), three nodes and a balancer following it;
    every process stopped by PID at the end, last started first, whatever happened."""
    c = Cluster(Proc("registry", "--port", "0", "--ttl", "2"))
    c.started.append(c.registry)
    try:
        for node_id in NODES:
            c.start_node(node_id)
        c.balancer = Proc("balancer", "--port", "0", "--registry", c.registry.url, "--refresh-interval", "0.5",
                          "--health-interval", "0.5", "--eject-after", "3", "--ejection-time", "2",
                          "--strategy", "round_robin", "--impl", "solution")
        c.started.append(c.balancer)
        yield c
    finally:
        for proc in reversed(c.started):
            proc.stop()


@pytest.fixture
async def load(cluster: Cluster) -> AsyncIterator[None]:
    """Light load through the balancer: four loops of GET /work, ~20 ms apart (bounded by the test's life)."""
    stop = asyncio.Event()

    async def loop(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(f"{cluster.url}/work") as resp:
                    await resp.read()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.02)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        tasks = [asyncio.create_task(loop(session)) for _ in range(4)]
        yield
        stop.set()
        await asyncio.gather(*tasks)


@dataclass
class Browser:
    page: Any
    errors: list[str]
    dialogs: list[str]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium page that records console errors, uncaught exceptions and dialogs."""
    async with playwright_api.async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await chromium.new_page(viewport={"width": 1440, "height": 1000})
            seen = Browser(page, [], [])
            page.on("console", lambda m: seen.errors.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: seen.errors.append(f"uncaught: {exc}"))

            async def dismiss(dialog: Any) -> None:
                seen.dialogs.append(dialog.message)
                await dialog.dismiss()
            page.on("dialog", dismiss)
            yield seen
        finally:
            await chromium.close()


async def until_js(page: Any, expression: str, *, timeout_ms: float) -> None:
    """Wait until the JavaScript ``expression`` is true on ``page`` (polled on each animation frame). Passed as
    a function: a bare expression string would be run with eval, which the dashboard's CSP refuses."""
    await page.wait_for_function(f"() => ({expression})", timeout=timeout_ms)


def cell(backend: str, column: str) -> str:
    """JavaScript: the ``data-state`` of one cell of one backend's row ('' when the row is not there)."""
    return (f"((document.querySelector('tr[data-backend=\"{backend}\"] td[data-col=\"{column}\"]') || "
            "{dataset: {}}).dataset.state || '')")


async def open_dashboard(b: Browser, url: str) -> None:
    await b.page.goto(f"{url}/dashboard")
    rows = " && ".join(f"document.querySelector('tr[data-backend=\"{n}\"]')" for n in NODES)
    await until_js(b.page, rows, timeout_ms=15_000)


async def admin_faults(cluster: Cluster, node_id: str, method: str, body: dict[str, Any] | None = None) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{cluster.nodes[node_id].url}/admin/faults", json=body,
                                   headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()


async def test_the_page_loads_cleanly_and_its_numbers_move(cluster: Cluster, load: None, browser: Browser) -> None:
    await open_dashboard(browser, cluster.url)
    page = browser.page
    first = await page.text_content("#sum-requests")
    await until_js(page, f"document.getElementById('sum-requests').textContent !== {first!r}",
                                 timeout_ms=5_000)
    await until_js(page, "document.querySelectorAll('#legend-rate li').length === 3", timeout_ms=5_000)
    await until_js(page, 
        "[...document.querySelectorAll('#backends td[data-col=\"p50\"]')].every(td => td.textContent !== '–')",
        timeout_ms=10_000)
    for node_id in NODES:
        assert await page.evaluate(cell(node_id, "health")) == "up"
        assert await page.evaluate(cell(node_id, "breaker")) == "CLOSED"
    assert await page.get_attribute("#conn", "data-state") == "live"
    assert browser.errors == [] and browser.dialogs == []


async def test_a_faulted_node_turns_its_breaker_or_ejector_within_2_s(cluster: Cluster, load: None,
                                                                      browser: Browser) -> None:
    await open_dashboard(browser, cluster.url)
    page = browser.page
    await until_js(page, f"{cell('node-2', 'breaker')} === 'CLOSED'", timeout_ms=10_000)
    shot = os.environ.get("DASHBOARD_SCREENSHOT")
    history_s = int(os.environ.get("DASHBOARD_SECONDS", "3"))
    if shot:  # the README's picture: some history before the fault, and after it (below)
        await asyncio.sleep(history_s / 2)  # not synchronisation: the picture's history
    try:
        await admin_faults(cluster, "node-2", "POST", {"error_rate": 1.0})
        faulted = time.monotonic()
        await until_js(page, f"{cell('node-2', 'breaker')} === 'OPEN' || "
                                     f"{cell('node-2', 'ejector')} === 'OPEN'", timeout_ms=2_000)
        took_s = time.monotonic() - faulted
        await until_js(page, "[...document.querySelectorAll('#rejections tr[data-kind=\"500\"] td')]"
                                     ".some(td => td.textContent !== '0')", timeout_ms=5_000)
        if shot:
            await asyncio.sleep(history_s)  # not synchronisation: the charts' history after the fault
            await page.screenshot(path=shot, full_page=True)
    finally:
        await admin_faults(cluster, "node-2", "DELETE")
    print(f"node-2's row turned {took_s:.2f} s after its fault")
    await until_js(page, f"{cell('node-2', 'breaker')} === 'CLOSED' && "
                                 f"{cell('node-2', 'ejector')} === 'CLOSED'", timeout_ms=20_000)
    assert browser.errors == [] and browser.dialogs == []


async def test_a_killed_node_shows_down_and_comes_back_when_restarted(cluster: Cluster, load: None,
                                                                      browser: Browser) -> None:
    await open_dashboard(browser, cluster.url)
    page = browser.page
    port = cluster.ports["node-3"]
    cluster.nodes["node-3"].stop(signal.SIGKILL)  # by PID
    row_gone_or_down = (f"!document.querySelector('tr[data-backend=\"node-3\"]') || "
                        f"{cell('node-3', 'health')} === 'down' || {cell('node-3', 'breaker')} === 'unreachable'")
    await until_js(page, row_gone_or_down, timeout_ms=10_000)
    cluster.start_node("node-3", port)
    await until_js(page, f"{cell('node-3', 'health')} === 'up' && {cell('node-3', 'breaker')} === 'CLOSED'",
                                 timeout_ms=20_000)
    assert browser.errors == [] and browser.dialogs == []


async def test_html_in_backend_ids_is_shown_as_text_and_never_run(aiohttp_server: Any, browser: Browser) -> None:
    node = await aiohttp_server(make_node_app(NodeConfig("n1", port=0, circuit_breaker=True)))
    url = str(node.make_url("")).rstrip("/")
    hostile = (f"{url}/{HOSTILE}", f"{url}/<script>alert(2)</script>")  # direct-config backends, not checked here
    lb = await aiohttp_server(make_balancer_app(BalancerConfig(nodes=(url, *hostile), port=0)))
    await browser.page.goto(str(lb.make_url("/dashboard")))
    names = "[...document.querySelectorAll('#backends .name')].map(e => e.textContent)"
    await until_js(browser.page, f"{names}.length === 3", timeout_ms=15_000)
    assert await browser.page.evaluate(names) == [url, *hostile]
    legend = "[...document.querySelectorAll('#legend-rate li')].map(e => e.textContent)"
    await until_js(browser.page, f"{legend}.length === 3", timeout_ms=15_000)  # from the second snapshot on
    assert await browser.page.evaluate(legend) == [url, *hostile]
    assert await browser.page.evaluate("document.querySelectorAll('main img, #backends img, #backends script, "
                                       ".legend img, .legend script').length") == 0
    assert browser.dialogs == [] and browser.errors == []
