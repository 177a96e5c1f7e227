"""The filters and tests of the template language (:mod:`router.crm.template`).

Every filter takes ``none`` (a missing value) calmly: it returns ``none`` (or an empty
list for list filters) instead of raising, because CRM records omit fields. Filters
that need more than their arguments (the CRM's time zone, named value maps, reference
tables, the caller's region) read them from the :class:`Runtime` of the evaluation.
``docs/crm/templates.md`` documents each one.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from typing import Any, Final
from urllib.parse import quote

from jinja2 import pass_context
from jinja2.runtime import Context, Undefined

from router.crm.mapping import MISSING, get_path, parse_datetime

# --- bounds: no template may exhaust memory or CPU ---------------------------------------

#: The most characters (or list items) one operation of a template may make by growing
#: its input: ``*`` repetition, ``%`` formatting widths, ``replace``, ``join``.
MAX_TEXT: Final = 1_000_000
#: The most bits of an integer ``*`` or ``**`` may make (10**1000 has 3322).
MAX_INT_BITS: Final = 4096
#: The widest field or precision a ``%`` format may ask for.
MAX_FORMAT_WIDTH: Final = 1000


class BoundExceeded(ValueError):
    """A template operation would make a value over a bound (:data:`MAX_TEXT`,
    :data:`MAX_INT_BITS`, :data:`MAX_FORMAT_WIDTH`): refused before it is made."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?")


def _check_format(fmt: str) -> None:
    for match in _FORMAT_SPEC.finditer(fmt):
        width, precision = match.group(1), match.group(2)
        for part in (width, precision):
            if part == "*":
                raise BoundExceeded("'%' with a width or precision '*' taken from the values "
                                    "is not allowed")
            if part and int(part) > MAX_FORMAT_WIDTH:
                raise BoundExceeded(f"'%' format asks for a width of {_count(int(part))} "
                                    f"(at most {MAX_FORMAT_WIDTH})")


