"""Scenario builders and closed-form queueing results for the simulator tests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.scenario import Scenario


def one_node(*, workers: int, load: float, service: str = "exponential", requests: int = 100_000,
             seed: int = 1, load_factor_ms: float = 25.0, **node: Any) -> Scenario:
    """One node behind the balancer, Poisson arrivals at ``load`` of its capacity, ~``requests`` arrivals."""
    rate = load * workers * 1000.0 / load_factor_ms
    duration = requests / rate
    return Scenario.from_mapping({
        "name": "one-node", "seed": seed, "duration_s": duration, "warmup_s": duration * 0.05,
        "workload": {"arrival": "poisson", "rate_per_s": rate},
        "nodes": [{"id": "n", "workers": workers, "load_factor_ms": load_factor_ms, "service": service, **node}],
    })


def erlang_c_response_s(c: int, lam: float, mu: float) -> float:
    """Mean response time of M/M/c (Erlang C waiting probability)."""
    a = lam / mu
    top = a ** c / math.factorial(c) * c / (c - a)
    p_wait = top / (sum(a ** k / math.factorial(k) for k in range(c)) + top)
    return p_wait / (c * mu - lam) + 1 / mu


def mmck_blocking(c: int, k: int, lam: float, mu: float) -> float:
    """Probability that an arrival finds all K places of an M/M/c/K queue taken."""
    a = lam / mu
    terms = [a ** n / math.factorial(n) if n <= c else a ** n / (math.factorial(c) * c ** (n - c))
             for n in range(k + 1)]
    return terms[k] / sum(terms)


def md1_response_s(lam: float, mu: float) -> float:
    """Mean response time of M/D/1 (Pollaczek-Khinchine)."""
    rho = lam / mu
    return 1 / mu + rho / (2 * mu * (1 - rho))


T_999 = 3.883  # two-sided 99.9% quantile of Student's t with 19 degrees of freedom


def batch_means(values: np.ndarray, batches: int = 20) -> tuple[float, float]:
    """Mean and the 99.9% confidence half-width by the method of batch means
    (consecutive requests are correlated; batch averages nearly are not)."""
    usable = values[: len(values) // batches * batches].reshape(batches, -1).mean(axis=1)
    return float(values.mean()), T_999 * float(usable.std(ddof=1)) / math.sqrt(batches)
