"""Per-client token-bucket rate limiting.

Theory of operation
-------------------
Every client id owns a bucket that holds at most ``capacity`` tokens. A bucket
starts full, refills continuously at ``rate_per_s`` tokens per second, and each
allowed request takes one token. Two promises follow, and the property suite
checks both:

* in any window of length ``t`` a client is allowed at most
  ``capacity + rate_per_s * t`` requests;
* a client that spaces its requests at least ``1 / rate_per_s`` apart is never
  refused.

Time comes in as the keyword ``now`` (seconds, any origin): the live driver
passes ``loop.time()``, the simulator ``env.now``. A ``now`` earlier than a
bucket's last update counts as no time passing, so a clock that steps backwards
never mints tokens.

Memory: a bucket that has refilled to full behaves exactly like a bucket that
was never created, so it may be forgotten. When a new client arrives and the
table has reached its sweep mark, :meth:`TokenBucket.sweep` drops every full
bucket and the mark is set to twice what is left (at least
``MIN_SWEEP_MARK``). A sweep of n buckets thus follows at least n/2 new clients
since the previous one: O(1) amortized per call, and the table never holds
more than twice the clients seen in the last ``capacity / rate_per_s`` seconds
(or ``MIN_SWEEP_MARK``). A million one-off clients do not leave a million
buckets behind.

That bound is in clients seen per refill time, which a slow rate makes large
(a million one-off clients at 0.001/s are all still owed tokens). So the table
also holds at most ``max_clients`` buckets (default
:data:`DEFAULT_MAX_CLIENTS`): it is kept in least-recently-used order (a
lookup of a known client moves it to the end, O(1): about 0.1 us, the one
cost a known client pays), and a new client that finds the table full evicts
the least recently used bucket first, O(1). An
evicted client comes back with a full bucket, exactly as a swept one does: the
cap errs toward allowing, never toward refusing, and only a client that has
been quiet longer than ``max_clients`` others can gain by it. Evictions count
toward the sweep mark as the buckets would have, so sweeps stay amortized O(1)
with the table full. Keys are capped upstream (a node keys on at most 256
bytes, :mod:`core.client_key`), so ``max_clients`` bounds the table in bytes
too: a bucket and its table entry take about 190 bytes besides its key
(tracemalloc, CPython 3.11) and a 256-byte key 305 more, so the default table
holds about 50 MB at most whatever clients send. Measured on a node: 300,000
distinct 256-byte ids at 0.001/s grew its RSS by 54 MB, 1,000,000 short ones
by 42 MB (268 MB uncapped).

Student exercise 1 is :meth:`TokenBucket.is_allowed`; everything else here is
complete and is what the live node and the simulator call
(:meth:`TokenBucket.acquire`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

from core._validate import integer, number
from core.exercise import ExerciseNotImplemented

__all__ = ["Bucket", "DEFAULT_MAX_CLIENTS", "RateLimitDecision", "TokenBucket", "retry_after"]

#: Buckets a :class:`TokenBucket` keeps at most, by default (least recently used evicted past it).
DEFAULT_MAX_CLIENTS = 100_000


class Bucket:
    """One client's bucket: ``tokens`` available as of time ``updated_at`` (seconds)."""

    __slots__ = ("tokens", "updated_at")

    def __init__(self, tokens: float, updated_at: float) -> None:
        self.tokens = tokens
        self.updated_at = updated_at

    def __repr__(self) -> str:
        return f"Bucket(tokens={self.tokens!r}, updated_at={self.updated_at!r})"


