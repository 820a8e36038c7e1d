"""The processes a scenario describes, started on free loopback ports and always stopped.

Theory of operation
-------------------
A live run is a registry, one ``testbed node`` per ``[[nodes]]`` entry and a
``testbed balancer`` following the registry, each a real process started with
the command the caller names (the command line passes ``python -m
experiments.cli``: this Python, this tree). Every one listens on
``--port 0``; the first line it prints (``NAME listening on
http://127.0.0.1:PORT``) says where, so no port is ever guessed. The nodes
register the port they got; the balancer learns them from the registry.
Every node gets the cluster's random admin token in its environment
(``TESTBED_ADMIN_TOKEN``, never on its command line), so only the runner can
post the scenario's faults to its ``/admin/faults``.
:meth:`Cluster.start` returns once the balancer reports every node healthy.

Stopping is by PID only: SIGTERM to the balancer, then the nodes, then the
registry, a grace period, SIGKILL for anything still there. It happens on the
way out of ``async with Cluster(...)``, whatever the way out is: the run ended,
Ctrl-C (the runner's asyncio task is cancelled), a timeout, an exception.
Children run in their own session, so a Ctrl-C in the terminal reaches only the
runner, which stops them in that order; and on Linux each child asks the
kernel for SIGTERM should the runner itself die without cleaning up
(``PR_SET_PDEATHSIG``), so not even ``kill -9`` of the runner leaves orphans.

A node's ``down`` fault is a real crash: SIGKILL, then the same command again
on the same port when the fault ends. Any other exit nobody asked for ends the
run with the dead process's last lines of output.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import secrets
import signal
import sys
import time
from collections import deque
from typing import Any, Callable, Sequence

from core.scenario import NodeSpec, Scenario
from core.workload import NODE_STREAM, strategy_seed
from live.upstream import UpstreamError, UpstreamPool

__all__ = ["Child", "ChildFailed", "Cluster", "balancer_args", "node_args"]

_LISTENING = re.compile(rb"listening on (http://[\d.]+:(\d+))")
#: Where ``testbed node`` reads its --admin-token from (not argv: ``ps`` shows argv to every local user).
ADMIN_TOKEN_ENV = "TESTBED_ADMIN_TOKEN"
_PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A process did not start, or exited when nobody asked it to."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass


class Child:
    """One ``testbed`` subprocess: start it, learn its port, keep its last output lines, stop it by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv  # the whole command line: the testbed command, then the subcommand's arguments
        self.env = env or {}  # on top of ours: secrets go here, not in argv, which every local user can read
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.port = 0
        self.output: deque[str] = deque(maxlen=40)
        self.expected_exit = False
        self.started_at = 0.0  # time.monotonic() when it said it listens (the clock every process here uses)
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self) -> str:
        return "".join(f"    | {line}" for line in self.output) or "    | (no output)\n"

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and wait for its "listening on" line."""
        self.expected_exit = False
        self.output.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        try:
            await asyncio.wait_for(self._wait_listening(), timeout_s)
        except asyncio.TimeoutError:
            await self.stop()
            raise ChildFailed(f"{self.name} did not start within {timeout_s:g} s:\n{self.tail()}") from None
        if not self.port:
            await self.stop()
            raise ChildFailed(f"{self.name} exited before it listened:\n{self.tail()}")
        self._reader = asyncio.create_task(self._drain())

    async def _wait_listening(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.output.append(raw.decode(errors="replace"))
            m = _LISTENING.search(raw)
            if m:
                self.url, self.port = m.group(1).decode(), int(m.group(2))
                self.started_at = time.monotonic()
                return

    async def _drain(self) -> None:
        """Keep reading the output (a full pipe would block the child), remembering the last lines."""
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.output.append(raw.decode(errors="replace"))

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, up to ``grace_s`` to exit, then SIGKILL. Safe to call twice."""
        if self.proc is None:
            return
        self.expected_exit = True
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except asyncio.TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 1.0)
            except asyncio.TimeoutError:
                self._reader.cancel()

    async def crash(self) -> None:
        """SIGKILL: what a crash looks like from outside."""
        if self.proc is None:
            return
        self.expected_exit = True
        self.signal(signal.SIGKILL)
        await self.proc.wait()


