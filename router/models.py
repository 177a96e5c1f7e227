"""The data callroute passes between its parts: customers, lookups, calls, decisions."""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def load_zone(name: str) -> zoneinfo.ZoneInfo:
    """The zone called ``name``; ValueError (for pydantic) when the name is unknown."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as "
                         "Asia/Shanghai)") from exc


def _zone_name(name: str) -> str:
    load_zone(name)
    return name


#: A setting that names an IANA time zone (``Asia/Shanghai``), checked when loaded.
ZoneName = Annotated[str, AfterValidator(_zone_name)]


class Customer(BaseModel):
    """A CRM customer as callroute sees it, whatever the CRM's own schema."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None = None
    tier: str | None = None
    value: float | None = None
    owner: str | None = None
    tags: tuple[str, ...] = ()
    open_tickets: int = 0
    language: str | None = None
    updated_at: datetime | None = None
    kind: str | None = None  # which CRM object the record is (contact, lead, ...)


LookupSource = Literal[
    "lru",        # in-process cache, fresh
    "redis",      # shared cache, fresh
    "crm",        # asked the CRM just now
    "stale",      # past TTL, served while a refresh runs or while the CRM fails
    "deadline",   # the answer was not back in time: routed as unknown
    "error",      # the CRM failed and nothing was cached
    "skipped",    # the number is not one to look up (anonymous, internal, short code)
]


class LookupResult(BaseModel):
    """What a lookup produced and where it came from (for the trace and metrics)."""

    customer: Customer | None
    source: LookupSource
    found: bool = False
    age_s: float | None = None
    error: str | None = None
    elapsed_ms: float = 0.0


class NumberKind(StrEnum):
    """What sort of caller number this is."""

    E164 = "e164"            # a dialable public number, normalised
    ANONYMOUS = "anonymous"  # withheld, restricted, unknown, empty
    INTERNAL = "internal"    # an internal extension
    SHORT_CODE = "short_code"  # emergency/service short codes
    INVALID = "invalid"      # digits that are no valid number for the region


class CallerNumber(BaseModel):
    """A caller's number as received and as normalised."""

    model_config = ConfigDict(frozen=True)

    raw: str
    kind: NumberKind
    e164: str | None = None
    national: str | None = None
    country: str | None = None  # ISO 3166 alpha-2, e.g. "CN"

    @property
    def lookupable(self) -> bool:
        """True when the number may be sent to the CRM."""
        return self.kind is NumberKind.E164 and self.e164 is not None

    @property
    def digits(self) -> str | None:
        """E.164 without the plus sign."""
        return self.e164[1:] if self.e164 else None


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One rule tried during a decision and why it matched or not.

    A plain dataclass, not a model: a decision records one per rule tried, on every
    call, and only ``explain`` reads them (pydantic keeps the instances as they are).
    """

    rule: str
    matched: bool
    why: str


class Decision(BaseModel):
    """Where a call goes, why, and the channel variables that say so to the dialplan."""

    rule: str
    reason: str
    action: str
    target: str | None = None
    queue: str | None = None
    priority: int | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    trace: list[RuleTrace] = Field(default_factory=list)
