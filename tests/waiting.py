"""Waiting on a condition instead of sleeping: the one polling loop of the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


async def wait_for(predicate: Callable[[], object], timeout_s: float = 15.0, *,
                   step_s: float = 0.01) -> None:
    """Poll ``predicate()`` every ``step_s`` until it is true; fail the test when it is
    still false after ``timeout_s`` (a bound for a stuck test, not a measure of speed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"condition not reached within {timeout_s:g} s")
        await asyncio.sleep(step_s)
