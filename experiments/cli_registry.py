"""``testbed registry``: the service registry process."""

from __future__ import annotations

import click

from core.addresses import AllowList
from core.registry import MetadataLimits
from experiments.server_options import AllowBackends, serve_app, server_options

__all__ = ["registry_command"]

_LIMITS = MetadataLimits()


@click.command("registry")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True, help="0 picks a free port.")
@server_options
@click.option("--ttl", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="Seconds without a heartbeat before a node is dead (removed after as long again).")
@click.option("--token", envvar="TESTBED_REGISTRY_TOKEN", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on writes.")
@click.option("--allow-backends", type=AllowBackends(), default=None,
              help="Networks a registered address may resolve to, e.g. 10.0.0.0/8,::1/128, or 'any' "
                   "[default: 127.0.0.0/8,::1/128 when --host is loopback, else any address except "
                   "link-local/cloud metadata (169.254.0.0/16, fe80::/10) and unspecified ones].")
@click.option("--max-nodes", type=click.IntRange(1, 1_000_000), default=1000, show_default=True,
              help="Most members: a new id past it pushes out the longest-dead member, or if all are alive "
                   "gets 503 registry_full with Retry-After.")
@click.option("--max-metadata-bytes", type=click.IntRange(2, 16 * 1024), default=_LIMITS.max_bytes,
              show_default=True, help="Largest metadata object, in bytes of compact JSON (400 past it).")
@click.option("--max-metadata-keys", type=click.IntRange(0, 10_000), default=_LIMITS.max_keys, show_default=True,
              help="Most keys in a node's metadata (400 past it).")
@click.option("--max-metadata-key-chars", type=click.IntRange(1, 10_000), default=_LIMITS.max_key_chars,
              show_default=True, help="Longest metadata key, in characters (400 past it).")
@click.option("--resolve-timeout", type=click.FloatRange(0.01, 60), default=2.0, show_default=True,
              help="Seconds a registered host name may take to resolve (400 bad_address past it).")
@click.option("--events-kept", type=click.IntRange(1, 1_000_000), default=4096, show_default=True,
              help="Membership changes GET /events keeps, the newest; a reader that fell further behind is told "
                   "how many it missed.")
def registry_command(port: int, host: str, ttl: float, token: str | None, allow_backends: str | None,
                     max_nodes: int, max_metadata_bytes: int, max_metadata_keys: int, max_metadata_key_chars: int,
                     resolve_timeout: float, events_kept: int) -> None:
    """The service registry: POST /register, /heartbeat/{id}, /deregister; GET /nodes, /events (membership
    changes), /health, /metrics, /openapi.json."""
    from live.registry import listening, make_registry_app

    limits = MetadataLimits(max_bytes=max_metadata_bytes, max_keys=max_metadata_keys,
                            max_key_chars=max_metadata_key_chars)
    allow = AllowList.parse(allow_backends) if allow_backends else AllowList.default_for(host)
    click.echo(f"registry: backends allowed in {allow}", err=True)
    app = make_registry_app(ttl_s=ttl, token=token, host=host, allow_backends=allow, max_nodes=max_nodes,
                            metadata_limits=limits, resolve_timeout_s=resolve_timeout, events_kept=events_kept)
    serve_app(app, port, name="registry", on_listening=lambda bound: listening(app, bound))