def _num(value: float) -> str:
    return repr(float(value))


def node_args(spec: NodeSpec, *, registry_url: str, seed: int, stream: int, impl: str, port: int = 0,
              heartbeat_interval_s: float = 0.5) -> list[str]:
    """The ``testbed node`` command line for one scenario node, drawing from child ``stream`` of ``seed``."""
    args = ["node", "--port", str(port), "--id", spec.id, "--workers", str(spec.workers),
            "--load-factor", _num(spec.load_factor_ms), "--service", spec.service,
            "--registry", registry_url, "--heartbeat-interval", _num(heartbeat_interval_s),
            "--trust-proxy", "127.0.0.1", "--seed", str(seed), "--stream", str(stream), "--impl", impl,
            "--shutdown-timeout", "2"]
    if spec.rate_limit_per_s:
        args += ["--rate-limit", _num(spec.rate_limit_per_s)]
        if spec.rate_limit_burst:
            args += ["--burst", _num(spec.rate_limit_burst)]
    if spec.backpressure:
        args += ["--backpressure", str(spec.backpressure)]
    if spec.max_per_client:
        args += ["--max-per-client", str(spec.max_per_client)]
    if spec.circuit_breaker:
        b = spec.circuit_breaker
        args += ["--circuit-breaker", "--failure-threshold", str(b.failure_threshold),
                 "--recovery-timeout", _num(b.recovery_timeout_s), "--half-open-max-calls", str(b.half_open_max_calls),
                 "--success-threshold", str(b.success_threshold)]
    if any(f.error_rate or f.extra_latency_ms for f in spec.faults):
        args += ["--faults"]  # guarded by the admin token the Cluster puts in the node's environment
    return args


def balancer_args(scenario: Scenario, *, registry_url: str, impl: str, refresh_interval_s: float = 0.25) -> list[str]:
    """The ``testbed balancer`` command line for the scenario's balancer."""
    b = scenario.balancer
    args = ["balancer", "--port", "0", "--registry", registry_url, "--strategy", b.strategy,
            "--health-interval", _num(b.health_check_interval_s), "--unhealthy-after", str(b.unhealthy_after),
            "--refresh-interval", _num(refresh_interval_s), "--timeout", _num(b.timeout_s),
            "--eject-after", str(b.eject_after_failures), "--ejection-time", _num(b.ejection_time_s),
            "--seed", str(strategy_seed(scenario.seed)), "--impl", impl, "--shutdown-timeout", "2",
            # The run's load generator, on loopback, names its clients (X-Client-ID): the one trusted client.
            "--trust-clients", "127.0.0.1/32"]
    if not b.retry_connect_failures:
        args.append("--no-retry")
    return args


