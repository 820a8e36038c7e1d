"""The simulator against closed-form queueing theory.

Each run has ~100,000 requests; the tolerance is the 99.9% confidence
half-width from batch means of that very run, so a check fails only when the
model is wrong (the seeds are fixed, so the verdict is also repeatable).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from core.results import Outcome
from experiments.theory import erlang_c_response_s, md1_response_s, mmck_blocking
from sim.model import Simulation
from tests.sim.helpers import batch_means, one_node, simulation

MU = 40.0  # 25 ms per request


def window(sim: Simulation) -> dict[str, np.ndarray]:
    cols = sim.log.columns()
    order = np.argsort(cols["arrival"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    keep = cols["arrival"] >= sim.scenario.warmup_s
    return {k: v[keep] for k, v in cols.items()}


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("load", [0.5, 0.8])
def test_mmc_mean_response_matches_erlang_c(workers: int, load: float) -> None:
    sim = simulation(one_node(workers=workers, load=load)).run()
    cols = window(sim)
    assert (cols["outcome"] == Outcome.OK).all()
    mean, half = batch_means(cols["end"] - cols["arrival"])
    expected = erlang_c_response_s(workers, load * workers * MU, MU)
    assert abs(mean - expected) <= half, f"sim {mean * 1e3:.2f} ms vs Erlang C {expected * 1e3:.2f} ms ±{half * 1e3:.2f}"
    # A meaningful check: the interval is tight (about 3% of the value at load 0.5, 12% at 0.8).
    assert half < 0.15 * expected


@pytest.mark.parametrize("workers, places, load", [(1, 3, 0.9), (2, 4, 0.9), (4, 6, 1.2)])
def test_backpressure_rejects_the_mmck_blocking_fraction(workers: int, places: int, load: float) -> None:
    sim = simulation(one_node(workers=workers, load=load, backpressure=places)).run()
    cols = window(sim)
    rejected = (cols["outcome"] == Outcome.BACKPRESSURE).astype(float)
    assert set(np.unique(cols["outcome"])) <= {Outcome.OK, Outcome.BACKPRESSURE}
    frac, half = batch_means(rejected)
    expected = mmck_blocking(workers, places, load * workers * MU, MU)
    assert abs(frac - expected) <= half, f"rejected {frac:.4f} vs M/M/{workers}/{places} {expected:.4f} ±{half:.4f}"


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_deterministic_service_matches_md1(load: float) -> None:
    sim = simulation(one_node(workers=1, load=load, service="deterministic")).run()
    cols = window(sim)
    served = cols["end"] - cols["start"]
    assert np.allclose(served, 1 / MU)
    mean, half = batch_means(cols["end"] - cols["arrival"])
    expected = md1_response_s(load * MU, MU)
    assert abs(mean - expected) <= half, f"sim {mean * 1e3:.2f} ms vs P-K {expected * 1e3:.2f} ms ±{half * 1e3:.2f}"


def test_rate_limiter_in_the_model_admits_exactly_what_the_bucket_allows() -> None:
    """One client asking at 3x the limit: every decision is the exact token bucket's."""
    rate, burst = 10, 5
    sim = simulation(one_node(workers=64, load=0.1, load_factor_ms=1.0, requests=3000,
                              rate_limit_per_s=rate, rate_limit_burst=burst)).run()
    cols = sim.log.columns()
    order = np.argsort(cols["arrival"], kind="stable")
    arrivals, outcomes = cols["arrival"][order], cols["outcome"][order]
    assert len(arrivals) > 2000
    tokens, last, admitted = Fraction(burst), None, 0
    for t, outcome in zip(arrivals.tolist(), outcomes.tolist()):
        t = Fraction(t)
        tokens = min(Fraction(burst), tokens + (t - last) * rate) if last is not None else tokens
        last = t
        should = tokens >= 1
        assert (outcome == Outcome.OK) == should, f"at t={float(t):.6f} the bucket held {float(tokens):.6f}"
        if should:
            tokens -= 1
            admitted += 1
    span = float(arrivals[-1] - arrivals[0])
    assert burst + rate * span - 1 <= admitted <= burst + rate * span
