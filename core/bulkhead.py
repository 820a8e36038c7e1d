"""A bulkhead per client: at most N requests of one client inside the node at once.

Theory of operation
-------------------
The backpressure gate bounds what the whole node holds; it cannot tell a
client that fills every place from many that take one each. A bulkhead per
client (the pattern's name comes from a ship's watertight compartments; it is
Envoy's per-downstream connection limit and Resilience4j's ``Bulkhead`` keyed
by caller) gives each client its own small bound: a client that already has
``max_per_client`` requests inside is refused at once (``429``), so one greedy
or stuck client cannot take every worker and queue place from the others.
Unlike the token bucket it counts what is *inside*, not what arrived: a client
whose requests are slow is held back, one whose requests are fast is not.

:meth:`ClientBulkhead.try_acquire` admits or refuses; :meth:`release` is called
once per admitted request when it leaves the node. A client with nothing
inside holds no memory, so the table never grows beyond the clients that have
requests in the node right now. Releasing more than was admitted raises.
No time is involved.

Memory is therefore bounded by what the node holds, not by how many clients
it has seen: at most one entry per request inside (the request path gives a
place back on every refusal after this step), so at most ``--backpressure``
entries, or one per open connection without it (the server's connection cap),
and a node's client keys are at most 256 bytes (:mod:`core.client_key`).
"""

from __future__ import annotations

from core._validate import integer
from core.backpressure import ReleaseWithoutAcquire

__all__ = ["ClientBulkhead"]


class ClientBulkhead:
    """At most ``max_per_client`` (>= 1) requests of one client inside at a time."""

    __slots__ = ("max_per_client", "_inside", "rejected")

    def __init__(self, max_per_client: int) -> None:
        self.max_per_client = integer("max_per_client", max_per_client, ge=1)
        self._inside: dict[str, int] = {}
        self.rejected = 0

    def try_acquire(self, client: str) -> bool:
        """Admit one request of ``client`` if it has fewer than ``max_per_client`` inside."""
        n = self._inside.get(client, 0)
        if n >= self.max_per_client:
            self.rejected += 1
            return False
        self._inside[client] = n + 1
        return True

    def release(self, client: str) -> None:
        """One request of ``client`` left the node."""
        n = self._inside.get(client, 0)
        if n <= 0:
            raise ReleaseWithoutAcquire(f"release() for client {client!r}, which has nothing inside")
        if n == 1:
            del self._inside[client]  # nothing inside, nothing kept
        else:
            self._inside[client] = n - 1

    def inside(self, client: str) -> int:
        """Requests of ``client`` inside now."""
        return self._inside.get(client, 0)

    @property
    def clients(self) -> int:
        """Clients with at least one request inside (the table's size)."""
        return len(self._inside)
