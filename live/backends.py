"""The balancer's background work on its backends: active health checks and following the registry.

Theory of operation
-------------------
Every ``health_interval_s`` the balancer asks each backend's ``GET /health``;
core's health tracker (:meth:`core.balancer_state.BalancerState.checked`)
decides what a run of failed checks means. With ``--registry``, the registry's
``GET /nodes`` is polled every ``refresh_s``: new or moved members join the
books, members no longer listed leave once nothing is in flight to them. The
proxy path itself is :mod:`live.balancer`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import aiohttp

from core.balancer_state import BackendEntry
from core.health import counts_as_failure

if TYPE_CHECKING:
    from live.balancer import Balancer

__all__ = ["apply_membership", "follow_registry", "health_checks"]

log = logging.getLogger("testbed.balancer")


async def health_checks(lb: Balancer) -> None:
    """Check every backend's ``/health`` every health interval, for the balancer's lifetime."""
    timeout = aiohttp.ClientTimeout(total=min(2.0, lb.config.health_interval_s))
    while True:
        await asyncio.gather(*(_check(lb, b, timeout) for b in list(lb.state.backends.values())))
        await asyncio.sleep(lb.config.health_interval_s)


async def _check(lb: Balancer, backend: BackendEntry, timeout: aiohttp.ClientTimeout) -> None:
    assert lb.session is not None
    try:
        async with lb.session.get(f"{backend.url}/health", timeout=timeout,
                                    headers={"X-Client-ID": "testbed-balancer-health-check"}) as resp:
            ok = not counts_as_failure(resp.status)
            if resp.status == 200:
                data = await resp.json(content_type=None)
                if isinstance(data, dict) and isinstance(data.get("workers"), int) and data["workers"] >= 1:
                    backend.weight = data["workers"]
            backend.driver.last_check = f"{resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        ok = False
        backend.driver.last_check = f"{type(exc).__name__}: {exc}"[:200]
    lb.state.checked(backend, ok)


async def follow_registry(lb: Balancer) -> None:
    """Poll the registry's ``GET /nodes`` every ``refresh_s`` and follow its membership."""
    assert lb.session is not None and lb.config.registry
    url = lb.config.registry.rstrip("/") + "/nodes"
    while True:
        try:
            async with lb.session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                if resp.status == 200:
                    apply_membership(lb, (await resp.json()).get("nodes", []))
                else:
                    log.warning("registry %s answered %s", url, resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("registry %s: %s (keeping the last membership)", url, exc)
        await asyncio.sleep(lb.config.refresh_s)


def apply_membership(lb: Balancer, nodes: list[dict[str, Any]]) -> None:
    """Join the registry's new or moved members; drop the ones it no longer lists (once idle)."""
    seen = set()
    for n in nodes:
        node_id, address = n.get("id"), n.get("address")
        if not isinstance(node_id, str) or not isinstance(address, str):
            continue
        seen.add(node_id)
        workers = (n.get("metadata") or {}).get("workers", 1)
        weight = workers if isinstance(workers, int) and workers >= 1 else 1
        current = lb.state.backends.get(node_id)
        if current is None or current.url != address.rstrip("/"):
            log.info("backend %s joined at %s", node_id, address)
            lb.join(node_id, address.rstrip("/"), weight)
    backends = lb.state.backends
    for gone in [k for k in backends if k not in seen and k not in lb.config.nodes]:
        if backends[gone].active == 0:
            log.info("backend %s left", gone)
            lb.state.remove(gone)
