"""Which event loop runs callroute: uvloop when it is installed, else asyncio's own.

The call path is dominated by event-loop work (accepting a connection, a few small
reads and writes, closing it); uvloop does that work in C (libuv) and costs a call
about a third of the CPU the stock loop does (``bench/bench_route.py`` prints both
floors). Nothing in callroute depends on uvloop: every test of the FastAGI server runs
on both loops, and ``event_loop: asyncio`` in the config file selects the stock loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from router.errors import ConfigError

T = TypeVar("T")
LoopChoice = Literal["auto", "uvloop", "asyncio"]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def uvloop_available() -> bool:
    """True when uvloop can be imported (it is a dependency everywhere but Windows)."""
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: LoopChoice = "auto") -> LoopFactory | None:
    """The factory for ``choice`` (None means asyncio's default loop).

    Raises :class:`ConfigError` when ``uvloop`` is asked for and is not installed.
    """
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return None
    try:
        import uvloop
    except ImportError as exc:
        raise ConfigError(
            "event_loop: uvloop is not installed (pip install uvloop), "
            "or set event_loop: asyncio"
        ) from exc
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: which loop this is (for logs and benchmarks)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` selects."""
    factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