def text_size(value: Any, cap: int = 16 * MAX_TEXT) -> int:
    """About how many characters ``value`` makes as text (lists and objects as JSON), a
    value held in several places counted in each; the count stops soon after ``cap``
    (the work is bounded by ``cap``, not by the value: ``[x] * n`` holds x n times)."""
    total = 0
    stack = [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif _is_int(item):
            total += item.bit_length() // 3 + 2
        else:
            total += 24  # a float, true, none, a date
    return total


_FORMAT_ARG = re.compile(
    r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


def _format_size(fmt: str, values: Any) -> int:
    """At most how many characters ``fmt % values`` makes: the format's text, and for
    each conversion its width and precision and the value it reads (ten times over for
    a repr, or a list or object, whose characters may be escaped)."""
    total = len(fmt)
    index = 0
    for match in _FORMAT_ARG.finditer(fmt):
        key, width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        total += int(width or 0) + int(precision or 0) + 400  # a float's digits
        if key is not None and isinstance(values, dict):
            value = values.get(key, values)  # a key it lacks fails in Python
        elif isinstance(values, tuple):
            value = values[index] if index < len(values) else None
            index += 1
        else:
            value = values
        size = len(value) if isinstance(value, str) else text_size(value)
        total += size * (10 if conversion in "ra" or not isinstance(value, str) else 1)
        if total > 16 * MAX_TEXT:
            break
    return total


def bounded_binop(operator: str, left: Any, right: Any) -> Any:
    """``left <operator> right`` for ``*``, ``**`` and ``%``, refused with
    :class:`BoundExceeded` when the result would be over a bound (``"x" * 10**9``,
    ``[record.items] * 1000``, ``10**10**9``, ``'%0999999999d' % 1``,
    ``('%(a)s' * 10**5) % record``); every other value is left to Python."""
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and _is_int(times):
                size = len(seq) * max(times, 0)
                if size <= MAX_TEXT and times > 1 and not isinstance(seq, str):
                    # the items are repeated too: a list of lists repeated is their text
                    size = text_size(seq, MAX_TEXT // times + 1) * times
                if size > MAX_TEXT:
                    raise BoundExceeded(f"'*' would make {_count(size)} characters or items "
                                        f"(at most {MAX_TEXT})")
        if _is_int(left) and _is_int(right) \
                and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise BoundExceeded(f"'*' would make an integer over {MAX_INT_BITS} bits")
        return left * right
    if operator == "**":
        if _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1 \
                and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise BoundExceeded(f"'**' would make an integer over {MAX_INT_BITS} bits")
        return left**right
    if operator == "%":
        if isinstance(left, str):
            _check_format(left)
            size = _format_size(left, right)
            if size > MAX_TEXT and size > len(left) + 10 * text_size(right):
                # a value read by several conversions ('%(a)s' * 1000 % record)
                raise BoundExceeded(f"'%' would make {_count(size)} characters "
                                    f"(at most {MAX_TEXT})")
        return left % right
    raise ValueError(f"operator {operator!r} is not bounded here")


def _check_growth(size: int, what: str, given: int = 0) -> None:
    """Refuse a result of ``size`` over :data:`MAX_TEXT` (and larger than the ``given``
    input it is made from: a long text escaped is not a growth to refuse)."""
    if size > MAX_TEXT and size > given:
        raise BoundExceeded(f"{what} would make {_count(size)} characters (at most {MAX_TEXT})")


def _count(number: int) -> str:
    """A size for a message: exact up to 7 digits, else like ``1.0e+09`` (a long run of
    digits reads as a phone number to the masking of error text)."""
    return str(number) if number < 10_000_000 else f"{number:.1e}"


def is_missing(value: Any) -> bool:
    return value is None or isinstance(value, Undefined)


def blank(value: Any) -> bool:
    return is_missing(value) or value == ""


def to_text(value: Any) -> str:
    """How a value reads inside text: none → "", booleans lower-case, lists/objects JSON."""
    if is_missing(value):
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
    return str(value)


def url_quote(text: str) -> str:
    """Percent-encode a value for a URL path segment or query (``+`` becomes ``%2B``)."""
    return quote(text, safe="")


# --- run-time helpers reached by filters ---------------------------------------------------


@dataclass
class Runtime:
    """What filters need beyond their arguments, for one evaluation: the CRM's time zone,
    the named value maps, the caller's region, and the reference tables (``ref``).

    ``refs`` answers ``(name, key)`` from its cache or returns :data:`MISSING`; missed keys
    are collected in ``missing`` so the caller can fetch them and evaluate again.
    """

    tz: tzinfo = UTC
    maps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    region: str = "CN"
    refs: Callable[[str, str], Any] | None = None
    missing: set[tuple[str, str]] = field(default_factory=set)


_DEFAULT_RUNTIME = Runtime()


def _runtime(ctx: Context) -> Runtime:
    rt = ctx.get("_rt")
    return rt if isinstance(rt, Runtime) else _DEFAULT_RUNTIME


# --- filters ---------------------------------------------------------------------------------


def _when(value: Any) -> datetime | None:
    try:
        return parse_datetime(None if is_missing(value) else value)
    except ValueError:
        return None


def _zone(ctx: Context, name: str | None) -> tzinfo:
    if not name:
        return _runtime(ctx).tz
    return _zone_named(name)


@lru_cache(maxsize=64)
def _zone_named(name: str) -> tzinfo:
    from zoneinfo import ZoneInfo

    return UTC if name.upper() in ("UTC", "Z") else ZoneInfo(name)


def f_str(value: Any) -> Any:
    return None if is_missing(value) else to_text(value)


def f_int(value: Any) -> Any:
    number = f_float(value)
    return None if number is None else round(number)


def f_float(value: Any) -> Any:
    if blank(value) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def f_round(value: Any, digits: int = 0) -> Any:
    number = f_float(value)
    if number is None:
        return None
    return round(number) if digits == 0 else round(number, digits)


def f_upper(value: Any) -> Any:
    return None if is_missing(value) else to_text(value).upper()


def f_lower(value: Any) -> Any:
    return None if is_missing(value) else to_text(value).lower()


def f_title(value: Any) -> Any:
    return None if is_missing(value) else to_text(value).title()


def f_trim(value: Any) -> Any:
    return None if is_missing(value) else to_text(value).strip()


def f_truncate(value: Any, length: int) -> Any:
    return None if is_missing(value) else to_text(value)[: max(0, int(length))]


def f_replace(value: Any, old: str, new: str) -> Any:
    if is_missing(value):
        return None
    text, old, new = to_text(value), to_text(old), to_text(new)
    if len(new) > len(old):
        count = text.count(old) if old else len(text) + 1
        size = len(text) + count * (len(new) - len(old))
        if size > len(text):
            _check_growth(size, "replace")
    return text.replace(old, new)


def f_split(value: Any, sep: str | None = None) -> Any:
    if blank(value):
        return []
    return [part.strip() for part in to_text(value).split(sep) if part.strip()]


def f_digits(value: Any) -> Any:
    return None if is_missing(value) else re.sub(r"\D", "", to_text(value))


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def f_regex(value: Any, pattern: str, group: int = 1) -> Any:
    if is_missing(value):
        return None
    match = _regex(pattern).search(to_text(value))
    if match is None:
        return None
    try:
        return match.group(group)
    except IndexError:
        return match.group(0)


def f_json(value: Any) -> Any:
    return json.dumps(None if is_missing(value) else value, ensure_ascii=False,
                      separators=(",", ":"), default=str)


def f_soql(value: Any) -> Any:
    """Escape for a quoted SOQL string literal (Salesforce): backslash and quote."""
    if is_missing(value):
        return None
    return to_text(value).replace("\\", "\\\\").replace("'", "\\'")


def f_html(value: Any) -> Any:
    """Escape for HTML text (``&``, ``<``, ``>``, quotes): free text such as an agent's
    note put into a CRM's HTML field (Odoo's chatter, Pipedrive's note)."""
    if is_missing(value):
        return None
    return html.escape(to_text(value), quote=True)


def f_escape(value: Any, chars: str, escape: str = "\\") -> Any:
    """Put ``escape`` (a backslash) before each of ``chars`` (Zoho criteria: ``(),``),
    once: the escape itself is doubled first, then each character escaped in one pass
    (a character listed twice, or one the escape holds, is not escaped again)."""
    if is_missing(value):
        return None
    text, escape = to_text(value), to_text(escape)
    wanted = {ch for ch in to_text(chars) if ch != escape}
    if escape:
        _check_growth(len(text) + text.count(escape) * len(escape), "escape", len(text))
        text = text.replace(escape, escape + escape)
        hits = sum(1 for ch in text if ch in wanted)
        _check_growth(len(text) + hits * len(escape), "escape", len(text))
    return text.translate({ord(ch): escape + ch for ch in wanted})


def f_default(value: Any, fallback: Any = "") -> Any:
    return fallback if blank(value) else value


def f_join(value: Any, sep: str = "") -> Any:
    if is_missing(value):
        return None
    items = value if isinstance(value, list | tuple) else [value]
    sep = to_text(sep)
    if sep:
        _check_growth(len(sep) * (len(items) - 1), "join's separators")
    return sep.join(to_text(v) for v in items if not blank(v))


def f_first(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return None if is_missing(value) else value


def f_length(value: Any) -> Any:
    if is_missing(value):
        return 0
    try:
        return len(value)
    except TypeError:
        return 1


def f_list(value: Any) -> Any:
    if is_missing(value):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def f_pluck(value: Any, path: str) -> Any:
    """From a list of objects, the value at ``path`` of each (missing ones left out)."""
    if is_missing(value):
        return []
    items = value if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        found = get_path(item, path)
        if found is not MISSING and found is not None:
            out.append(found)
    return out


def f_where(value: Any, path: str, wanted: Any = True) -> Any:
    """The objects of a list whose value at ``path`` equals ``wanted``."""
    if is_missing(value):
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [item for item in items if get_path(item, path) == wanted]


@pass_context
def f_translate(ctx: Context, value: Any, table: Any, *default: Any) -> Any:
    """Value map: ``table`` is a mapping literal or the name of one in ``crm.maps``.

    Exact key first, then case-insensitive; an unmapped value is ``default`` when given,
    else itself. Works element-wise on a list.
    """
    mapping = _runtime(ctx).maps.get(table, {}) if isinstance(table, str) else table
    if not isinstance(mapping, Mapping):
        return value if not default else default[0]

    def one(item: Any) -> Any:
        if is_missing(item):
            return default[0] if default else None
        key = to_text(item)
        if key in mapping:
            return mapping[key]
        folded = key.casefold()
        for k, v in mapping.items():
            if str(k).casefold() == folded:
                return v
        return default[0] if default else item

    if isinstance(value, list | tuple):
        mapped = [one(v) for v in value]
        # a long value mapped from many short ones: ['a'] * 1000 | translate({'a': text})
        _check_growth(text_size(mapped), "translate", text_size(value))
        return mapped
    return one(value)


def f_iso(value: Any) -> Any:
    when = _when(value)
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")


@pass_context
def f_iso_local(ctx: Context, value: Any, tz: str | None = None) -> Any:
    when = _when(value)
    return None if when is None else when.astimezone(_zone(ctx, tz)).isoformat(
        timespec="seconds")


@pass_context
def f_date(ctx: Context, value: Any, tz: str | None = None) -> Any:
    when = _when(value)
    return None if when is None else when.astimezone(_zone(ctx, tz)).date().isoformat()


@pass_context
def f_strftime(ctx: Context, value: Any, fmt: str, tz: str | None = None) -> Any:
    when = _when(value)
    return None if when is None else when.astimezone(_zone(ctx, tz)).strftime(fmt)


def f_epoch(value: Any) -> Any:
    when = _when(value)
    return None if when is None else int(when.timestamp())


def f_epoch_ms(value: Any) -> Any:
    when = _when(value)
    return None if when is None else round(when.timestamp() * 1000)


def f_ms(value: Any) -> Any:
    seconds = f_float(value)
    return None if seconds is None else round(seconds * 1000)


def f_minutes(value: Any) -> Any:
    seconds = f_float(value)
    return None if seconds is None else round(seconds / 60)


def f_mmss(value: Any) -> Any:
    seconds = f_int(value)
    return None if seconds is None else f"{seconds // 60:02d}:{seconds % 60:02d}"


def f_hhmm(value: Any) -> Any:
    seconds = f_int(value)
    if seconds is None:
        return None
    minutes = (seconds + 59) // 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@pass_context
def f_e164(ctx: Context, value: Any, region: str | None = None) -> Any:
    from router.phone import normalize

    if blank(value):
        return None
    number = normalize(to_text(value), (region or _runtime(ctx).region).upper(), r"^$")
    return number.e164


@pass_context
def f_ref(ctx: Context, value: Any, name: str) -> Any:
    """The value of ``value`` in reference table ``name`` (a second call, cached)."""
    rt = _runtime(ctx)
    if isinstance(value, list | tuple):
        return [f_ref(ctx, v, name) for v in value]
    if blank(value) or rt.refs is None:
        return None
    key = to_text(value)
    found = rt.refs(name, key)
    if found is MISSING:
        rt.missing.add((name, key))
        return None
    return found


def _check_pattern(pattern: Any) -> None:
    try:
        _regex(pattern)
    except re.error as exc:
        raise ValueError(f"bad regex {pattern!r}: {exc}") from None


def _check_zone(name: Any) -> None:
    if not name:
        return
    try:
        _zone_named(name)
    except (KeyError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}") from None


#: Checks of a filter's literal arguments when a template is compiled, by (filter,
#: argument index): what would fail every evaluation fails ``callroute check`` instead.
LITERAL_CHECKS: Final[dict[tuple[str, int], Callable[[Any], None]]] = {
    ("regex", 0): _check_pattern, ("iso_local", 0): _check_zone, ("date", 0): _check_zone,
    ("strftime", 1): _check_zone,
}


def _text_filter(value: Any) -> str:
    return to_text(value)


def _url_filter(value: Any) -> str:
    return url_quote(to_text(value))


#: Filters a template may use (the names documented in docs/crm/templates.md).
FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "str": f_str, "int": f_int, "float": f_float, "round": f_round,
    "upper": f_upper, "lower": f_lower, "title": f_title, "trim": f_trim,
    "truncate": f_truncate, "replace": f_replace, "split": f_split, "digits": f_digits,
    "regex": f_regex, "json": f_json, "soql": f_soql, "escape": f_escape, "html": f_html,
    "default": f_default, "join": f_join, "first": f_first, "length": f_length,
    "list": f_list, "pluck": f_pluck, "where": f_where, "translate": f_translate,
    "iso": f_iso, "iso_local": f_iso_local, "date": f_date, "strftime": f_strftime,
    "epoch": f_epoch, "epoch_ms": f_epoch_ms,
    "ms": f_ms, "minutes": f_minutes, "mmss": f_mmss, "hhmm": f_hhmm,
    "e164": f_e164, "ref": f_ref,
}
HIDDEN_FILTERS: Final[dict[str, Callable[..., Any]]] = {"_text": _text_filter, "_url": _url_filter}


def t_empty(value: Any) -> bool:
    if blank(value):
        return True
    return isinstance(value, list | tuple | dict) and len(value) == 0


#: Tests usable after ``is``: ``customer.id is empty``, ``x is none``, ``x is number``.
TESTS: Final[dict[str, Callable[..., bool]]] = {
    "empty": t_empty,
    "none": is_missing,
    "defined": lambda v: not isinstance(v, Undefined),
    "undefined": lambda v: isinstance(v, Undefined),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "mapping": lambda v: isinstance(v, dict),
    "sequence": lambda v: isinstance(v, list | tuple),
    "true": lambda v: v is True,
    "false": lambda v: v is False,
}
