"""Parameter types and options the three server commands (node, registry, balancer) share."""

from __future__ import annotations

from typing import Any, NoReturn

import click

from live.server_limits import FDS_PER_CONNECTION, RESERVED_FDS, ServerLimits

__all__ = ["URL", "AllowBackends", "NodeList", "serve_app", "server_options"]


class URL(click.ParamType):
    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1].strip("/")) == 0:
            self.fail(f"{value!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:5000)", param, ctx)
        return text.rstrip("/")


class NodeList(click.ParamType):
    name = "NODES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        from live.balancer import parse_node
        items = [v for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("needs at least one node (e.g. 5001,5002,5003)", param, ctx)
        try:
            urls = tuple(parse_node(v) for v in items)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return tuple(dict.fromkeys(urls))


class AllowBackends(click.ParamType):
    """``--allow-backends`` (registry and balancer): comma-separated networks a backend's address may resolve
    into, or ``any``; checked here, kept as the text (each process parses it where it is used)."""

    name = "CIDR,...|any"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from core.addresses import AddressError, AllowList

        try:
            AllowList.parse(str(value))
        except AddressError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


#: Where the server options that only ``serve`` reads are kept on the click context.
_META_KEY = "testbed.server"


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    assert param.name is not None
    ctx.meta.setdefault(_META_KEY, {})[param.name] = value
    return value


def server_options(f: Any) -> Any:
    """``--host`` (a parameter of the command, which needs it for its own address) and the options only
    :func:`serve_app` reads (they reach it through the click context, not the command's signature)."""
    for option in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--shutdown-timeout", type=click.FloatRange(0, 600), default=10.0, show_default=True,
                     expose_value=False, callback=_keep,
                     help="Seconds in-flight requests get to finish on SIGINT/SIGTERM."),
        click.option("--header-timeout", type=click.FloatRange(0, 3600, min_open=True),
                     default=ServerLimits.header_timeout_s, show_default=True, expose_value=False, callback=_keep,
                     help="Seconds a client gets to send a request's headers, from connecting or from the "
                          "request's first byte (past it: 408, closed)."),
        click.option("--keepalive-timeout", type=click.FloatRange(0, 3600, min_open=True),
                     default=ServerLimits.keepalive_timeout_s, show_default=True, expose_value=False, callback=_keep,
                     help="Seconds an idle keep-alive connection stays open."),
        click.option("--body-timeout", type=click.FloatRange(0, 3600, min_open=True),
                     default=ServerLimits.body_timeout_s, show_default=True, expose_value=False, callback=_keep,
                     help="Seconds a JSON request body may take to arrive once the headers are in (past it: 408, "
                          "closed)."),
        click.option("--max-connections", type=click.IntRange(1, 10_000_000), default=None, expose_value=False,
                     callback=_keep, show_default=f"open-file limit - {RESERVED_FDS}, divided by {FDS_PER_CONNECTION}",
                     help="Open connections at most; past it a new client gets 503 and is closed."),
        click.option("--max-line-bytes", type=click.IntRange(64, 1 << 20), default=ServerLimits.max_line_bytes,
                     show_default=True, expose_value=False, callback=_keep,
                     help="Longest request line or header line (past it: 414 or 431)."),
        click.option("--max-headers", type=click.IntRange(1, 10_000), default=ServerLimits.max_headers,
                     show_default=True, expose_value=False, callback=_keep,
                     help="Most header lines in a request (past it: 431)."),
    ]):
        f = option(f)
    return f


def serve_app(app: Any, port: int, *, name: str, on_listening: Any = None) -> NoReturn:
    """Serve ``app`` with the command's ``--host`` and server options until a signal; exit with its status."""
    from live.serve import serve

    ctx = click.get_current_context()
    kept = ctx.meta.get(_META_KEY, {})
    raise SystemExit(serve(app, ctx.params["host"], port, name=name, on_listening=on_listening, **kept))
