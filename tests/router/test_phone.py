"""Caller number classification and E.164 normalisation."""

from __future__ import annotations

import gc

import pytest

from router.models import NumberKind
from router.phone import normalize


@pytest.mark.parametrize(
    "raw",
    ["+8613800138000", "8613800138000", "008613800138000", "13800138000", "138 0013 8000",
     "138-0013-8000", "(138) 0013 8000"],
)
def test_same_mobile_in_every_spelling(raw: str) -> None:
    """Every usual spelling of one Chinese mobile is the same E.164 number for region CN."""
    number = normalize(raw, "CN")
    assert number.kind is NumberKind.E164
    assert number.e164 == "+8613800138000"
    assert number.country == "CN"
    assert number.lookupable
    assert number.digits == "8613800138000"
    assert number.national == "13800138000"


def test_shanghai_landline() -> None:
    """02150501234 is a Shanghai landline: the trunk 0 is dropped, area code 21 kept."""
    number = normalize("02150501234", "CN")
    assert number.e164 == "+862150501234"
    assert number.national == "2150501234"


def test_foreign_number_keeps_its_country() -> None:
    """An international number dialled with 00 keeps its own country."""
    number = normalize("0014155550100", "CN")
    assert number.e164 == "+14155550100"
    assert number.country == "US"


def test_default_region_changes_national_reading() -> None:
    """The same national digits mean different numbers in different default regions."""
    assert normalize("4155550100", "US").e164 == "+14155550100"
    assert normalize("4155550100", "CN").e164 == "+864155550100"


@pytest.mark.parametrize(
    "raw", ["", None, "unknown", "<unknown>", "Anonymous", "RESTRICTED", "withheld", "private",
            "  ", "abc"],
)
def test_anonymous_callers_are_never_looked_up(raw: str | None) -> None:
    """Withheld, anonymous and missing caller ids are recognised and not lookup-able."""
    number = normalize(raw, "CN")
    assert number.kind is NumberKind.ANONYMOUS
    assert not number.lookupable
    assert number.e164 is None


@pytest.mark.parametrize("raw", ["110", "120", "10086", "95588"])
def test_short_codes(raw: str) -> None:
    """Emergency and service short codes are recognised as such for CN."""
    number = normalize(raw, "CN")
    assert number.kind is NumberKind.SHORT_CODE
    assert not number.lookupable


@pytest.mark.parametrize("raw", ["7001", "7101", "200"])
def test_internal_extensions(raw: str) -> None:
    """Internal extensions match the configured pattern and are not looked up."""
    number = normalize(raw, "CN")
    assert number.kind is NumberKind.INTERNAL
    assert not number.lookupable


def test_internal_pattern_is_configurable() -> None:
    """A site with 4-digit extensions starting with 8 only treats those as internal."""
    assert normalize("8123", "CN", r"^8\d{3}$").kind is NumberKind.INTERNAL
    assert normalize("7001", "CN", r"^8\d{3}$").kind is NumberKind.INVALID


@pytest.mark.parametrize("raw", ["99999999999999999999999999999999999999", "+86 12", "1380013800"])
def test_invalid_numbers(raw: str) -> None:
    """Too long, too short or impossible numbers are invalid, not sent to the CRM."""
    number = normalize(raw, "CN")
    assert number.kind is NumberKind.INVALID
    assert not number.lookupable


def test_remembered_numbers_cost_the_garbage_collector_nothing() -> None:
    """Thousands of distinct callers remembered by normalize() add no object the cyclic
    collector tracks (its full passes pause the event loop per tracked object), and a
    remembered number still comes back whole."""
    numbers = [f"1860099{i:04d}" for i in range(2000)]
    normalize(numbers[0])
    gc.collect()
    before = len(gc.get_objects())
    for raw in numbers:
        normalize(raw)
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    again = normalize(numbers[1])
    assert (again.kind, again.e164, again.country) == (NumberKind.E164, "+8618600990001", "CN")
