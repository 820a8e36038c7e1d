"""HealthTracker and the failure rule the balancers share."""

from __future__ import annotations

import pytest

from core._validate import ConfigError
from core.health import CheckSchedule, HealthTracker, counts_as_failure, default_health_timeout_s
from core.results import OUTCOME_STATUS, Outcome


def test_unhealthy_after_consecutive_failures_and_back_after_passes() -> None:
    h = HealthTracker(unhealthy_after=2, healthy_after=2)
    assert h.observe(False) is True          # one failure is not enough
    assert h.observe(True) is True           # and a pass resets the count
    assert h.observe(False) is True
    assert h.observe(False) is False         # two in a row
    assert h.observe(True) is False          # one pass is not enough to come back
    assert h.observe(True) is True
    assert h.transitions == 2


def test_defaults_react_to_the_first_signal() -> None:
    h = HealthTracker()
    assert h.observe(False) is False and h.observe(True) is True


@pytest.mark.parametrize("kwargs", [{"unhealthy_after": 0}, {"healthy_after": 0}])
def test_bad_thresholds(kwargs) -> None:
    with pytest.raises(ConfigError):
        HealthTracker(**kwargs)


@pytest.mark.parametrize("status, failure", [(200, False), (404, False), (429, False), (499, False),
                                             (500, True), (502, True), (503, True), (504, True)])
def test_only_5xx_count_against_a_backend(status: int, failure: bool) -> None:
    assert counts_as_failure(status) is failure


def test_every_outcome_has_the_status_the_live_processes_answer() -> None:
    assert set(OUTCOME_STATUS) == set(Outcome)
    assert [o for o in Outcome if counts_as_failure(OUTCOME_STATUS[o])] == [
        Outcome.CIRCUIT_OPEN, Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.NO_BACKEND, Outcome.TIMEOUT]


# -- holding a backend until it is checked ------------------------------------------------------------------
def test_a_held_backend_is_out_until_its_first_check_passes() -> None:
    h = HealthTracker(unhealthy_after=2)
    h.hold()
    assert h.healthy is False and h.transitions == 0
    assert h.observe(False) is False
    assert h.observe(True) is True and h.transitions == 1


# -- when checks are due -------------------------------------------------------------------------------------
def test_the_default_check_timeout_is_half_the_interval() -> None:
    assert default_health_timeout_s(1.0) == 0.5 and default_health_timeout_s(10.0) == 5.0


def test_new_backends_are_due_at_once_then_once_per_interval_on_their_slice() -> None:
    s: CheckSchedule[str] = CheckSchedule(1.0, slices=4)
    for key in "abcd":
        s.add(key)
    assert s.due(now=10.0) == ["a", "b", "c", "d"]  # each checked at once when it joins
    assert s.next_deadline() == 10.25
    # Then one slice per tick: a 1 s interval in 4 ticks of 0.25 s, each backend on its own tick.
    assert [s.due(now=10.0 + t / 4) for t in range(1, 8)] == [["b"], ["c"], ["d"], ["a"], ["b"], ["c"], ["d"]]
    assert s.due(now=11.8) == []  # between ticks: nothing


def test_the_schedule_is_fixed_whatever_the_driver_is_late() -> None:
    s: CheckSchedule[int] = CheckSchedule(1.0, slices=10)
    for key in range(20):
        s.add(key)
    s.due(now=0.0)
    assert sorted(s.due(now=0.13)) == [1, 11]  # tick 1 (0.1 s), taken 30 ms late
    assert s.next_deadline() == pytest.approx(0.2)  # the next tick did not move
    assert sorted(s.due(now=0.35)) == [2, 3, 12, 13]  # two ticks slept through: both slices, once
    assert sorted(s.due(now=5.0)) == list(range(20))  # far behind: every backend once, not once per round
    assert s.next_deadline() == pytest.approx(5.1)


def test_backends_are_spread_evenly_and_leaving_frees_their_place() -> None:
    s: CheckSchedule[int] = CheckSchedule(2.0, slices=10)
    for key in range(1000):
        s.add(key)
    s.due(now=0.0)
    per_tick = [len(s.due(now=0.2 * t)) for t in range(1, 11)]
    assert per_tick == [100] * 10  # a steady trickle, no burst
    for key in range(0, 1000, 10):
        s.remove(key)
    s.remove(-1)  # unknown: fine
    assert len(s) == 900
    s.add(5000)  # joins the slice that lost members... every slice lost 10; it goes to one of them
    assert s.due(now=2.01) == [5000]  # and is checked at once
    assert sum(len(s.due(now=2.0 + 0.2 * t)) for t in range(1, 11)) == 901


def test_a_clock_that_goes_back_makes_nothing_due_twice() -> None:
    s: CheckSchedule[str] = CheckSchedule(1.0, slices=2)
    s.add("a")
    s.add("b")
    s.due(now=5.0)
    assert s.due(now=5.5) == ["b"]
    assert s.due(now=4.0) == [] and s.due(now=5.6) == []
    assert s.due(now=6.0) == ["a"]
