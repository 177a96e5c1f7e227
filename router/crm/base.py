"""What callroute needs from a CRM, whatever the CRM is.

A connector implements :class:`CustomerDirectory` (lookups and the pre-warm sync) and
:class:`RecordSink` (call records, leads, follow-up tasks). Every method raises only
:class:`~router.errors.CrmError` subclasses, so callers can classify failures
(timeout, 5xx, 429 with Retry-After, bad JSON, mapping mismatch) without knowing HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.models import CallerNumber, Customer


@dataclass(frozen=True)
class ChangedPage:
    """One page of customers changed since a cursor (for ``callroute sync``).

    ``entries`` pairs each customer with the E.164 numbers it is reachable at;
    ``next_cursor`` is None on the last page.
    """

    entries: list[tuple[Customer, list[str]]]
    next_cursor: str | None


@dataclass(frozen=True)
class PostResult:
    """What the CRM said to a post: its id for the created object, and whether it
    recognised the idempotency key as already seen (a duplicate that created nothing)."""

    remote_id: str | None = None
    duplicate: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


class CustomerDirectory(Protocol):
    """Looks customers up by phone number."""

    async def find_by_number(self, number: CallerNumber) -> Customer | None:
        """The customer for ``number`` (already normalised and lookup-able), or None
        when the CRM knows no such caller (404, empty result). When several records
        match, the connector resolves them by its configured rule."""

    async def changed_since(self, cursor: str | None) -> ChangedPage:
        """Customers changed since ``cursor`` (None: from the beginning), one page."""

    async def aclose(self) -> None:
        """Release HTTP connections."""


class RecordSink(Protocol):
    """Receives what happened on calls."""

    async def post_call(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Create one activity for a finished call. The same key twice must not create
        a second activity (the CRM's idempotency support, or a lookup-before-create)."""

    async def create_lead(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Create a lead/contact for an unknown caller."""

    async def create_task(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Create a follow-up task for the owner of a missed or abandoned call."""
