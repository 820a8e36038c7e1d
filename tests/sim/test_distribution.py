"""The simulator's response-time distribution against M/M/1 theory, not only its mean.

In an M/M/1 FIFO queue the response time (wait plus service) is exponential
with rate ``mu - lambda``, so its q-quantile is ``-ln(1 - q) / (mu - lambda)``.
A mean alone cannot tell FIFO from other work-conserving orders (LIFO has the
same mean and a far longer tail); the quantiles can.

Each run has ~100,000 requests. The estimate is the quantile of the whole
measurement window; its tolerance is the 99.9% confidence half-width from the
spread of the same quantile over 20 consecutive batches (sectioning: batch
means applied to quantiles, since consecutive response times are correlated
and batch quantiles nearly are not). The seeds are fixed, so the verdict is
repeatable; a check fails only when the model is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.results import Outcome
from tests.sim.helpers import T_999, one_node, simulation

MU = 40.0  # 25 ms per request
BATCHES = 20  # T_999 is Student's t for BATCHES - 1 degrees of freedom


def quantile_interval(values: np.ndarray, q: float) -> tuple[float, float]:
    """The ``q``-quantile of ``values`` and its 99.9% confidence half-width by sectioning."""
    usable = values[: len(values) // BATCHES * BATCHES].reshape(BATCHES, -1)
    per_batch = np.quantile(usable, q, axis=1)
    return float(np.quantile(values, q)), T_999 * float(per_batch.std(ddof=1)) / math.sqrt(BATCHES)


@pytest.fixture(scope="module", params=[0.5, 0.8], ids=lambda load: f"load{load}")
def mm1(request: pytest.FixtureRequest) -> tuple[float, np.ndarray]:
    """(load, response times in arrival order) of one M/M/1 run, warm-up excluded."""
    load = request.param
    sim = simulation(one_node(workers=1, load=load)).run()
    cols = sim.log.columns()
    order = np.argsort(cols["arrival"], kind="stable")
    arrival, end, outcome = cols["arrival"][order], cols["end"][order], cols["outcome"][order]
    keep = arrival >= sim.scenario.warmup_s
    assert (outcome[keep] == Outcome.OK).all()
    return load, (end - arrival)[keep]


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99], ids=["p50", "p90", "p99"])
def test_mm1_response_time_quantiles_are_exponential(mm1: tuple[float, np.ndarray], q: float) -> None:
    load, response = mm1
    expected = -math.log(1 - q) / (MU - load * MU)
    got, half = quantile_interval(response, q)
    assert abs(got - expected) <= half, (
        f"p{q * 100:g} at load {load}: sim {got * 1e3:.1f} ms vs exponential {expected * 1e3:.1f} ms "
        f"±{half * 1e3:.1f}")
    # A meaningful check: the interval is tight (3-8% of the value at load 0.5, 8-22% at 0.8).
    assert half < 0.3 * expected
