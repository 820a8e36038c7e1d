"""Waiting for a state, never for a time: poll until a condition holds, with a deadline."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

POLL_S = 0.01


async def until(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Return as soon as ``await check()`` is true; fail the test after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout_s:g} s")
        await asyncio.sleep(POLL_S)  # the polling interval, not a wait for something to happen
