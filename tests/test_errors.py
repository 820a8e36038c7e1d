"""Every exception the project defines survives a process pool with its type, message and data.

Sweeps run on a ``ProcessPoolExecutor`` (and on Dask): an exception raised in a
worker comes back pickled. One that cannot be rebuilt ends the sweep in
``BrokenProcessPool`` instead of its own clear message. The test finds every
exception class in the five packages by importing them, so a new one cannot be
added without a sample here.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pickle
import pkgutil
from concurrent.futures import ProcessPoolExecutor

import pytest

from core.addresses import AddressError
from core.balancer_state import AttemptSettled
from core.client_key import BadClientId
from core.circuit_breaker import CircuitOpen, InvalidTransition, Signal, State
from core.errors import DataError
from core.exercise import ExerciseNotImplemented
from core.node_pipeline import TicketSettled
from core.scenario import ScenarioError, _MISSING
from core._validate import ConfigError
from core.backpressure import ReleaseWithoutAcquire
from core.registry import IdTaken, LeaseMismatch, MetadataRefused, RegistryFull, RegistryRefusal
from core.strategies import NoHealthyBackend
from live.discovery import RegistryAnswer
from live.http import _KeyTwice
from live.cluster import ChildFailed
from experiments.executors import ExecutorError
from live.run import LiveRunError
from live.upstream import ConnectFailed, UpstreamError, _TooManyHeaders
from sim.requests_file import RequestsFileError
from solutions.properties import Counterexample

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("core", "sim", "live", "solutions", "experiments")

SAMPLES: list[BaseException] = [
    ExerciseNotImplemented("rate-limiter", "TokenBucket.is_allowed", "core/rate_limiter.py",
                           "solutions/token_bucket_solution.py", "refill, then take a token"),
    ConfigError("rate_per_s", "a finite number > 0", -1),
    ScenarioError("bad.toml", "nodes[0].workers", 0, "must be an integer >= 1"),
    ScenarioError("bad.toml", "workload.rate_per_s", _MISSING, "is required"),
    InvalidTransition(State.OPEN, Signal.PROBES_PASSED),
    CircuitOpen("node-1", State.OPEN, 2.5),
    ReleaseWithoutAcquire("release() with nothing admitted"),
    NoHealthyBackend(3),
    DataError("a message"),
    ChildFailed("node-1 exited before it listened"),
    LiveRunError("node-2 died"),
    UpstreamError("connection reset"),
    ConnectFailed("connection refused"),
    Counterexample("after 1 allowed request at t=0.400, request 2 ..."),
    TicketSettled("ticket of client 'a' settled twice"),
    AttemptSettled("attempt on node-1 settled twice"),
    AddressError("port 99999 is out of range 1-65535"),
    BadClientId("X-Client-ID is longer than 256 bytes", 256),
    RegistryRefusal("a refusal"),
    IdTaken("node-1", "http://127.0.0.1:5001"),
    LeaseMismatch("node-1", True),
    RegistryFull(1000, 2.5),
    MetadataRefused("bytes", "metadata is over 4096 bytes"),
    RegistryAnswer("register", 409, '{"error": {"status": 409}}'),
    _KeyTwice("id"),
    _TooManyHeaders(),
    ExecutorError("tcp://127.0.0.1:8786: no answer within 10 s (--connect-timeout)"),
    RequestsFileError("/nope/x.npz: cannot write there (No such file or directory)"),
]


def project_exceptions() -> set[type]:
    found: set[type] = set()
    for package in PACKAGES:
        names = [package] + [f"{package}.{m.name}" for m in pkgutil.walk_packages([str(ROOT / package)])]
        for name in names:
            module = importlib.import_module(name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == name:
                    found.add(obj)
    return found


def _data(exc: BaseException) -> tuple:
    return type(exc), str(exc), exc.args, vars(exc)


def _raise(exc: BaseException) -> None:
    raise exc


def test_every_project_exception_has_a_sample() -> None:
    from live.http import _JSONHTTPError  # an HTTP response in aiohttp's clothes, never leaves its handler
    missing = project_exceptions() - {type(e) for e in SAMPLES} - {_JSONHTTPError}
    assert not missing, f"add a sample of {sorted(c.__qualname__ for c in missing)} to SAMPLES"


@pytest.mark.parametrize("exc", SAMPLES, ids=lambda e: type(e).__name__)
def test_pickles_with_its_type_message_and_data(exc: BaseException) -> None:
    assert _data(pickle.loads(pickle.dumps(exc))) == _data(exc)


def test_raised_in_a_pool_worker_it_comes_back_whole() -> None:
    with ProcessPoolExecutor(max_workers=1) as pool:
        for exc in SAMPLES:
            with pytest.raises(type(exc)) as info:
                pool.submit(_raise, exc).result(timeout=60)
            assert _data(info.value) == _data(exc)
