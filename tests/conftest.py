"""Shared test set-up: Hypothesis profiles and the exercise/solution parametrization.

Profiles: ``ci`` (derandomized, more examples; chosen when CI is set) and
``dev`` (random, fewer examples). Pick one with ``--hypothesis-profile``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from solutions.impl import EXERCISES, is_implemented

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def impl_classes(exercise: str) -> list:
    """pytest params for the student's class (skipped while it is the stub) and the solution."""
    ex = EXERCISES[exercise]
    return [
        pytest.param(ex.exercise_cls, id="exercise", marks=pytest.mark.skipif(
            not is_implemented(ex), reason="exercise not implemented yet")),
        pytest.param(ex.solution_cls, id="solution"),
    ]