class RateLimitDecision(NamedTuple):
    """The outcome of one :meth:`TokenBucket.acquire`, with what HTTP headers need.

    A named tuple rather than a frozen dataclass: as immutable, and built in half the time (one is built
    per request on the node's hot path).

    ``remaining`` is whole tokens left after this request, ``reset_s`` the
    seconds until the bucket is full again, ``retry_after_s`` the seconds until
    the next request would be allowed (0 when one would be now).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` fields (IETF draft) and, on a rejection, ``Retry-After``.

        Seconds are rounded up, so a client that waits as told is not refused again.
        """
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            out["Retry-After"] = retry_after(self.retry_after_s)
        return out


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1, so a client that waits as told is not
    refused again for waiting a fraction too little."""
    return str(max(1, math.ceil(seconds)))


class TokenBucket:
    """Token buckets keyed by client id.

    ``rate_per_s`` is the refill rate in tokens per second (> 0); ``capacity`` the
    burst size in tokens (>= 1, default ``rate_per_s`` but at least 1);
    ``max_clients`` the most buckets kept at once (>= 1; see the module docstring).
    """

    #: The table is never swept below this many buckets.
    MIN_SWEEP_MARK = 1024

    def __init__(self, rate_per_s: float, capacity: float | None = None, *,
                 max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        self.rate_per_s = number("rate_per_s", rate_per_s, gt=0)
        if capacity is None:
            capacity = max(1.0, self.rate_per_s)
        self.capacity = number("capacity", capacity, ge=1)
        self.max_clients = integer("max_clients", max_clients, ge=1)
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()  # least recently used first
        self._sweep_mark = self.MIN_SWEEP_MARK
        self.evicted = 0  # buckets dropped by the max_clients cap (not by sweeps), ever

    # -- student exercise 1 -------------------------------------------------
    def is_allowed(self, client_id: str, *, now: float) -> bool:
        """Take one token from ``client_id``'s bucket if it has one; say whether it did.

        ``now`` is the current time in seconds. Get the bucket with
        ``bucket = self._bucket(client_id, now=now)`` (a new client gets a full
        one), then:

        1. refill it for the time since ``bucket.updated_at`` at ``self.rate_per_s``
           tokens per second, never above ``self.capacity``, and never for a
           ``now`` earlier than ``bucket.updated_at`` (a clock going backwards
           must not mint tokens);
        2. if at least one token is there, take it and return True; otherwise
           return False and take nothing.
        """
        raise ExerciseNotImplemented(
            "rate-limiter", "TokenBucket.is_allowed", "core/rate_limiter.py",
            "solutions/token_bucket_solution.py",
            "refill the client's bucket for the time since its last update, then take a token if one is there",
        )

    # -- what drivers call ----------------------------------------------------
    def acquire(self, client_id: str, *, now: float) -> RateLimitDecision:
        """Decide one request of ``client_id`` at ``now`` and report the header data."""
        allowed = self.is_allowed(client_id, now=now)
        tokens = self._tokens(client_id, now)
        return RateLimitDecision(
            allowed=allowed,
            limit=int(self.capacity),
            remaining=int(tokens),
            reset_s=(self.capacity - tokens) / self.rate_per_s,
            retry_after_s=0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s,
        )

    def remaining(self, client_id: str, *, now: float) -> int:
        """Whole tokens ``client_id`` could spend at ``now`` (read-only)."""
        return int(self._tokens(client_id, now))

    def retry_after(self, client_id: str, *, now: float) -> float:
        """Seconds from ``now`` until ``client_id`` has a token (0.0 if it has one now)."""
        tokens = self._tokens(client_id, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate_per_s

    def reset_after(self, client_id: str, *, now: float) -> float:
        """Seconds from ``now`` until ``client_id``'s bucket is full again."""
        return (self.capacity - self._tokens(client_id, now)) / self.rate_per_s

    @property
    def tracked_clients(self) -> int:
        """How many buckets are held in memory (full ones are dropped lazily; never more than ``max_clients``)."""
        return len(self._buckets)

    def sweep(self, *, now: float) -> int:
        """Drop every bucket that is full at ``now``; return how many were dropped.

        New clients trigger it when the table reaches its sweep mark, so a driver
        never needs to; one may still call it on a timer to give memory back sooner.
        The survivors keep their least-recently-used order, in a new table (a
        dict never gives back the room of deleted entries).
        """
        before = len(self._buckets)
        capacity, rate = self.capacity, self.rate_per_s
        self._buckets = OrderedDict((cid, b) for cid, b in self._buckets.items()
                                    if b.tokens + (now - b.updated_at) * rate < capacity)
        self._sweep_mark = max(self.MIN_SWEEP_MARK, 2 * len(self._buckets))
        return before - len(self._buckets)

    # -- helpers --------------------------------------------------------------
    def _bucket(self, client_id: str, *, now: float) -> Bucket:
        """Return ``client_id``'s bucket; a new client gets a full one, dated ``now``.

        A known client becomes the most recently used; a new one may first
        trigger a sweep or evict the least recently used bucket (:meth:`_make_room`).
        """
        buckets = self._buckets
        bucket = buckets.get(client_id)
        if bucket is None:
            size = len(buckets)
            if size >= self._sweep_mark or size >= self.max_clients:
                self._make_room(now=now)  # a sweep makes a new table: not ``buckets`` any more
            bucket = self._buckets[client_id] = Bucket(self.capacity, now)
        else:
            buckets.move_to_end(client_id)
        return bucket

    def _make_room(self, *, now: float) -> None:
        """Before a new bucket: sweep if the mark is reached, then evict least recently used buckets
        until there is room for one more under ``max_clients``. Each eviction brings the sweep mark one
        nearer, as the evicted bucket would have by staying, so a full table is still swept after as many
        new clients as an unbounded one would be."""
        if len(self._buckets) >= self._sweep_mark:
            self.sweep(now=now)
        buckets = self._buckets
        while len(buckets) >= self.max_clients:
            buckets.popitem(last=False)
            self.evicted += 1
            self._sweep_mark -= 1

    def _tokens(self, client_id: str, now: float) -> float:
        """Tokens in ``client_id``'s bucket at ``now``, without changing anything."""
        bucket = self._buckets.get(client_id)
        if bucket is None:
            return self.capacity
        elapsed = max(0.0, now - bucket.updated_at)
        return min(self.capacity, bucket.tokens + elapsed * self.rate_per_s)
