"""Run one aiohttp app until SIGINT/SIGTERM, then shut down gracefully.

The actual address is printed as soon as the socket is bound (``--port 0``
picks a free port, which is how the tests start servers): ``<name> listening
on http://127.0.0.1:PORT``. On a signal the server stops accepting, lets
in-flight requests finish for up to ``shutdown_timeout`` seconds, runs the
app's cleanup (a node deregisters there) and exits 0.

Every connection is guarded by :mod:`live.connections`: a header timeout, an
idle keep-alive timeout, a cap on open connections (503 past it) and JSON
answers to requests too malformed to reach the app. Their defaults are those
of :class:`~live.connections.ServerLimits`; the command line's server options
(``experiments/server_options.py``) pass each as a keyword argument here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from typing import Callable

from aiohttp import web

from live.connections import GuardedAppRunner
from live.http import BODY_TIMEOUT
from live.server_limits import ServerLimits, default_max_connections, raise_open_file_limit

__all__ = ["serve"]


def serve(app: web.Application, host: str, port: int, *, name: str, shutdown_timeout: float = 10.0,
          header_timeout: float = ServerLimits.header_timeout_s,
          keepalive_timeout: float = ServerLimits.keepalive_timeout_s, max_connections: int | None = None,
          body_timeout: float = ServerLimits.body_timeout_s,
          max_line_bytes: int = ServerLimits.max_line_bytes, max_headers: int = ServerLimits.max_headers,
          on_listening: Callable[[int], None] | None = None) -> int:
    """Serve ``app`` until a signal; ``on_listening(port)`` learns the bound port (``--port 0``).

    ``header_timeout`` and ``keepalive_timeout`` are in seconds; ``max_connections=None`` is
    :func:`~live.connections.default_max_connections` (from the open-file limit)."""
    raise_open_file_limit()  # before the default connection cap is read from it
    limits = ServerLimits(header_timeout_s=header_timeout, keepalive_timeout_s=keepalive_timeout,
                          max_connections=default_max_connections() if max_connections is None else max_connections,
                          max_line_bytes=max_line_bytes, max_headers=max_headers, body_timeout_s=body_timeout)
    app[BODY_TIMEOUT] = limits.body_timeout_s  # read_json's bound on a body's arrival

    async def main() -> int:
        # Signals are ours before anyone can learn the port: a supervisor that stops us right
        # after reading the "listening on" line gets a clean shutdown, not a kill.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = GuardedAppRunner(app, limits=limits, shutdown_timeout=shutdown_timeout, access_log=None)
        # The app's startup may take a while (the balancer warms up before it listens): a signal then
        # stops it there, rather than after the start-up has run its course.
        setup = asyncio.ensure_future(runner.setup())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({setup, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not setup.done():
            setup.cancel()
            await asyncio.gather(setup, return_exceptions=True)
            try:
                await runner.cleanup()
            except Exception:  # noqa: BLE001 - a start-up cut short may leave nothing to clean up
                pass
            print(f"{name}: stopped before listening", flush=True)
            return 0
        setup.result()  # a start-up that failed raises here, as it did before
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            print(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr, flush=True)
            await runner.cleanup()
            return 1
        # Everything alive now (modules, app, core objects) lives until exit: take it out of the
        # garbage collector's sight, so collections triggered by per-request garbage stay cheap.
        gc.freeze()
        bound = runner.addresses[0][1]
        if on_listening is not None:
            on_listening(bound)
        print(f"{name} listening on http://{host}:{bound}", flush=True)
        await stop.wait()
        print(f"{name}: shutting down (in-flight requests get up to {shutdown_timeout:g} s)", flush=True)
        await runner.cleanup()
        print(f"{name}: stopped", flush=True)
        return 0

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    loop_name = os.environ.get("TESTBED_LOOP", "auto")
    if loop_name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop_name == "uvloop":
                print(f"{name}: TESTBED_LOOP=uvloop but uvloop is not installed", file=sys.stderr, flush=True)
                return 2
        else:
            return uvloop.run(main())
    return asyncio.run(main())
