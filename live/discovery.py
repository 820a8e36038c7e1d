"""The node's side of service discovery: register, heartbeat, re-register, deregister.

Theory of operation
-------------------
At start the node registers (``POST /register``) and keeps the *lease* the
registry answers with: the proof that this registration is this process's.
It then heartbeats every ``interval_s`` (``POST /heartbeat/{id}``, lease in
the ``X-Lease`` header). A 404 means the registry does not know the node (it
restarted, or expired the node while it was paused), so the node registers
again at once. A 409 means the lease is no longer the current one: another
instance registered this id at our address (a restart we did not notice), or
the registry handed the id to someone else after ours expired; the node
registers again at once, which gets a new lease where the address is still
ours and is refused (409 ``conflict``) where another live instance holds the
id elsewhere. A refused registration (409, 400 for an address the registry
does not allow, 503 when it is full) is retried on the next beat. A registry
that is down or answers garbage is retried on the next beat too; the node keeps
serving meanwhile. Each distinct problem is logged once, as one WARNING line,
and recovery once, at INFO: a registry down for an hour does not write 1,800
warnings. On shutdown the node deregisters (``POST /deregister``, with the
lease), best effort. Each beat also refreshes the peer list from ``GET
/nodes`` for ``GET /peers``. All policy (TTL, expiry, leases, what "unknown"
means) lives in ``core.registry`` on the registry's side.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import aiohttp

from core.errors import DataError
from live.registry import LEASE_HEADER

__all__ = ["DiscoveryClient"]

log = logging.getLogger("testbed.discovery")


class RegistryAnswer(DataError):
    """The registry answered, but not with success: ``status`` and the start of its body."""

    def __init__(self, what: str, status: int, text: str) -> None:
        super().__init__(f"{what} answered {status}: {text[:300]}")
        self.status = status


class DiscoveryClient:
    """Registers ``address`` under ``node_id``. An ``address`` of None is not known yet (the node
    listens on ``--port 0``): :meth:`run` waits for :meth:`set_address` before registering."""

    def __init__(self, registry_url: str, node_id: str, address: str | None, *, metadata: dict[str, Any] | None = None,
                 interval_s: float = 2.0, token: str | None = None, clock: Callable[[], float]) -> None:
        self.registry_url = registry_url.rstrip("/")
        self.node_id = node_id
        self.address = address
        self.metadata = metadata or {}
        self.interval_s = interval_s
        self.clock = clock
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.lease: str | None = None
        self.registered = False
        self.registrations = 0
        self.heartbeats_ok = 0
        self.failures = 0
        self.conflicts = 0
        self.last_error: str | None = None
        self.last_heartbeat_at: float | None = None
        self.peers: list[dict[str, Any]] = []
        self._address_known = asyncio.Event()
        if address is not None:
            self._address_known.set()

    def set_address(self, address: str) -> None:
        """The address to register, once the node knows it."""
        self.address = address
        self._address_known.set()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "registry": self.registry_url,
            "node_id": self.node_id,
            "address": self.address,
            "registered": self.registered,
            "registrations": self.registrations,
            "heartbeats_ok": self.heartbeats_ok,
            "failures": self.failures,
            "conflicts": self.conflicts,
            "last_error": self.last_error,
            "seconds_since_heartbeat": None if self.last_heartbeat_at is None else now - self.last_heartbeat_at,
            "heartbeat_interval_s": self.interval_s,
        }

    async def run(self) -> None:
        """Register and heartbeat until cancelled."""
        await self._address_known.wait()
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval_s))
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            while True:
                await self._beat(session)
                await asyncio.sleep(self.interval_s)

    def _lease_headers(self) -> dict[str, str]:
        return {LEASE_HEADER: self.lease} if self.lease else {}

    async def _beat(self, session: aiohttp.ClientSession) -> None:
        try:
            if not self.registered:
                await self._register(session)
            else:
                async with session.post(f"{self.registry_url}/heartbeat/{self.node_id}",
                                        json={"metadata": self.metadata}, headers=self._lease_headers()) as resp:
                    if resp.status in (404, 409):
                        why = ("does not know us (restarted?)" if resp.status == 404 else
                               "holds another lease for our id (another instance registered it)")
                        log.warning("registry %s %s; registering %s again", self.registry_url, why, self.node_id)
                        self.conflicts += resp.status == 409
                        self.registered = False
                        await self._register(session)
                    elif resp.status != 200:
                        raise RegistryAnswer("heartbeat", resp.status, await resp.text())
                    else:
                        self.heartbeats_ok += 1
                        self.last_heartbeat_at = self.clock()
            async with session.get(f"{self.registry_url}/nodes") as resp:
                if resp.status == 200:
                    self.peers = [n for n in (await resp.json()).get("nodes", []) if n.get("id") != self.node_id]
            if self.last_error is not None:
                log.info("registry %s: all well again", self.registry_url)
            self.last_error = None
        except (aiohttp.ClientError, asyncio.TimeoutError, RegistryAnswer, ValueError) as exc:
            self.failures += 1
            error = f"{type(exc).__name__}: {exc}"
            if error != self.last_error:  # one WARNING per problem, not one per beat
                log.warning("registry %s: %s (will retry every beat)", self.registry_url, error)
            self.last_error = error

    async def _register(self, session: aiohttp.ClientSession) -> None:
        body = {"id": self.node_id, "address": self.address, "metadata": self.metadata}
        async with session.post(f"{self.registry_url}/register", json=body, headers=self._lease_headers()) as resp:
            if resp.status not in (200, 201):
                self.conflicts += resp.status == 409
                raise RegistryAnswer("register", resp.status, await resp.text())
            lease = (await resp.json()).get("lease")
        if not isinstance(lease, str):
            raise ValueError("the registry's register answer has no lease")
        self.lease = lease
        self.registered = True
        self.registrations += 1
        self.last_heartbeat_at = self.clock()

    async def deregister(self) -> None:
        """Best effort: tell the registry we are leaving."""
        if not self.registered:
            return
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0), headers=self.headers) as s:
                async with s.post(f"{self.registry_url}/deregister", json={"id": self.node_id},
                                  headers=self._lease_headers()) as resp:
                    log.info("deregistered from %s: %s", self.registry_url, resp.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("could not deregister from %s: %s", self.registry_url, exc)
        self.registered = False
