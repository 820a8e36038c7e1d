"""The grader's simulation step passes the reference and fails implementations that
satisfy nothing more than 'returns a healthy backend'."""

from __future__ import annotations

from core.strategies import RandomStrategy
from solutions.grading import _simulate_least_connections, _simulate_rate_limiter
from solutions.least_connections_solution import LeastConnectionsSolution
from solutions.token_bucket_solution import TokenBucketSolution
from tests.solutions.mutants import NoCap


def test_reference_solutions_pass_the_simulation_step() -> None:
    assert _simulate_least_connections(LeastConnectionsSolution).passed
    assert _simulate_rate_limiter(TokenBucketSolution).passed


def test_a_random_pick_does_not_beat_round_robin() -> None:
    result = _simulate_least_connections(RandomStrategy)
    assert not result.passed
    assert "round robin" in result.message and "ms" in result.message


def test_a_bucket_without_a_cap_refuses_too_little() -> None:
    result = _simulate_rate_limiter(NoCap)
    assert not result.passed
    assert "they must match" in result.message
