"""TokenBucket: literal-time unit tests, run on the student's class and the solution."""

from __future__ import annotations

import pytest

from core._validate import ConfigError
from tests.conftest import impl_classes

pytestmark = pytest.mark.parametrize("cls", impl_classes("rate-limiter"))


def test_new_client_gets_a_full_burst_then_refusals(cls) -> None:
    bucket = cls(3)
    assert [bucket.is_allowed("a", now=0.0) for _ in range(10)] == [True] * 3 + [False] * 7


def test_refills_continuously(cls) -> None:
    bucket = cls(2, capacity=2)
    assert bucket.is_allowed("a", now=0.0) and bucket.is_allowed("a", now=0.0)
    assert not bucket.is_allowed("a", now=0.25)  # half a token
    assert bucket.is_allowed("a", now=0.5)       # 0.5 s * 2/s = one token
    assert not bucket.is_allowed("a", now=0.5)


def test_refill_is_capped_at_capacity(cls) -> None:
    bucket = cls(1, capacity=2)
    assert bucket.is_allowed("a", now=0.0)
    # An hour idle still leaves only `capacity` tokens.
    assert [bucket.is_allowed("a", now=3600.0) for _ in range(3)] == [True, True, False]


def test_backwards_clock_mints_nothing(cls) -> None:
    bucket = cls(1, capacity=1)
    assert bucket.is_allowed("a", now=100.0)
    assert not bucket.is_allowed("a", now=50.0)   # clock stepped back 50 s
    assert not bucket.is_allowed("a", now=100.5)  # only 0.5 s since the latest time seen
    assert bucket.is_allowed("a", now=101.0)


def test_clients_have_separate_buckets(cls) -> None:
    bucket = cls(1)
    assert bucket.is_allowed("a", now=0.0)
    assert not bucket.is_allowed("a", now=0.0)
    assert bucket.is_allowed("b", now=0.0)


def test_fractional_rate_and_default_capacity(cls) -> None:
    bucket = cls(0.5)  # capacity defaults to max(1, rate)
    assert bucket.capacity == 1
    assert bucket.is_allowed("a", now=0.0)
    assert not bucket.is_allowed("a", now=1.9)
    assert bucket.is_allowed("a", now=2.0)


def test_retry_after_remaining_and_reset(cls) -> None:
    bucket = cls(4, capacity=2)
    assert bucket.remaining("a", now=0.0) == 2 and bucket.retry_after("a", now=0.0) == 0.0
    bucket.is_allowed("a", now=0.0)
    bucket.is_allowed("a", now=0.0)
    assert bucket.remaining("a", now=0.0) == 0
    assert bucket.retry_after("a", now=0.0) == pytest.approx(0.25)
    assert bucket.retry_after("a", now=0.1) == pytest.approx(0.15)
    assert bucket.reset_after("a", now=0.0) == pytest.approx(0.5)
    # Reading never changes the bucket.
    assert bucket.remaining("a", now=0.0) == 0


def test_acquire_reports_header_data(cls) -> None:
    bucket = cls(1, capacity=2)
    first = bucket.acquire("a", now=0.0)
    assert first.allowed and first.remaining == 1 and first.limit == 2
    assert first.headers() == {"RateLimit-Limit": "2", "RateLimit-Remaining": "1", "RateLimit-Reset": "1"}
    bucket.acquire("a", now=0.0)
    refused = bucket.acquire("a", now=0.2)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.8)
    headers = refused.headers()
    assert headers["Retry-After"] == "1" and headers["RateLimit-Remaining"] == "0"
    assert headers["RateLimit-Reset"] == "2"  # 1.8 s to full, rounded up


def test_a_million_one_off_clients_leave_few_buckets(cls) -> None:
    bucket = cls(5)  # a bucket is full again 0.2 s after one request
    for i in range(1_000_000):
        bucket.is_allowed(f"c{i}", now=i * 0.001)
    # ~200 clients were seen in the last 0.2 s; the table is swept at max(1024, 2 * what survives).
    assert bucket.tracked_clients <= bucket.MIN_SWEEP_MARK


def test_buckets_that_are_not_full_are_kept(cls) -> None:
    bucket = cls(1, capacity=1)
    for i in range(1000):
        bucket.is_allowed(f"c{i}", now=0.0)
    assert bucket.tracked_clients == 1000  # each owes a token: forgetting one would mint it
    assert bucket.sweep(now=0.5) == 0
    assert bucket.sweep(now=1.0) == 1000
    assert bucket.tracked_clients == 0