class Cluster:
    """Registry, nodes and balancer for one scenario. Use as ``async with Cluster(...) as cluster``."""

    def __init__(self, scenario: Scenario, *, command: Sequence[str], impl: str = "auto",
                 echo: Callable[[str], Any] = print, ready_timeout_s: float = 60.0) -> None:
        """``command`` starts a ``testbed`` process (e.g. ``[sys.executable, "-m", "experiments.cli"]``);
        ``impl`` goes to each process as ``--impl``."""
        self.scenario = scenario
        self.command = list(command)
        self.impl = impl
        self.echo = echo
        self.ready_timeout_s = ready_timeout_s
        self.registry: Child | None = None
        self.nodes: dict[str, Child] = {}
        self.balancer: Child | None = None
        self.failed = asyncio.Event()
        self.failure = ""
        self._watchers: list[asyncio.Task[None]] = []
        #: The nodes' --admin-token (given in their environment): the runner's fault posts carry it.
        self.admin_token = secrets.token_urlsafe(24)

    @property
    def children(self) -> list[Child]:
        """Everything started, in the order to stop it: balancer, nodes, registry."""
        return [c for c in (self.balancer, *self.nodes.values(), self.registry) if c is not None]

    async def __aenter__(self) -> Cluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _launch(self, child: Child) -> Child:
        await child.start()
        self.echo(f"started {child.name} (pid {child.pid}) on {child.url}")
        assert child.proc is not None  # start() set it
        self._watchers.append(asyncio.create_task(self._watch(child, child.proc)))
        return child

    async def _watch(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if not child.expected_exit and proc is child.proc and not self.failed.is_set():
            self.failure = f"{child.name} (pid {proc.pid}) exited with status {code} during the run:\n{child.tail()}"
            self.failed.set()

    async def start(self) -> None:
        s = self.scenario
        self.registry = await self._launch(Child("registry", [*self.command, "registry", "--port", "0", "--ttl", "2",
                                                              "--shutdown-timeout", "1"]))
        # Node i draws from the stream its simulated twin uses (core.workload).
        nodes = [self._node_child(i, stream=NODE_STREAM + i) for i in range(len(s.nodes))]
        for child in nodes:  # registered at once, so a failed start still gets stopped
            self.nodes[child.name] = child
        await asyncio.gather(*(self._launch(c) for c in nodes))
        self.balancer = await self._launch(Child("balancer", [*self.command, *balancer_args(
            s, registry_url=self.registry.url, impl=self.impl)]))
        await self._wait_ready()

    def _node_child(self, index: int, *, stream: int, port: int = 0) -> Child:
        assert self.registry is not None
        spec = self.scenario.nodes[index]
        return Child(spec.id, [*self.command, *node_args(spec, registry_url=self.registry.url,
                                                         seed=self.scenario.seed, stream=stream, impl=self.impl,
                                                         port=port)],
                     env={ADMIN_TOKEN_ENV: self.admin_token})

    async def _wait_ready(self) -> None:
        """Until the balancer has every node, healthy."""
        assert self.balancer is not None
        pool = UpstreamPool(timeout_s=2.0)
        want = set(self.nodes)
        seen: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        try:
            while loop.time() < deadline:
                if self.failed.is_set():
                    raise ChildFailed(self.failure)
                try:
                    status, _, body = await pool.request(self.balancer.url, "GET", "/lb-stats", [], b"")
                    if status == 200:
                        seen = json.loads(body).get("backends", {})
                        if want <= {k for k, v in seen.items() if v.get("healthy")}:
                            return
                except (UpstreamError, asyncio.TimeoutError, ValueError):
                    pass
                await asyncio.sleep(0.1)
        finally:
            pool.close()
        missing = sorted(want - {k for k, v in seen.items() if v.get("healthy")})
        raise ChildFailed(f"the balancer did not see {', '.join(missing)} healthy within {self.ready_timeout_s:g} s")

    async def crash(self, node_id: str) -> None:
        """Kill a node the way a crash would."""
        await self.nodes[node_id].crash()

    async def restart(self, node_id: str) -> bool:
        """Start a crashed node again on its old port; False (and a message) if it cannot start."""
        index = [n.id for n in self.scenario.nodes].index(node_id)
        # A fresh process draws fresh random numbers: a stream no simulated node uses.
        fresh = self._node_child(index, stream=NODE_STREAM + len(self.scenario.nodes) + index,
                                 port=self.nodes[node_id].port)
        self.nodes[node_id] = fresh
        try:
            await self._launch(fresh)
        except ChildFailed as exc:
            self.echo(f"could not restart {node_id}: {exc}")
            return False
        return True

    async def stop(self) -> None:
        """Stop everything started, by PID; wait for each to exit."""
        for child in self.children:
            child.expected_exit = True
        for tier in ([self.balancer], list(self.nodes.values()), [self.registry]):
            await asyncio.gather(*(c.stop() for c in tier if c is not None))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()
