"""HealthTracker and the failure rule the balancers share."""

from __future__ import annotations

import pytest

from core._validate import ConfigError
from core.health import HealthTracker, counts_as_failure
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
