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
from experiments.theory import (
    erlang_c_response_s, md1_response_s, mm1_relaxation_s, mm1_response_s, mm1_transient_response_s, mmck_blocking,
    power_of_d_response_s,
)
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


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.5, 0.9, 0.99, 0.999])
def test_one_choice_is_mm1(rho: float) -> None:
    """d = 1: the exponent (d^i - d) / (d - 1) is i - 1, a geometric series, M/M/1's 1 / (mu - lam)."""
    assert power_of_d_response_s(rho * MU, MU, 1) == pytest.approx(mm1_response_s(rho * MU, MU), rel=1e-10)
    assert mm1_response_s(rho * MU, MU) == pytest.approx(1 / (MU * (1 - rho)))


def test_power_of_two_known_values() -> None:
    # By hand: 1 + rho^2 + rho^6 + rho^14 + rho^30 + ... service times.
    assert power_of_d_response_s(0.5, 1.0) == pytest.approx(1 + 1 / 4 + 1 / 64 + 2 ** -14 + 2 ** -30, rel=1e-12)
    assert power_of_d_response_s(0.9, 1.0) == pytest.approx(sum(0.9 ** (2 ** i - 2) for i in range(1, 12)), rel=1e-12)
    assert power_of_d_response_s(0.99, 1.0) == pytest.approx(5.4320, abs=1e-4)  # against M/M/1's 100
    assert power_of_d_response_s(0.9, 1.0, 3) == pytest.approx(1 + 0.9 ** 3 + 0.9 ** 12 + 0.9 ** 39 + 0.9 ** 120,
                                                               rel=1e-9)
    assert power_of_d_response_s(0.5 * MU, MU) == pytest.approx(power_of_d_response_s(0.5, 1.0) / MU)
    assert power_of_d_response_s(0.0, 1.0) == 1.0  # nobody waits


@pytest.mark.parametrize("rho, d", [(0.5, 2), (0.95, 2), (0.999, 2), (0.999, 3), (0.9, 1)])
def test_the_series_stops_within_its_bound(rho: float, d: int) -> None:
    """What the sum leaves out is at most its geometric bound: a much longer exact sum agrees to rel_tol."""
    many = sum(rho ** ((d ** i - d) // (d - 1) if d > 1 else i - 1) for i in range(1, 40 if d > 1 else 40_000))
    for tol in (1e-3, 1e-6, 1e-12):
        got = power_of_d_response_s(rho, 1.0, d, rel_tol=tol)
        assert -1e-14 * many <= many - got <= tol * many  # (float sums in another order differ by ~1e-16)


def test_more_choices_are_faster_and_the_bad_inputs_are_named() -> None:
    times = [power_of_d_response_s(0.95, 1.0, d) for d in (1, 2, 3, 10)]
    assert times == sorted(times, reverse=True) and times[0] / times[1] > 5
    with pytest.raises(ValueError, match="lam / mu < 1, got 1"):
        power_of_d_response_s(1.0, 1.0)
    with pytest.raises(ValueError, match="d must be >= 1, got 0"):
        power_of_d_response_s(0.5, 1.0, 0)
    with pytest.raises(ValueError, match="M/M/1 needs 0 <= lam < mu, got lam=2, mu=1"):
        mm1_response_s(2.0, 1.0)


@pytest.mark.parametrize("rho, warmup, window, bias_percent", [
    (0.5, 1.5, 1.0, -0.91), (0.7, 2.0, 1.0, -0.51), (0.95, 2.0, 1.0, -0.60), (0.95, 1.5, 1.0, -1.24),
    (0.9, 2.0, 0.5, -0.78),
])
def test_mm1_from_empty_against_an_independent_computation(rho: float, warmup: float, window: float,
                                                           bias_percent: float) -> None:
    """Warm-up and window in relaxation times; the biases were computed apart from this code, with
    scipy's expm_multiply on the truncated generator (the transient of the chain, integrated)."""
    tau = mm1_relaxation_s(rho, 1.0)
    got = mm1_transient_response_s(rho, 1.0, warmup * tau, (warmup + window) * tau)
    assert 100 * (got / mm1_response_s(rho, 1.0) - 1) == pytest.approx(bias_percent, abs=0.01)


def test_mm1_from_empty_starts_at_one_service_and_ends_stationary() -> None:
    assert mm1_transient_response_s(0.9 * MU, MU, 0.0, 1e-6) == pytest.approx(1 / MU, rel=1e-4)  # + lam t / 2
    late = mm1_transient_response_s(0.5 * MU, MU, 100.0, 200.0)  # 4,000 service times, 340 relaxation times
    assert late == pytest.approx(mm1_response_s(0.5 * MU, MU), rel=1e-9)
    early = [mm1_transient_response_s(0.9 * MU, MU, t, t + 1) for t in (0, 1, 4, 16)]
    assert early == sorted(early) and early[-1] < mm1_response_s(0.9 * MU, MU)
    with pytest.raises(ValueError, match="start_s=2, end_s=1"):
        mm1_transient_response_s(0.5, 1.0, 2.0, 1.0)
