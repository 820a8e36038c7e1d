"""Scenario builders, reference simulations and batch means for the simulator tests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.scenario import Scenario
from sim.model import Simulation
from solutions import impl


def simulation(scenario: Scenario, *, keep_rows: bool = True, **options: Any) -> Simulation:
    """A simulation of ``scenario`` with the reference solutions of the exercises it uses, keeping every
    request's row in ``sim.log`` for the test to read (a run keeps none by default); ``options`` go to
    :class:`sim.model.Simulation`."""
    classes = impl.scenario_classes(scenario, "solution")
    return Simulation(scenario, strategy_cls=classes.strategy_cls, limiter_cls=classes.limiter_cls,
                      keep_rows=keep_rows, **options)


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


T_999 = 3.883  # two-sided 99.9% quantile of Student's t with 19 degrees of freedom


def batch_means(values: np.ndarray, batches: int = 20) -> tuple[float, float]:
    """Mean and the 99.9% confidence half-width by the method of batch means
    (consecutive requests are correlated; batch averages nearly are not)."""
    usable = values[: len(values) // batches * batches].reshape(batches, -1).mean(axis=1)
    return float(values.mean()), T_999 * float(usable.std(ddof=1)) / math.sqrt(batches)
