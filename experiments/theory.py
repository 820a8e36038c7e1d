"""Closed-form queueing results the simulator is checked and benchmarked against.

Rates are per second, times in seconds: ``lam`` arrivals, ``mu`` service rate
of one worker, ``c`` workers, ``k`` places in the node in all.

Load balancing over many alike servers: the supermarket model
-------------------------------------------------------------
n one-worker servers, exponential service at rate ``mu``, Poisson arrivals
at ``n * lam`` in all, each sent to a server at once (Mitzenmacher 2001):

* **random** splits a Poisson stream into n Poisson streams of rate ``lam``,
  so every server is an M/M/1 queue: ``E[T] = 1 / (mu - lam)``, exact at
  every n.
* **power of d choices** (``power_of_two``: d = 2) sends each request to the
  shortest of d servers sampled at random. As n -> infinity the fraction of
  servers holding at least i requests tends to ``rho^((d^i - 1) / (d - 1))``,
  ``rho = lam / mu`` (Vvedenskaya, Dobrushin and Karpelevich 1996; the
  mean-field limit), so by Little's law
  ``E[T] = (1 / mu) * sum_{i >= 1} rho^((d^i - d) / (d - 1))``. For d = 1 the
  exponent is i - 1 and the sum is M/M/1's ``1 / (1 - rho)``; for d = 2 it is
  ``1 + rho^2 + rho^6 + rho^14 + ...``, a handful of terms even at rho = 0.99
  (about 5.5 service times there, against M/M/1's 100). A finite n is a little
  slower than the limit.

:func:`supermarket_mu` says when a scenario *is* this model (see there), and
:func:`mean_field_response_s` gives the reference for a strategy at a load;
least connections has none here (its mean-field limit, no waiting at all for
rho < 1, is far from any finite n near saturation).

Both are stationary means, and a simulated run starts empty. Its mean is
biased low until the queues have forgotten that start: an M/M/1 queue's
relaxation time is ``1 / (mu * (1 - sqrt(rho))^2)`` (Morse 1955; Abate and
Whitt 1987), 12 service times at rho = 0.5 but 1,560 at 0.95 and 39,800 at
0.99. Computed exactly (the transient of the M/M/1 chain from empty), a
warm-up of two relaxation times and a window of half a one or more leave a
bias under 1% at every load (-0.6% with a window of one, from 0.5 to 0.99). Power of two forgets much sooner: the mean-field equations
from empty reach 99% of their limit by about ``5 / (1 - rho)`` service times
(49 at 0.9, 97 at 0.95, 457 at 0.99). :func:`warmup_needed_s` gives the
warm-up a point needs, so a table can say where a run was too short; for
random, :func:`mm1_transient_response_s` gives what such a run should show
(M/M/1 from empty, exactly), so even a short run is checked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from core.scenario import Scenario

__all__ = ["CHOICES", "MATCH_REL_TOL", "TIMEOUT_MEANS", "erlang_c_response_s", "from_empty_response_s", "matches",
           "md1_response_s", "mean_field_response_s", "mm1_relaxation_s", "mm1_response_s", "mm1_transient_response_s",
           "mmck_blocking", "power_of_d_response_s", "supermarket_mu", "warmup_needed_s"]

#: Servers each strategy samples before picking the shortest (random: one, so no choice at all).
CHOICES = {"random": 1, "power_of_two": 2}

#: A simulated mean matches theory within its 95% CI or this relative error, whichever is larger.
MATCH_REL_TOL = 0.03

#: Theory needs the balancer's timeout to cut off no response: at least this many times
#: M/M/1's mean, whose tail beyond it, exp(-TIMEOUT_MEANS), is then nothing measurable.
TIMEOUT_MEANS = 20.0


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


def mm1_response_s(lam: float, mu: float) -> float:
    """Mean response time of M/M/1, ``1 / (mu - lam)``; needs ``lam < mu``."""
    if not 0 <= lam < mu:
        raise ValueError(f"M/M/1 needs 0 <= lam < mu, got lam={lam:g}, mu={mu:g}")
    return 1 / (mu - lam)


def mm1_relaxation_s(lam: float, mu: float) -> float:
    """The relaxation time of M/M/1, ``1 / (mu * (1 - sqrt(lam / mu))^2)``: the time constant
    with which a queue forgets where it started."""
    if not 0 <= lam < mu:
        raise ValueError(f"M/M/1 needs 0 <= lam < mu, got lam={lam:g}, mu={mu:g}")
    return 1 / (mu * (1 - math.sqrt(lam / mu)) ** 2)


def mm1_transient_response_s(lam: float, mu: float, start_s: float, end_s: float) -> float:
    """Mean response time of the requests that arrive in ``[start_s, end_s)`` at an M/M/1 queue
    that was empty at time 0: what a run with that warm-up and duration measures on average.

    Uniformization (Jensen 1953): the queue moves at the jumps of a Poisson process of rate
    ``lam + mu`` (up with probability ``lam / (lam + mu)``, else down, or stay at 0), so
    ``E[L(t)] = sum_n P(N(t) = n) E_n`` with ``E_n`` the mean after n jumps, and the time
    integral of ``P(N(t) = n)`` is a Poisson tail. An arrival at t waits for the ``L(t)``
    ahead of it (PASTA; FIFO) and is served: ``(E[L(t)] + 1) / mu``. States beyond where
    the stationary tail is 1e-15 are cut (a queue started empty holds fewer than that one)."""
    if not 0 <= lam < mu or not 0 <= start_s < end_s:
        raise ValueError(f"needs 0 <= lam < mu and 0 <= start_s < end_s, got lam={lam:g}, mu={mu:g}, "
                         f"start_s={start_s:g}, end_s={end_s:g}")
    rate = lam + mu
    jumps = int(rate * end_s + 12 * math.sqrt(rate * end_s) + 30)  # the Poisson tail beyond is nothing
    states = min(jumps + 2, int(math.log(1e-15) / math.log(lam / mu)) + 2 if lam > 0 else 2)
    n = np.arange(jumps)
    mass = _poisson_cdf(n, rate * start_s) - _poisson_cdf(n, rate * end_s)  # (1/rate) * integral of P(N(t) = n)
    p, up, down, level = np.zeros(states), lam / rate, mu / rate, np.arange(states)
    p[0] = 1.0
    area = 0.0
    for k in range(jumps):
        area += mass[k] * float(p @ level)
        moved = np.empty_like(p)
        moved[1:] = p[:-1] * up
        moved[0] = p[0] * down
        moved[:-1] += p[1:] * down
        moved[-1] += p[-1] * up  # the cut: the top state keeps what would climb past it
        p = moved
    return (1 + area / rate / (end_s - start_s)) / mu


def _poisson_cdf(n: np.ndarray, mean: float) -> np.ndarray:
    """P(N <= n) for N Poisson with ``mean``, at the integers ``n`` (0, 1, 2, ...)."""
    if mean == 0:
        return np.ones(len(n))
    log_pmf = -mean + n * math.log(mean) - np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, len(n))))))
    return np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)


def power_of_d_response_s(lam: float, mu: float, d: int = 2, *, rel_tol: float = 1e-12) -> float:
    """Mean response time of the supermarket model with ``d`` choices in the mean-field limit
    (n -> infinity): ``(1 / mu) * sum_{i >= 1} rho^((d^i - d) / (d - 1))`` with ``rho = lam / mu < 1``.

    Term i + 1 is term i times ``q_i = rho^(d^i)``, and the ``q_i`` do not grow, so what
    follows term k is at most ``t_k * q_k / (1 - q_k)`` (a geometric series): the sum stops
    once that bound is below ``rel_tol`` of the sum so far, and is then that close to the
    whole. (d = 1 is geometric, M/M/1; for d >= 2 the terms fall doubly exponentially.)"""
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    rho = lam / mu
    if not 0 <= rho < 1:
        raise ValueError(f"the supermarket model needs 0 <= lam / mu < 1, got {rho:g}")
    total, term, q = 0.0, 1.0, rho ** d  # term 1 is rho^0; q_1 = rho^d
    while True:
        total += term
        if q == 0.0 or term * q / (1 - q) <= rel_tol * total:
            return total / mu
        term, q = term * q, q ** d


def supermarket_mu(scenario: Scenario) -> float | None:
    """The service rate (1/s) of one server when ``scenario`` is the supermarket model, else None.

    It is when every node is alike (one worker, exponential service, the same mean), arrivals
    are Poisson, nothing refuses or fails a request (no rate limit, backpressure, circuit
    breaker, client bulkhead or fault). Whether the balancer's timeout cuts responses off
    depends on the load: :func:`mean_field_response_s` judges that. The name plays no part."""
    kinds = {(n.workers, n.service, n.load_factor_ms, n.rate_limit_per_s, n.backpressure, n.circuit_breaker,
              n.faults, n.max_per_client) for n in scenario.nodes}
    if scenario.workload.arrival != "poisson" or len(kinds) != 1:
        return None
    workers, service, load_factor_ms, *middleware = kinds.pop()
    if workers != 1 or service != "exponential" or any(middleware):
        return None
    return 1000.0 / load_factor_ms


def mean_field_response_s(scenario: Scenario, strategy: str, load: float) -> float | None:
    """Theory's mean response time (s) for ``strategy`` on ``scenario`` at ``load`` (a fraction
    of its capacity), or None where there is none: not the supermarket model, a strategy
    without a formula (only those in :data:`CHOICES`), a load >= 1, or a balancer timeout
    shorter than :data:`TIMEOUT_MEANS` M/M/1 means (it would cut the slowest responses off)."""
    mu = supermarket_mu(scenario)
    if mu is None or strategy not in CHOICES or not 0 < load < 1:
        return None
    lam = load * mu
    if scenario.balancer.timeout_s < TIMEOUT_MEANS * mm1_response_s(lam, mu):
        return None
    return power_of_d_response_s(lam, mu, CHOICES[strategy])


def matches(mean: float, ci95: float | None, expected: float, *, rel_tol: float = MATCH_REL_TOL) -> bool:
    """Whether a simulated ``mean`` (±``ci95``) matches ``expected``: within the CI or ``rel_tol``
    of ``expected``, whichever is larger."""
    return abs(mean - expected) <= max(ci95 or 0.0, rel_tol * expected)


def warmup_needed_s(scenario: Scenario, strategy: str, load: float) -> float | None:
    """The warm-up (s) after which a run of ``strategy`` at ``load`` that started empty is within
    about 1% of theory's stationary mean (see the module docstring): two M/M/1 relaxation times
    for random, ``5 / (1 - rho)`` service times for power of two. None where theory has no value."""
    if mean_field_response_s(scenario, strategy, load) is None:
        return None
    mu = supermarket_mu(scenario) or 1.0  # a value, as theory has one
    if strategy == "random":
        return 2 * mm1_relaxation_s(load * mu, mu)
    return 5 / (1 - load) / mu


def from_empty_response_s(scenario: Scenario, strategy: str, load: float) -> float | None:
    """What a run of ``scenario`` should measure where its warm-up is too short for the point
    (:func:`warmup_needed_s`) and theory knows the transient: random's M/M/1 from empty over the
    run's window ``[warmup_s, duration_s)``. None elsewhere (the stationary value stands)."""
    needed_s = warmup_needed_s(scenario, strategy, load)
    mu = supermarket_mu(scenario)
    if strategy != "random" or needed_s is None or mu is None or scenario.warmup_s >= needed_s:
        return None
    return mm1_transient_response_s(load * mu, mu, scenario.warmup_s, scenario.duration_s)
