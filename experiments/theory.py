"""Closed-form queueing results the simulator is checked and benchmarked against.

Rates are per second, times in seconds: ``lam`` arrivals, ``mu`` service rate
of one worker, ``c`` workers, ``k`` places in the node in all.
"""

from __future__ import annotations

import math

__all__ = ["erlang_c_response_s", "md1_response_s", "mmck_blocking"]


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
