"""Fixtures for the live apps: a clock the test moves by hand, and real ``testbed`` processes stopped by PID."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.live.procs import Proc


class FakeClock:
    """Seconds that pass only when the test says so; hand it to an app as ``clock``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def procs() -> Iterator[Callable[..., Proc]]:
    """``procs("node", "--port", "0", ...)`` starts a ``testbed`` process; all are stopped, last first, by PID."""
    started: list[Proc] = []

    def start(*args: str) -> Proc:
        p = Proc(*args)
        started.append(p)
        return p

    yield start
    for p in reversed(started):
        p.stop()
