"""Parameter types and options the three server commands (node, registry, balancer) share."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["URL", "NodeList", "server_options"]


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


def server_options(f):
    for option in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--shutdown-timeout", type=click.FloatRange(0, 600), default=10.0, show_default=True,
                     help="Seconds in-flight requests get to finish on SIGINT/SIGTERM."),
    ]):
        f = option(f)
    return f
