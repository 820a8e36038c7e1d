"""Whose code runs: auto / exercise / solution, recognised by probing, never by source."""

from __future__ import annotations

import random

import pytest

from core.exercise import ExerciseNotImplemented
from core.rate_limiter import TokenBucket
from core.strategies import STRATEGIES, Backend, LeastConnectionsStrategy
from solutions.impl import EXERCISES, Impl, is_implemented, rate_limiter_class, resolve, strategy_class
from solutions.least_connections_solution import LeastConnectionsSolution
from solutions.token_bucket_solution import TokenBucketSolution


@pytest.fixture
def stubbed(monkeypatch):
    """Force both exercises to be stubs, whatever the student has done to the tree."""
    def stub(self, *a, **kw):
        raise ExerciseNotImplemented("x", "m", "p", "s", "h")
    monkeypatch.setattr(TokenBucket, "is_allowed", stub)
    monkeypatch.setattr(LeastConnectionsStrategy, "select_node", stub)


@pytest.fixture
def implemented(monkeypatch):
    """Pretend the student pasted the solutions in."""
    monkeypatch.setattr(TokenBucket, "is_allowed", TokenBucketSolution.is_allowed)
    monkeypatch.setattr(LeastConnectionsStrategy, "select_node", LeastConnectionsSolution.select_node)


def test_stub_messages_say_what_where_and_where_the_solution_is() -> None:
    for cls, call, words in [
        (TokenBucket, lambda: TokenBucket(1).is_allowed("a", now=0.0),
         ["TokenBucket.is_allowed", "core/rate_limiter.py", "solutions/token_bucket_solution.py"]),
        (LeastConnectionsStrategy, lambda: LeastConnectionsStrategy().select_node([Backend("a")]),
         ["LeastConnectionsStrategy.select_node", "core/strategies.py", "solutions/least_connections_solution.py"]),
    ]:
        if not is_implemented(next(e for e in EXERCISES.values() if e.exercise_cls is cls)):
            with pytest.raises(ExerciseNotImplemented) as info:
                call()
            assert all(w in str(info.value) for w in words), str(info.value)
            assert isinstance(info.value, NotImplementedError)


@pytest.mark.usefixtures("stubbed")
def test_auto_falls_back_to_the_solution_and_says_so() -> None:
    r = resolve("rate-limiter", "auto")
    assert r.cls is TokenBucketSolution and r.chosen is Impl.SOLUTION
    assert "not implemented yet" in r.notice
    assert strategy_class("least_connections") is LeastConnectionsSolution


@pytest.mark.usefixtures("stubbed")
def test_forcing_the_exercise_on_a_stub_raises_the_stub_error() -> None:
    with pytest.raises(ExerciseNotImplemented):
        resolve("least-connections", Impl.EXERCISE)


@pytest.mark.usefixtures("implemented")
def test_auto_and_exercise_use_the_students_code_once_written() -> None:
    for impl in ("auto", "exercise"):
        assert rate_limiter_class(impl) is TokenBucket
        assert strategy_class("least_connections", impl) is LeastConnectionsStrategy
    assert "using your" in resolve("rate-limiter").notice


@pytest.mark.usefixtures("implemented")
def test_solution_is_always_the_reference() -> None:
    assert rate_limiter_class("solution") is TokenBucketSolution


def test_a_broken_method_counts_as_implemented(monkeypatch) -> None:
    def broken(self, backends):
        return backends.active  # AttributeError: the student's bug, theirs to see
    monkeypatch.setattr(LeastConnectionsStrategy, "select_node", broken)
    assert resolve("least-connections").cls is LeastConnectionsStrategy


def test_other_strategies_are_unaffected_by_impl() -> None:
    for name, cls in STRATEGIES.items():
        if name != "least_connections":
            assert strategy_class(name, "solution") is cls
            assert strategy_class(name, "exercise") is cls


@pytest.mark.parametrize("call, match", [
    (lambda: resolve("rate_limiter"), "unknown exercise"),
    (lambda: resolve("rate-limiter", "mine"), "unknown impl"),
    (lambda: strategy_class("fastest"), "unknown strategy"),
])
def test_bad_names_are_clear_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_solution_classes_are_drop_in() -> None:
    assert TokenBucketSolution(3).is_allowed("a", now=0.0)
    picked = LeastConnectionsSolution(rng=random.Random(1)).select_node([Backend("a", active_connections=2),
                                                                          Backend("b")])
    assert picked.id == "b"
