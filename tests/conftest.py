"""Shared test set-up: Hypothesis profiles and the exercise/solution parametrization.

Profiles: ``ci`` (derandomized, more examples; chosen when CI is set) and
``dev`` (random, fewer examples). Pick one with ``--hypothesis-profile``.
"""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import HealthCheck, settings

from solutions.impl import EXERCISES, is_implemented

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# A suite started in the background of a non-interactive shell (`./.ci/run &`) inherits SIGINT ignored, and
# so would every process it starts, since an ignored signal stays ignored across exec: the tests that send
# Ctrl-C to a command would then find it deaf. Handled here, it is back to the default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def impl_classes(exercise: str) -> list:
    """pytest params for the student's class (skipped while it is the stub) and the solution."""
    ex = EXERCISES[exercise]
    return [
        pytest.param(ex.exercise_cls, id="exercise", marks=pytest.mark.skipif(
            not is_implemented(ex), reason="exercise not implemented yet")),
        pytest.param(ex.solution_cls, id="solution"),
    ]
