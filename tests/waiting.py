"""Waiting on a condition instead of sleeping: the one polling loop of the tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import pytest


async def wait_for(predicate: Callable[[], object | Awaitable[object]],
                   timeout_s: float = 15.0, *, step_s: float = 0.01) -> None:
    """Poll ``predicate()`` (awaited when it returns an awaitable, e.g. a Redis read) every
    ``step_s`` until it is true; fail the test when it is still false after ``timeout_s``
    (a bound for a stuck test, not a measure of speed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not reached within {timeout_s:g} s")
        await asyncio.sleep(step_s)
