"""Reference solution of exercise 1: ``TokenBucket.is_allowed``.

To use it, copy the method below over the stub in ``core/rate_limiter.py``
(same indentation, replacing the whole stub method). ``testbed check
rate-limiter --impl exercise`` then grades your copy.
"""

from __future__ import annotations

from core.rate_limiter import TokenBucket

__all__ = ["TokenBucketSolution"]


class TokenBucketSolution(TokenBucket):
    """:class:`TokenBucket` with the exercise method filled in."""

    def is_allowed(self, client_id: str, *, now: float) -> bool:
        """Take one token from ``client_id``'s bucket if it has one; say whether it did."""
        bucket = self._bucket(client_id, now=now)
        elapsed = now - bucket.updated_at
        if elapsed > 0:  # a clock that went backwards counts as no time passing
            tokens = bucket.tokens + elapsed * self.rate_per_s
            bucket.tokens = tokens if tokens < self.capacity else self.capacity
            bucket.updated_at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False
