"""router.runner: which event loop `callroute` runs on."""

from __future__ import annotations

import asyncio
import sys

import pytest

from router import runner
from router.errors import ConfigError


async def which_loop() -> str:
    return runner.loop_name(asyncio.get_running_loop())


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio"),
])
def test_run_uses_the_chosen_loop(choice: runner.LoopChoice, expected: str) -> None:
    """`auto` picks uvloop when installed (it is a dependency); `asyncio` the stock loop."""
    assert runner.run(which_loop(), choice) == expected


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without uvloop installed, `auto` runs on asyncio's own loop rather than failing."""
    monkeypatch.setattr(runner, "uvloop_available", lambda: False)
    assert runner.loop_factory("auto") is None
    assert runner.run(which_loop(), "auto") == "asyncio"


def test_explicit_uvloop_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """`event_loop: uvloop` without uvloop installed says what to do, it does not crash
    with an ImportError."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        runner.loop_factory("uvloop")
