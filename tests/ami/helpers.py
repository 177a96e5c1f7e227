"""Shared helpers for the AMI tests: replay a recording through parser + tracker."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ami.protocol import AmiParser, Message
from ami.records import CallRecord
from ami.tracker import CallTracker, extension_agent
from router.rules.presence import Presence


def parse(data: bytes) -> list[Message]:
    """All messages of a recording."""
    parser = AmiParser()
    out = parser.feed(data)
    parser.feed_eof()
    return out


def replay(
    messages: Iterable[Message],
    *,
    presence: Presence | None = None,
    clock: Callable[[], float] = lambda: 1_000.0,
) -> list[CallRecord]:
    """Feed messages to a fresh tracker, flush at the end, return the records in order."""
    records: list[CallRecord] = []
    tracker = CallTracker(
        records.append, region="CN", presence=presence, agent_for_device=extension_agent,
        clock=clock,
    )
    tracker.handle_all(messages)
    tracker.flush()
    return records


def dumps(records: Iterable[CallRecord]) -> list[dict[str, Any]]:
    """Records as JSON-ready dicts (for whole-record comparisons)."""
    return [r.model_dump(mode="json") for r in records]
