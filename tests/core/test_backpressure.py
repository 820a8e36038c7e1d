"""BackpressureGate: the N+1th request is refused, releases are checked, stats add up."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core._validate import ConfigError
from core.backpressure import BackpressureGate, ReleaseWithoutAcquire


def test_admits_n_and_refuses_the_next() -> None:
    gate = BackpressureGate(3)
    assert [gate.try_acquire() for _ in range(5)] == [True, True, True, False, False]
    gate.release()
    assert gate.try_acquire()
    assert not gate.try_acquire()


def test_stats_match_queue_stats() -> None:
    gate = BackpressureGate(4)
    for _ in range(6):
        gate.try_acquire()
    gate.release()
    assert gate.stats().as_dict() == {
        "current": 3, "max": 4, "utilization_percent": 75.0, "accepted": 4, "rejected": 2,
        "rejection_rate": pytest.approx(2 / 6), "peak": 4,
    }


def test_empty_gate_stats() -> None:
    assert BackpressureGate(1).stats().rejection_rate == 0.0


def test_release_without_acquire_is_an_error() -> None:
    gate = BackpressureGate(2)
    gate.try_acquire()
    gate.release()
    with pytest.raises(ReleaseWithoutAcquire):
        gate.release()
    assert gate.current == 0


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", None, True])
def test_bad_limit_names_the_field(bad) -> None:
    with pytest.raises(ConfigError, match="max_in_flight"):
        BackpressureGate(bad)


@given(limit=st.integers(1, 10), ops=st.lists(st.booleans(), max_size=200))
def test_never_admits_more_than_the_limit(limit: int, ops: list[bool]) -> None:
    """Random arrivals (True) and departures (False) against a counting model."""
    gate = BackpressureGate(limit)
    inside = accepted = rejected = peak = 0
    for arrive in ops:
        if arrive:
            if gate.try_acquire():
                inside += 1
                accepted += 1
            else:
                rejected += 1
                assert inside == limit, "refused although there was room"
        elif inside:
            gate.release()
            inside -= 1
        peak = max(peak, inside)
        assert gate.current == inside <= limit
    stats = gate.stats()
    assert (stats.accepted, stats.rejected, stats.peak) == (accepted, rejected, peak)
