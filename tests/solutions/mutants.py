"""Wrong implementations of the two exercises, one per mistake students make.

The property suites must reject every one of them: a property that no mutant
can break would be a test that cannot fail.
"""

from __future__ import annotations

from core.rate_limiter import TokenBucket
from core.strategies import LeastConnectionsStrategy, NoHealthyBackend


def _is_allowed(cap=True, clamp=True, threshold=1.0, key=None):
    """A token-bucket ``is_allowed`` with one of its parts switched off."""
    def is_allowed(self, client_id, *, now):
        bucket = self._bucket(key or client_id, now=now)
        elapsed = max(0.0, now - bucket.updated_at) if clamp else abs(now - bucket.updated_at)
        tokens = bucket.tokens + elapsed * self.rate_per_s
        bucket.tokens = min(self.capacity, tokens) if cap else tokens
        bucket.updated_at = max(bucket.updated_at, now) if clamp else now
        if bucket.tokens >= threshold:
            bucket.tokens -= 1.0
            return True
        return False
    return is_allowed


class NoCap(TokenBucket):
    is_allowed = _is_allowed(cap=False)


class BackwardsMints(TokenBucket):
    is_allowed = _is_allowed(clamp=False)


class OffByOne(TokenBucket):
    is_allowed = _is_allowed(threshold=0.0)


class SharedBucket(TokenBucket):
    is_allowed = _is_allowed(key="everyone")


class NeverRefills(TokenBucket):
    def is_allowed(self, client_id, *, now):
        bucket = self._bucket(client_id, now=now)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False


class OwnDict(TokenBucket):
    """Right decisions, but keeps every client forever in a dict of its own."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.mine = {}

    def is_allowed(self, client_id, *, now):
        tokens, last = self.mine.get(client_id, (self.capacity, now))
        tokens = min(self.capacity, tokens + max(0.0, now - last) * self.rate_per_s)
        ok = tokens >= 1
        self.mine[client_id] = (tokens - ok, max(last, now))
        return ok

    @property
    def tracked_clients(self):
        return len(self.mine)


class AlwaysFirst(LeastConnectionsStrategy):
    def select_node(self, backends):
        candidates = self.healthy(backends)
        fewest = min(b.active_connections for b in candidates)
        return next(b for b in candidates if b.active_connections == fewest)


class IgnoresHealth(LeastConnectionsStrategy):
    def select_node(self, backends):
        if not backends:
            raise NoHealthyBackend(0)
        fewest = min(b.active_connections for b in backends)
        return self.rng.choice([b for b in backends if b.active_connections == fewest])


class MostConnections(LeastConnectionsStrategy):
    def select_node(self, backends):
        candidates = self.healthy(backends)
        most = max(b.active_connections for b in candidates)
        return self.rng.choice([b for b in candidates if b.active_connections == most])


class RandomPick(LeastConnectionsStrategy):
    def select_node(self, backends):
        return self.rng.choice(self.healthy(backends))


# property name -> a mutant it must catch
CAUGHT_BY = {
    "window-bound": NoCap,
    "spaced-never-refused": NeverRefills,
    "ideal-bucket": OffByOne,
    "clients-independent": SharedBucket,
    "backwards-clock": BackwardsMints,
    "forgets-idle-clients": OwnDict,
    "picks-a-minimum": MostConnections,
    "no-healthy-raises": IgnoresHealth,
    "ties-shared": AlwaysFirst,
    "keeps-balance": RandomPick,
}
