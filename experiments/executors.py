"""Where a sweep's runs execute: this machine's process pool, or a Dask cluster.

Theory of operation
-------------------
A sweep (:func:`experiments.compare.sweep`) hands picklable jobs to a
``concurrent.futures.Executor`` and puts the results back in grid order, so
*where* a run executes cannot change *what* it computes: each job carries its
own seed, and a run is a pure function of its job. This module only opens the
executor:

``process`` (the default)
    ``None``: the sweep makes its own ``ProcessPoolExecutor`` (``--workers``,
    one per core), or runs in this process when one worker is asked for.
``dask`` with no address
    A ``distributed.LocalCluster`` on this machine: worker *processes* with one
    thread each (a simulation holds the GIL), bound to 127.0.0.1, its
    dashboard on 127.0.0.1 at a free port.
``dask`` with ``--scheduler tcp://HOST:PORT``
    A client of a cluster someone started (``dask scheduler`` on one machine,
    ``dask worker tcp://HOST:PORT`` on each of the others).

Before the first job, every worker is asked for :func:`identity` (Python
version, the versions of the packages a run's numbers depend on, and a hash of
this project's source). A worker that cannot import the project or runs other
code would compute other numbers, so the sweep stops before it starts, naming
the worker. A worker that dies mid-sweep loses its running job, and Dask runs
it again on another worker (``distributed.scheduler.allowed-failures``, 3);
past that, :class:`ExecutorError` says which job kept killing workers. When
every worker has gone, Dask would wait for a new one for ever: the sweep's
``check`` (:class:`WorkerWatch`) stops it once the cluster has had no worker
for the connect timeout. A scheduler that stops cancels the sweep's jobs,
which is one line too. Dask's own log lines about these (tracebacks at ERROR)
are held back while the executor is open: the one line says it.

Waiting is bounded: ``distributed.Client`` bounds the TCP connect by its
``timeout`` but not the Dask handshake after it (a port that accepts and never
speaks hangs it for ever), so :func:`_probe` does the connect and handshake
first under one deadline, and a cluster with no worker is given the same time
to get one.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import logging
import pathlib
import platform
import re
import time
from concurrent.futures import CancelledError, Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = ["EXECUTORS", "ExecutorError", "Pool", "WorkerWatch", "identity", "mismatches", "open_executor",
           "scheduler_address"]

#: ``--executor`` choices.
EXECUTORS = ("process", "dask")

#: The packages whose versions a run's numbers depend on (beside Python and this project's own source).
RESULT_PACKAGES = ("resilience-testbed", "simpy", "numpy")

#: The project's packages whose code decides a run's numbers (``identity()["code"]`` hashes their ``.py``
#: files): the core, the model and the reference solutions (the exercises live in core).
CODE_PACKAGES = ("core", "sim", "solutions")

_ADDRESS = re.compile(r"^(?:tcp://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class ExecutorError(Exception):
    """The executor could not be opened or lost the sweep; the message is one line that says why."""


@dataclass(frozen=True)
class Pool:
    """What :func:`open_executor` gives a sweep: its ``executor`` (``None``: the sweep's own process
    pool) and the ``check`` to call while runs are out (``None``: nothing to watch)."""

    executor: Executor | None = None
    check: Callable[[], None] | None = None


class WorkerWatch:
    """A sweep's ``check`` on a Dask cluster: raises :class:`ExecutorError` once the cluster has had
    no worker for ``grace_s``. Asks the scheduler at most every ``every_s``, each time for at most
    ``every_s`` (a scheduler that does not answer is not counted as empty: its jobs' cancellation
    reports it)."""

    def __init__(self, client: Any, where: str, grace_s: float, every_s: float = 1.0) -> None:
        self.client, self.where, self.grace_s, self.every_s = client, where, grace_s, every_s
        self.asked_at = -float("inf")
        self.empty_since: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.asked_at < self.every_s:
            return
        self.asked_at = now
        try:
            info = self.client.sync(self.client.scheduler.identity, n_workers=0, callback_timeout=self.every_s)
        except Exception:  # noqa: BLE001 -- unreachable or slow: not known to be empty
            return
        if info.get("n_workers"):
            self.empty_since = None
        elif self.empty_since is None:
            self.empty_since = now
        elif now - self.empty_since > self.grace_s:
            raise ExecutorError(f"every worker of the Dask cluster at {self.where} has gone and none joined "
                                f"within {self.grace_s:g} s; the sweep stopped (start workers: dask worker ...)")


def scheduler_address(text: str) -> str:
    """``tcp://HOST:PORT`` (the scheme may be left out); ``ValueError`` naming the problem otherwise."""
    m = _ADDRESS.match(text.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ValueError(f"{text!r} is not a Dask scheduler address: give tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786)")
    return f"tcp://{m.group(1)}:{int(m.group(2))}"


def _code_hash() -> str:
    import experiments
    root = pathlib.Path(experiments.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def identity() -> dict[str, str]:
    """What decides a run's numbers on this machine: Python (major.minor), :data:`RESULT_PACKAGES`
    versions, and ``code``, a hash of the project's source. Runs on each worker too."""
    out = {"python": ".".join(platform.python_version_tuple()[:2])}
    for name in RESULT_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    out["code"] = _code_hash()
    return out


def mismatches(local: dict[str, str], workers: dict[str, Any]) -> list[str]:
    """One line per worker whose :func:`identity` differs from ``local`` (or that could not give one:
    an exception in place of the dict), naming what differs; empty when all match."""
    problems = []
    for address, theirs in sorted(workers.items()):
        if isinstance(theirs, BaseException):
            # Dask hands back an error raised while unpickling the call as Exception(repr(the error)).
            why = str(theirs) if type(theirs) is Exception else f"{type(theirs).__name__}: {theirs}"
            problems.append(f"worker {address} cannot run the project ({why}); "
                            "install it there: pip install 'resilience-testbed[dask]' from this tree")
            continue
        diff = [f"{k} {theirs.get(k, 'missing')} (here {v})" for k, v in local.items() if theirs.get(k) != v]
        if diff:
            problems.append(f"worker {address} differs from this machine: {', '.join(diff)}; "
                            "install the same tree and versions there")
    return problems


async def _probe(address: str, timeout_s: float) -> None:
    """Connect to ``address`` and finish Dask's handshake within ``timeout_s``, then hang up."""
    from distributed.comm import connect

    comm = await asyncio.wait_for(connect(address, timeout=timeout_s), timeout_s)
    await comm.close()


def _refused(exc: BaseException | None) -> bool:
    """Whether a refused connection is among the causes of ``exc`` (Dask retries one until its timeout)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _connect(address: str, timeout_s: float) -> Any:
    from distributed import Client
    try:
        asyncio.run(_probe(address, timeout_s))
    except (OSError, asyncio.TimeoutError) as exc:
        why = "connection refused" if _refused(exc) else "no answer"
        raise ExecutorError(f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s ({why}); "
                            "is `dask scheduler` running there and its port open? (--connect-timeout)") from None
    try:
        return Client(address, timeout=timeout_s, set_as_default=False)
    except OSError as exc:
        raise ExecutorError(f"cannot connect to the Dask scheduler at {address}: {exc}") from None


def _local_cluster(workers: int | None) -> Any:
    import os

    from distributed import Client, LocalCluster
    cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
    return Client(cluster, set_as_default=False)


def _dashboard(client: Any) -> str:
    try:
        link = client.dashboard_link
    except (KeyError, AttributeError):
        link = None
    return f"dashboard {link}" if link else "no dashboard (the scheduler runs without one)"


@contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """Dask's loggers at CRITICAL only: what went wrong reaches the user as one :class:`ExecutorError`."""
    import distributed  # noqa: F401 -- its import sets its loggers' levels: set them after that
    names = ["distributed", *(n for n in logging.root.manager.loggerDict if n.startswith("distributed."))]
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextmanager
def _dask(scheduler: str | None, workers: int | None, connect_timeout_s: float,
          echo: Callable[[str], None]) -> Iterator[Pool]:
    from distributed import KilledWorker

    client = _connect(scheduler, connect_timeout_s) if scheduler else _local_cluster(workers)
    try:
        try:
            client.wait_for_workers(1, timeout=connect_timeout_s)
        except TimeoutError:
            raise ExecutorError(f"the Dask scheduler at {scheduler} has no worker (waited {connect_timeout_s:g} s); "
                                f"start some: dask worker {scheduler}") from None
        problems = mismatches(identity(), client.run(identity, on_error="return"))
        if problems:
            raise ExecutorError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        nworkers = len(client.scheduler_info(n_workers=-1)["workers"])
        where = scheduler or f"a local cluster on 127.0.0.1 ({client.scheduler.address})"
        echo(f"dask: {nworkers} worker{'s' * (nworkers != 1)} at {where}, {_dashboard(client)}")
        try:
            yield Pool(client.get_executor(pure=False), WorkerWatch(client, scheduler or where, connect_timeout_s))
        except KilledWorker as exc:
            tries = exc.allowed_failures + 1
            raise ExecutorError(f"a job ({exc.task}) was running on a Dask worker that died, {tries} "
                                f"time{'s' * (tries > 1)} (distributed.scheduler.allowed-failures + 1), last on "
                                f"{exc.last_worker.address}; see that worker's log") from None
        except CancelledError:
            raise ExecutorError("the Dask cluster dropped the sweep's jobs (did the scheduler stop?)") from None
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()


@contextmanager
def open_executor(kind: str, *, scheduler: str | None = None, workers: int | None = None,
                  connect_timeout_s: float = 10.0, echo: Callable[[str], None] = print) -> Iterator[Pool]:
    """The executor for a sweep and its check (a :class:`Pool`), closed (a local cluster stopped) on the way out.

    ``kind`` is one of :data:`EXECUTORS`; ``scheduler`` (``tcp://HOST:PORT``) means ``dask`` on that
    cluster; ``workers`` sizes a local pool or local cluster (default: one per core);
    ``connect_timeout_s`` bounds reaching the scheduler, waiting for its first worker, and a
    cluster left without any; ``echo`` gets the line naming the cluster and its dashboard.
    ``process`` gives ``Pool()``, which the sweep reads as "your own pool". Raises
    :class:`ExecutorError` with a one-line reason.
    """
    if kind == "process" and scheduler is None:
        yield Pool()
        return
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise ExecutorError(f"a sweep on Dask needs the dask extra ({exc}): pip install 'resilience-testbed[dask]'") \
            from None
    with _quiet_dask_logs(), _dask(scheduler, workers, connect_timeout_s, echo) as pool:
        yield pool
