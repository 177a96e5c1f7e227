"""What the benchmarks share: the percentile they all print, and a loopback HTTP server
in a child process of its own (a CRM is another service: its event loop and CPU are not
the measured process's).

A child server is a ``python -c`` script run from the repository root that builds an
aiohttp application and hands it to :func:`serve_until_eof`: the script prints its URL
on its first line and serves until its stdin closes. :class:`ChildServer` is the parent's
side.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile, ``pct`` in 0..100 (``nan`` for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


async def serve_until_eof(app: web.Application) -> None:
    """The child's side: serve ``app`` on a free loopback port, print its URL, and stop
    when stdin closes."""
    from router.samplecrm import start_sample_crm  # any app: it binds and reports the URL

    runner, url = await start_sample_crm("127.0.0.1", 0, app)
    print(url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


class ChildServer:
    """A child server (``script`` run with ``args``); ``url`` is where it listens."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError(f"the child server did not start (exit {self.proc.returncode})")

    def close(self) -> None:
        """Close its stdin (it stops) and wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
