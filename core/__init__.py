"""Sans-I/O resilience algorithms: no clocks, sockets, asyncio or simpy here.

Every time-dependent call takes a keyword-only ``now`` in seconds; the live
runtime (``live/``) and the simulator (``sim/``) are the drivers that own time.
"""

from core._validate import ConfigError
from core.backpressure import BackpressureGate
from core.circuit_breaker import CircuitBreaker, CircuitOpen, State
from core.exercise import ExerciseNotImplemented
from core.latency import PeakEwma
from core.rate_limiter import TokenBucket
from core.registry import Membership
from core.strategies import STRATEGIES, Backend, NoHealthyBackend, make_strategy

__all__ = [
    "BackpressureGate", "Backend", "CircuitBreaker", "CircuitOpen", "ConfigError",
    "ExerciseNotImplemented", "Membership", "NoHealthyBackend", "PeakEwma", "STRATEGIES", "State",
    "TokenBucket", "make_strategy",
]
