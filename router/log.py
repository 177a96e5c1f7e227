"""Logging with per-call context.

Every log line written while a call is being handled carries that call's id
(the AGI ``uniqueid`` or the AMI ``Linkedid``) through a context variable, the way
structlog's contextvars integration does, without requiring callers to pass it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TextIO

call_id: ContextVar[str] = ContextVar("call_id", default="-")

FORMAT = "%(asctime)s %(levelname)-7s %(name)s [call=%(call_id)s] %(message)s"


class CallContextFilter(logging.Filter):
    """Adds ``record.call_id`` from the current context to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.call_id = call_id.get()
        return True


@contextlib.contextmanager
def bind_call(value: str) -> Iterator[None]:
    """Within the block, every log line carries ``call=<value>``."""
    token = call_id.set(value)
    try:
        yield
    finally:
        call_id.reset(token)


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of each record (so a replaced or
    captured stderr never leaves the handler writing to a closed file)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup(level: str = "INFO") -> None:
    """Configure the root logger once: one line per event, with the call id.

    The record fields our format does not print (caller's file and line, thread and
    process names) are not collected: finding the caller walks the stack on every line,
    and a call logs one line (the logging HOWTO's "Optimization" section)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(isinstance(f, CallContextFilter) for h in root.handlers for f in h.filters):
        handler = StderrHandler()
        handler.addFilter(CallContextFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
