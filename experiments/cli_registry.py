"""``testbed registry``: the service registry process."""

from __future__ import annotations

import click

from experiments.server_options import serve_app, server_options

__all__ = ["registry_command"]


@click.command("registry")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True, help="0 picks a free port.")
@server_options
@click.option("--ttl", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="Seconds without a heartbeat before a node is dead (removed after as long again).")
@click.option("--token", envvar="TESTBED_REGISTRY_TOKEN", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on writes.")
def registry_command(port: int, host: str, ttl: float, token: str | None) -> None:
    """The service registry: POST /register, /heartbeat/{id}, /deregister; GET /nodes, /health, /metrics."""
    from live.registry import make_registry_app
    serve_app(make_registry_app(ttl_s=ttl, token=token), port, name="registry")
