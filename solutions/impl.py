"""Whose code runs: the student's exercise method or the reference solution.

Every command that uses an exercise takes ``--impl {auto,exercise,solution}``
(or the ``TESTBED_IMPL`` environment variable):

``auto`` (default)  the student's method if it is implemented, otherwise the
                    reference solution; :attr:`Resolution.notice` says which.
``exercise``        the student's method; a stub raises ExerciseNotImplemented
                    with a message saying what to write, where.
``solution``        the reference solution.

A stub is recognised by calling the method once on a throw-away object and
seeing :class:`core.exercise.ExerciseNotImplemented`, so a student may edit the
method any way they like. Anything else the call does, including raising
another exception, counts as implemented: a buggy method is the student's to
see fail, not to have silently replaced.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from core.exercise import ExerciseNotImplemented
from core.rate_limiter import TokenBucket
from core.strategies import STRATEGIES, Backend, BaseStrategy, LeastConnectionsStrategy
from solutions.least_connections_solution import LeastConnectionsSolution
from solutions.token_bucket_solution import TokenBucketSolution

if TYPE_CHECKING:
    from core.scenario import Scenario
    from sim.model import Simulation

__all__ = [
    "EXERCISES", "Exercise", "Impl", "Resolution", "ScenarioClasses", "is_implemented", "rate_limiter_class",
    "resolve", "scenario_classes", "simulate", "simulation", "strategy_class", "uses",
]


class Impl(str, enum.Enum):
    AUTO = "auto"
    EXERCISE = "exercise"
    SOLUTION = "solution"


@dataclass(frozen=True)
class Exercise:
    """One exercise: the class students edit, the reference subclass, and how to probe for a stub."""

    name: str
    method: str
    path: str
    solution_path: str
    exercise_cls: type
    solution_cls: type
    probe: Callable[[type], object]


EXERCISES: dict[str, Exercise] = {
    "rate-limiter": Exercise(
        "rate-limiter", "TokenBucket.is_allowed", "core/rate_limiter.py",
        "solutions/token_bucket_solution.py", TokenBucket, TokenBucketSolution,
        probe=lambda cls: cls(1.0).is_allowed("probe", now=0.0),
    ),
    "least-connections": Exercise(
        "least-connections", "LeastConnectionsStrategy.select_node", "core/strategies.py",
        "solutions/least_connections_solution.py", LeastConnectionsStrategy, LeastConnectionsSolution,
        probe=lambda cls: cls(rng=random.Random(0)).select_node([Backend("probe")]),
    ),
}


@dataclass(frozen=True)
class Resolution:
    """The class to use, whose it is (``exercise`` or ``solution``), and a one-line notice."""

    cls: type
    chosen: Impl
    notice: str


def is_implemented(exercise: Exercise, cls: type | None = None) -> bool:
    """Whether ``cls`` (default: the exercise class) has more than the stub."""
    try:
        exercise.probe(cls or exercise.exercise_cls)
    except ExerciseNotImplemented:
        return False
    except Exception:  # noqa: BLE001 - a method that fails is still an implementation
        return True
    return True


def resolve(name: str, impl: Impl | str = Impl.AUTO) -> Resolution:
    """Pick the class for exercise ``name`` under ``impl``.

    Raises ExerciseNotImplemented when ``exercise`` is forced on a stub, and
    ValueError for an unknown exercise or impl name.
    """
    try:
        exercise = EXERCISES[name]
    except KeyError:
        raise ValueError(f"unknown exercise {name!r}; choose one of: {', '.join(EXERCISES)}") from None
    try:
        impl = Impl(impl)
    except ValueError:
        raise ValueError(f"unknown impl {impl!r}; choose one of: auto, exercise, solution") from None
    if impl is Impl.SOLUTION:
        return Resolution(exercise.solution_cls, Impl.SOLUTION,
                          f"{name}: using the reference solution ({exercise.solution_path})")
    if is_implemented(exercise):
        return Resolution(exercise.exercise_cls, Impl.EXERCISE,
                          f"{name}: using your {exercise.method}() from {exercise.path}")
    if impl is Impl.EXERCISE:
        exercise.probe(exercise.exercise_cls)  # raises the stub's own ExerciseNotImplemented
    return Resolution(exercise.solution_cls, Impl.SOLUTION,
                      f"{name}: {exercise.method}() in {exercise.path} is not implemented yet; "
                      f"using the reference solution ({exercise.solution_path})")


def rate_limiter_class(impl: Impl | str = Impl.AUTO) -> type[TokenBucket]:
    """The TokenBucket class to run under ``impl``."""
    return resolve("rate-limiter", impl).cls


def strategy_class(name: str, impl: Impl | str = Impl.AUTO) -> type[BaseStrategy]:
    """The strategy class registered as ``name``; for least_connections, the one ``impl`` picks."""
    if name == LeastConnectionsStrategy.name:
        return resolve("least-connections", impl).cls
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None


def uses(scenario: Scenario) -> list[str]:
    """The exercises a run of ``scenario`` calls: least connections only as its strategy, the
    rate limiter only on nodes with a rate limit. Nothing else is resolved, so each exercise
    can be done, graded and run on its own, in either order."""
    used = []
    if any(n.rate_limit_per_s for n in scenario.nodes):
        used.append("rate-limiter")
    if scenario.balancer.strategy == LeastConnectionsStrategy.name:
        used.append("least-connections")
    return used


@dataclass(frozen=True)
class ScenarioClasses:
    """The classes a run of a scenario is built from; ``limiter_cls`` is None when no node limits."""

    strategy_cls: type[BaseStrategy]
    limiter_cls: type[TokenBucket] | None


def scenario_classes(scenario: Scenario, impl: Impl | str = Impl.AUTO) -> ScenarioClasses:
    """Resolve, under ``impl``, only the exercises ``scenario`` uses (see :func:`uses`).

    Raises ExerciseNotImplemented when ``impl`` is ``exercise`` and a used one is a stub.
    """
    limiter = rate_limiter_class(impl) if "rate-limiter" in uses(scenario) else None
    return ScenarioClasses(strategy_class(scenario.balancer.strategy, impl), limiter)


def simulation(scenario: Scenario, impl: Impl | str = Impl.AUTO, *, interval_s: float | None = None,
               timeline_nodes: int | None = None) -> Simulation:
    """A :class:`sim.model.Simulation` of ``scenario`` built with the exercise classes ``impl`` picks;
    ``interval_s`` is its timeline's interval in seconds (None: :func:`core.timeline.default_interval_s`),
    ``timeline_nodes`` its per-node cap (None: :data:`core.timeline.TIMELINE_NODES`)."""
    from sim.model import Simulation

    classes = scenario_classes(scenario, impl)
    if timeline_nodes is None:
        return Simulation(scenario, strategy_cls=classes.strategy_cls, limiter_cls=classes.limiter_cls,
                          interval_s=interval_s)
    return Simulation(scenario, strategy_cls=classes.strategy_cls, limiter_cls=classes.limiter_cls,
                      interval_s=interval_s, timeline_nodes=timeline_nodes)


def simulate(scenario: Scenario, impl: Impl | str = Impl.AUTO, *, interval_s: float | None = None) -> dict[str, Any]:
    """Simulate ``scenario`` with the exercise classes ``impl`` picks; return the results dict (its timeline in
    intervals of ``interval_s`` seconds; None: :func:`core.timeline.default_interval_s`)."""
    return simulation(scenario, impl, interval_s=interval_s).run().results()
