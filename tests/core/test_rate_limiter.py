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

