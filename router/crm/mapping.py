"""Pure helpers of the generic REST connector: dotted paths and date-times (no I/O).

Dotted paths address JSON: ``properties.hs_lead_status``, ``data.0.owner.id`` (a
numeric part indexes a list); the empty path is the whole document. Templates are in
:mod:`router.crm.template`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final


class _Missing:
    """Marker for a path that does not exist in a document."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


def split_path(path: str) -> list[str]:
    """The parts of a dotted path (``""`` → no parts: the whole document)."""
    return [p for p in path.split(".")] if path else []


def get_path(document: Any, path: str) -> Any:
    """The value at dotted ``path`` in ``document``, or :data:`MISSING`."""
    value = document
    for part in split_path(path):
        if isinstance(value, Mapping):
            if part not in value:
                return MISSING
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(value) <= index < len(value):
                return MISSING
            value = value[index]
        else:
            return MISSING
    return value


def set_path(document: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at dotted ``path`` in ``document``, creating objects on the way."""
    parts = split_path(path)
    if not parts:
        raise ValueError("an empty path cannot be set")
    node = document
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


# --- value conversion filters ------------------------------------------------------------


def parse_datetime(value: Any) -> datetime | None:
    """A datetime from ISO 8601 text (``Z`` allowed) or epoch seconds / milliseconds.

    Returns None for None/empty; raises ValueError for anything else unreadable.
    Naive values are taken as UTC.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a date-time: {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value) / 1000.0 if abs(value) > 1e11 else float(value)
            if math.isfinite(seconds):
                return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):  # past a float's or a date's range
            pass
        raise ValueError(f"not a date-time: {str(value)[:40]!r}")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_datetime(int(text))
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not a date-time: {value!r}") from exc
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"not a date-time: {value!r}")