def test_eviction_never_changes_decisions(cls) -> None:
    evicting, reference = cls(10), cls(10)
    evicting.MIN_SWEEP_MARK = evicting._sweep_mark = 8  # sweeps very often
    reference._sweep_mark = 10**9      # never forgets anything
    for i in range(5000):
        client, now = f"c{i % 37}", i * 0.013
        assert evicting.is_allowed(client, now=now) == reference.is_allowed(client, now=now)
    assert evicting.tracked_clients < reference.tracked_clients


@pytest.mark.parametrize("args, field", [
    ((0,), "rate_per_s"), ((-1,), "rate_per_s"), ((float("nan"),), "rate_per_s"), (("5",), "rate_per_s"),
    ((True,), "rate_per_s"), ((5, 0.5), "capacity"), ((5, float("inf")), "capacity"),
])
def test_bad_configuration_names_the_field(cls, args, field) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        cls(*args)
    assert info.value.field == field



# -- the max_clients cap (issue 11, item 7): least recently used evicted, erring toward allowing --------------
def test_the_table_holds_max_clients_and_evicts_the_least_recently_used(cls) -> None:
    bucket = cls(0.001, capacity=1, max_clients=3)  # a spent token takes 1000 s to come back
    assert [bucket.is_allowed(c, now=t) for c, t in [("a", 0.0), ("b", 1.0), ("c", 2.0)]] == [True] * 3
    assert not bucket.is_allowed("a", now=3.0)  # a is now the most recently used: b, c, a
    assert bucket.is_allowed("d", now=4.0)      # full: b, the least recently used, goes
    assert bucket.tracked_clients == 3 and bucket.evicted == 1
    assert bucket.is_allowed("b", now=5.0)      # b comes back with a full bucket; c goes: a, d, b
    assert bucket.is_allowed("c", now=6.0)      # and so does c; a goes: d, b, c
    assert bucket.evicted == 3 and bucket.tracked_clients == 3
    assert not bucket.is_allowed("d", now=7.0) and not bucket.is_allowed("b", now=7.0)  # kept: still owed
    assert bucket.is_allowed("a", now=8.0)      # evicted at 6.0: forgiven


def test_a_cap_only_ever_allows_more_than_an_unbounded_table(cls) -> None:
    import random

    # An evicted client starts again from a full bucket, which holds at least what its old one did; so at
    # every moment it has been allowed at least as many requests as it would have been without the cap.
    rng = random.Random(7)
    capped, unbounded = cls(0.5, capacity=2, max_clients=8), cls(0.5, capacity=2, max_clients=10**9)
    allowed = {"capped": dict.fromkeys(range(40), 0), "unbounded": dict.fromkeys(range(40), 0)}
    for i in range(20_000):
        c, now = rng.randrange(40), i * 0.01
        allowed["capped"][c] += capped.is_allowed(f"c{c}", now=now)
        allowed["unbounded"][c] += unbounded.is_allowed(f"c{c}", now=now)
        assert allowed["capped"][c] >= allowed["unbounded"][c], f"request {i}: client c{c} got fewer with the cap"
    assert capped.tracked_clients <= 8 and capped.evicted > 0
    assert sum(allowed["capped"].values()) > sum(allowed["unbounded"].values())


def test_a_cap_above_the_clients_changes_nothing(cls) -> None:
    capped, unbounded = cls(3, max_clients=37), cls(3)
    for i in range(5000):
        client, now = f"c{i % 37}", i * 0.011
        assert capped.is_allowed(client, now=now) == unbounded.is_allowed(client, now=now)
    assert capped.evicted == 0


def test_many_distinct_ids_at_a_slow_rate_stay_within_the_cap(cls) -> None:
    # The 1,000,000 ids at 0.001/s: every bucket is still owed a token, so sweeps free nothing.
    bucket = cls(0.001, max_clients=5000)
    assert all(bucket.is_allowed(f"id-{i}", now=i * 1e-4) for i in range(200_000))
    assert bucket.tracked_clients == 5000 and bucket.evicted == 195_000


def test_sweeps_stay_amortized_when_the_table_is_full(cls) -> None:
    sweeps = []

    class Counting(cls):  # type: ignore[misc, valid-type]
        def sweep(self, *, now: float) -> int:
            sweeps.append(len(self._buckets))
            return super().sweep(now=now)

    bucket = Counting(0.001, max_clients=2000)
    n = 100_000
    for i in range(n):
        bucket.is_allowed(f"id-{i}", now=i * 1e-4)
    # Each sweep of a full table (2000 buckets, none full) follows ~2000 new clients: O(1) per client.
    assert sum(sweeps) <= 2 * n and len(sweeps) <= n / 1000


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True])
def test_bad_max_clients_names_the_field(cls, value) -> None:
    with pytest.raises(ConfigError, match="max_clients") as info:
        cls(5, max_clients=value)
    assert info.value.field == "max_clients"
