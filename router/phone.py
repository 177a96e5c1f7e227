"""Caller numbers: recognise what they are and normalise the public ones to E.164.

``+8613800138000``, ``8613800138000``, ``008613800138000``, ``13800138000`` and
``"138 0013 8000"`` are one customer for region CN. Anonymous and withheld callers,
short codes (110, 10086) and internal extensions are recognised and never looked up.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers
from phonenumbers import shortnumberinfo

from router.models import CallerNumber, NumberKind

#: What Asterisk and carriers put in the caller id when there is no number to show.
ANONYMOUS = frozenset(
    {
        "", "unknown", "<unknown>", "anonymous", "restricted", "withheld", "private",
        "unavailable", "blocked", "null", "none", "asterisk", "s",
    }
)

#: Characters people and switches put between digits.
_SEPARATORS = re.compile(r"[\s\-().]")

DEFAULT_INTERNAL = r"^\d{2,6}$"


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


#: What :func:`_classify` remembers of a number: kind, raw, e164, national, country. Plain
#: strings in a plain tuple, which the cyclic garbage collector stops tracking (a model
#: instance is three tracked objects, and the memo holds thousands).
_Fields = tuple[str, str, str | None, str | None, str | None]


def normalize(
    raw: str | None, region: str = "CN", internal: str = DEFAULT_INTERNAL
) -> CallerNumber:
    """Classify and normalise a caller number for ``region`` (ISO 3166 alpha-2).

    ``internal`` is a regular expression matching internal extensions (after
    separators are removed); it is checked after short codes, so ``110`` is a short
    code and ``7001`` an extension.

    The classification is remembered for the last 8,192 arguments: repeat callers are
    most calls, and parsing with phonenumbers is the costliest step of a decision.
    """
    kind, text, e164, national, country = _classify(raw, region, internal)
    return CallerNumber(raw=text, kind=NumberKind(kind), e164=e164, national=national,
                        country=country)


@lru_cache(maxsize=8192)
def _classify(raw: str | None, region: str, internal: str) -> _Fields:
    text = (raw or "").strip()
    compact = _SEPARATORS.sub("", text)
    if compact.lower() in ANONYMOUS or not any(ch.isdigit() for ch in compact):
        return NumberKind.ANONYMOUS.value, text, None, None, None
    if len(compact) > 32:
        return NumberKind.INVALID.value, text[:32], None, None, None
    if compact.isdigit() and len(compact) <= 6 and _is_short_code(compact, region):
        return NumberKind.SHORT_CODE.value, text, None, None, None
    if _compiled(internal).match(compact):
        return NumberKind.INTERNAL.value, text, None, None, None
    try:
        parsed = phonenumbers.parse(compact, region)
    except phonenumbers.NumberParseException:
        return NumberKind.INVALID.value, text, None, None, None
    if not phonenumbers.is_valid_number(parsed):
        return NumberKind.INVALID.value, text, None, None, None
    return (
        NumberKind.E164.value,
        text,
        phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164),
        str(parsed.national_number),
        phonenumbers.region_code_for_number(parsed),
    )


def _is_short_code(digits: str, region: str) -> bool:
    try:
        parsed = phonenumbers.parse(digits, region)
    except phonenumbers.NumberParseException:
        return False
    return bool(shortnumberinfo.is_valid_short_number_for_region(parsed, region))


def valid_region(region: str) -> bool:
    """True when phonenumbers knows ``region`` (used to validate settings)."""
    return region.upper() in phonenumbers.SUPPORTED_REGIONS
