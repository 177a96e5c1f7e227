"""Pure helpers of the generic REST connector: dotted paths and templates (no I/O).

Dotted paths address JSON: ``properties.hs_lead_status``, ``data.0.owner.id`` (a
numeric part indexes a list); the empty path is the whole document.

Templates fill ``{name}`` placeholders: ``{e164}``, ``{record.agent}``,
``{record.duration_s|ms}``. ``{{`` and ``}}`` are literal braces. In a JSON body template,
a string that is exactly one placeholder keeps the value's JSON type (a number stays a
number, a missing value becomes ``null``); anywhere else values are turned into text
(missing → empty). Filters after ``|`` convert values: see :data:`FILTERS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote


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
        seconds = float(value) / 1000.0 if abs(value) > 1e11 else float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"not a date-time: {value!r}")
        return datetime.fromtimestamp(seconds, UTC)
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


def _to_ms(value: Any) -> Any:
    return None if value is None else round(float(value) * 1000)


def _epoch_ms(value: Any) -> Any:
    when = parse_datetime(value)
    return None if when is None else round(when.timestamp() * 1000)


def _iso(value: Any) -> Any:
    when = parse_datetime(value)
    return None if when is None else when.isoformat().replace("+00:00", "Z")


def _date(value: Any) -> Any:
    when = parse_datetime(value)
    return None if when is None else when.date().isoformat()


def _mmss(value: Any) -> Any:
    if value is None:
        return None
    total = round(float(value))
    return f"{total // 60:02d}:{total % 60:02d}"


#: Filters usable as ``{record.x|name}``.
FILTERS: Final[dict[str, Callable[[Any], Any]]] = {
    "str": lambda v: None if v is None else str(v),
    "int": lambda v: None if v is None else round(float(v)),
    "float": lambda v: None if v is None else float(v),
    "ms": _to_ms,             # seconds → milliseconds (HubSpot hs_call_duration)
    "mmss": _mmss,            # seconds → "MM:SS" (Zoho Call_Duration)
    "epoch_ms": _epoch_ms,    # date-time → Unix epoch milliseconds
    "iso": _iso,              # date-time → ISO 8601 UTC with Z
    "date": _date,            # date-time → YYYY-MM-DD (Salesforce ActivityDate)
    "upper": lambda v: None if v is None else str(v).upper(),
    "lower": lambda v: None if v is None else str(v).lower(),
}


# --- templates ---------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def placeholders(template: str) -> list[str]:
    """The placeholder expressions in ``template`` (``name`` or ``name|filter``)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template) if m.group(1) is not None]


def check_template(template: str, allowed: Callable[[str], bool]) -> None:
    """Raise ValueError naming the first placeholder ``allowed`` rejects or an unknown filter.

    Also rejects a lone ``{`` or ``}`` (write ``{{`` / ``}}`` for a literal brace).
    """
    stripped = _PLACEHOLDER.sub("", template)
    if "{" in stripped or "}" in stripped:
        raise ValueError(f"unbalanced brace in {template!r} (write {{{{ or }}}} for a literal)")
    for expr in placeholders(template):
        name, _, flt = expr.partition("|")
        if not allowed(name.strip()):
            raise ValueError(f"unknown placeholder {{{expr}}} in {template!r}")
        if flt and flt.strip() not in FILTERS:
            raise ValueError(
                f"unknown filter {flt.strip()!r} in {template!r} (known: {', '.join(FILTERS)})"
            )


def _lookup(context: Mapping[str, Any], expr: str) -> Any:
    name, _, flt = expr.partition("|")
    value = get_path(context, name.strip())
    value = None if value is MISSING else value
    if flt:
        try:
            value = FILTERS[flt.strip()](value)
        except (TypeError, ValueError):
            value = None
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_text(
    template: str, context: Mapping[str, Any], *, encode: Callable[[str], str] | None = None
) -> str:
    """``template`` with every placeholder replaced by text (``encode`` applied to values)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        text = _text(_lookup(context, match.group(1)))
        return encode(text) if encode else text

    return _PLACEHOLDER.sub(replace, template)


def url_quote(text: str) -> str:
    """Percent-encode a value for a URL path segment or query (``+`` becomes ``%2B``)."""
    return quote(text, safe="")


def render_json(template: Any, context: Mapping[str, Any]) -> Any:
    """A JSON template rendered: string leaves filled, a lone placeholder keeps its type."""
    if isinstance(template, str):
        match = _PLACEHOLDER.fullmatch(template)
        if match is not None and match.group(1) is not None:
            return _lookup(context, match.group(1))
        return render_text(template, context)
    if isinstance(template, Mapping):
        return {render_text(str(k), context): render_json(v, context) for k, v in template.items()}
    if isinstance(template, list):
        return [render_json(v, context) for v in template]
    return template


def json_strings(template: Any) -> list[str]:
    """Every string (keys and leaves) of a JSON template, for validation."""
    if isinstance(template, str):
        return [template]
    if isinstance(template, Mapping):
        out: list[str] = []
        for key, value in template.items():
            out.append(str(key))
            out.extend(json_strings(value))
        return out
    if isinstance(template, list):
        return [s for v in template for s in json_strings(v)]
    return []
