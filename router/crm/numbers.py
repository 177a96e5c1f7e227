"""The caller's number in every form a CRM may store or search, and matching stored numbers.

CRMs keep numbers as people typed them ("+1 (415) 555-0199", "020 7183 8751"), so a
lookup may search by any form (:func:`number_context`) and then keep only the records
whose stored numbers normalise to the caller's (:func:`stored_matches`): never "the
first hit" of a broad search. Both are pure and remembered per number.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import phonenumbers

from router.models import CallerNumber

_NON_DIGITS = re.compile(r"\D")
#: Longer text is no phone number (phonenumbers refuses it too): not parsed, not cached.
MAX_STORED = 250


@lru_cache(maxsize=8192)
def forms(e164: str) -> dict[str, str]:
    """Every form of an E.164 number (a fresh dict per number; treat it as read-only).

    ``e164`` +442071838751, ``digits`` 442071838751, ``national`` (the national
    significant number) 2071838751, ``local`` (as dialled inside the country)
    02071838751, ``national_format`` "020 7183 8751", ``international``
    "+44 20 7183 8751", ``country`` GB.
    """
    parsed = phonenumbers.parse(e164, None)
    national_format = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    return {
        "e164": e164,
        "digits": e164.lstrip("+"),
        "national": str(parsed.national_number),
        "local": _NON_DIGITS.sub("", national_format),
        "national_format": national_format,
        "international": phonenumbers.format_number(
            parsed, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
        "country": phonenumbers.region_code_for_number(parsed) or "",
    }


#: The forms that need phonenumbers to format the number (the others come for free).
FORMATTED = frozenset({"local", "national_format", "international"})


def _last(digits: str) -> Callable[[int], str]:
    def last(count: int) -> str:
        """The last ``count`` digits of the caller's number."""
        return digits[-int(count):] if int(count) > 0 else ""

    return last


def number_context(number: CallerNumber, needed: frozenset[str] = FORMATTED
                   ) -> dict[str, Any]:
    """The number names of lookup templates, for a lookup-able number (a new dict).

    The formatted forms (:data:`FORMATTED`) cost a phonenumbers parse the first time a
    number is seen: they are computed only when ``needed`` names one (the plan knows
    which names its templates use).
    """
    assert number.e164 is not None
    digits = number.e164[1:]
    values: dict[str, Any] = {
        "e164": number.e164, "digits": digits, "national": number.national or "",
        "country": number.country or "", "last": _last(digits),
    }
    if needed & FORMATTED:
        full = forms(number.e164)
        values.update(local=full["local"], national_format=full["national_format"],
                      international=full["international"])
    return values


@lru_cache(maxsize=65536)
def stored_e164(raw: str, region: str) -> str | None:
    """A stored number as E.164, read in ``region`` when it has no country code."""
    try:
        parsed = phonenumbers.parse(raw, region or None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def stored_numbers(value: Any) -> list[str]:
    """The numbers in a field value: text, a number, or a list of them (others ignored)."""
    values = value if isinstance(value, list | tuple) else [value]
    return [str(v) for v in values
            if isinstance(v, str | int) and not isinstance(v, bool) and str(v).strip()]


def stored_matches(values: Iterable[str], e164: str, region: str) -> bool:
    """True when one of ``values`` is the number ``e164`` once normalised.

    A stored number without a country code is read in the caller's country (``region``):
    "020 7183 8751" is +442071838751 for a British caller.
    """
    digits = e164[1:]
    for raw in values:
        if len(raw) > MAX_STORED:
            continue
        if _NON_DIGITS.sub("", raw) == digits or stored_e164(raw.strip(), region) == e164:
            return True
    return False
