"""Reference solution of exercise 2: ``LeastConnectionsStrategy.select_node``.

To use it, copy the method below over the stub in ``core/strategies.py``
(same indentation, replacing the whole stub method). ``testbed check
least-connections --impl exercise`` then grades your copy.

The class also declares a fast path (see "Fast paths" in ``core/strategies.py``):
the same rule kept in a heap by requests in flight, which balancers use instead
of snapshots. It is tied to this very ``select_node``; your copy in
``core/strategies.py`` runs through snapshots, as written.
"""

from __future__ import annotations

from typing import Sequence

from core.pick_index import Member, RankedPicker
from core.strategies import Backend, LeastConnectionsStrategy, fast_path

__all__ = ["LeastConnectionsPicker", "LeastConnectionsSolution"]


class LeastConnectionsPicker(RankedPicker):
    """Fewest requests in flight first, ties in turn: a heap keyed by ``active``, ``O(log n)``."""

    @staticmethod
    def key(member: Member) -> int:
        return member.active


@fast_path(LeastConnectionsPicker)
class LeastConnectionsSolution(LeastConnectionsStrategy):
    """:class:`LeastConnectionsStrategy` with the exercise method filled in."""

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        """Return a healthy backend whose ``active_connections`` is the smallest."""
        candidates = self.healthy(backends)
        fewest = min(b.active_connections for b in candidates)
        ties = [b for b in candidates if b.active_connections == fewest]
        # Taking ties in turn spreads an idle system's requests over every backend.
        return ties[0] if len(ties) == 1 else self._rotate(ties)
