"""What callroute needs from a CRM, whatever the CRM is.

A connector implements :class:`CustomerDirectory` (lookups and the pre-warm sync) and
:class:`RecordSink` (call records, leads, follow-up tasks). Every method raises only
:class:`~router.errors.CrmError` subclasses, so callers can classify failures
(timeout, 5xx, 429 with Retry-After, bad JSON, mapping mismatch) without knowing HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

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


StepStatus = Literal["done", "duplicate", "skipped"]


@dataclass(frozen=True)
class StepResult:
    """What one step of the records pipeline did: ``done`` (created ``remote_id``),
    ``duplicate`` (the CRM already had it), or ``skipped`` (its ``when`` was false).

    ``outputs`` are the step's configured outputs; ``customer`` the customer fields it
    set for later steps. :meth:`marker` / :meth:`from_marker` keep it in the outbox's
    per-step marker, so a retry that skips the step still hands them on.
    """

    step: str
    status: StepStatus = "done"
    remote_id: str | None = None
    outputs: Mapping[str, Any] = field(default_factory=dict)
    customer: Mapping[str, Any] = field(default_factory=dict)

    def marker(self) -> str:
        """The value of the outbox's per-step marker (JSON)."""
        data: dict[str, Any] = {"status": self.status, "id": self.remote_id}
        if self.outputs:
            data["outputs"] = dict(self.outputs)
        if self.customer:
            data["customer"] = dict(self.customer)
        return json.dumps(data, separators=(",", ":"), default=str)

    @classmethod
    def from_marker(cls, step: str, raw: str | bytes) -> StepResult:
        """Read a marker (also the older form: the remote id, or ``1`` for none)."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            if isinstance(data, dict):
                status = data.get("status")
                remote = data.get("id")
                outputs, customer = data.get("outputs"), data.get("customer")
                return cls(
                    step=step,
                    status=status if status in ("done", "duplicate", "skipped") else "done",
                    remote_id=str(remote) if remote is not None else None,
                    outputs=outputs if isinstance(outputs, dict) else {},
                    customer=customer if isinstance(customer, dict) else {},
                )
        return cls(step=step, remote_id=None if text in ("", "1") else text)

    @property
    def result(self) -> PostResult:
        """The same as a :class:`PostResult`."""
        return PostResult(remote_id=self.remote_id, duplicate=self.status == "duplicate",
                          extra={"step": self.step, "status": self.status})


@runtime_checkable
class StepSink(Protocol):
    """A record sink made of named steps that depend on each other (the REST connector).

    The delivery worker asks for :meth:`step_names`, skips the steps it has markers for,
    and runs the others in order, handing each the results of those before it.
    """

    def step_names(self) -> list[str]:
        """Every configured step, in order."""

    def wants(self, step: str, record: Mapping[str, Any], previous: Mapping[str, StepResult],
              plan: Sequence[str]) -> bool:
        """Whether ``step`` applies to ``record`` (its ``when``)."""

    async def run_step(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                       previous: Mapping[str, StepResult], plan: Sequence[str]) -> StepResult:
        """Run one step (a skipped one returns status ``skipped`` without a request)."""


@dataclass(frozen=True)
class Recovery:
    """What a sink can do for a step whose create was sent but whose answer was lost.

    ``find``: look the object up by the key written into it (``find_created``), and post
    only when it is not there (not before ``settle_s`` after the lost send, for CRMs
    whose search index lags); ``repost``: the CRM honours the idempotency key, post
    again; ``hold``: neither, so a second post could duplicate the object.
    """

    mode: Literal["find", "repost", "hold"]
    settle_s: float = 0.0


@runtime_checkable
class CreatedFinder(Protocol):
    """A :class:`RecordSink` that can tell whether an earlier create reached the CRM
    (``router.records.ledger``). Sinks without it are trusted to be idempotent."""

    def recovery(self, step: str) -> Recovery:
        """What to do after a lost answer of ``step`` (call, lead, task)."""

    async def find_created(
        self, step: str, record: Mapping[str, Any], idempotency_key: str,
        previous: Mapping[str, StepResult], plan: Sequence[str],
    ) -> StepResult | None:
        """The object an earlier send of ``step`` created, found by its key (the step's
        outputs read from it), or None."""


# --- change webhooks (router.crm.webhooks decodes, router.lookup.webhook applies) -------


@dataclass(frozen=True)
class InboundRequest:
    """A webhook request as received (no I/O object): what a signature may cover."""

    method: str
    url: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class CustomerChange:
    """One customer the CRM says changed: its id, the numbers the event carried (as
    written), the new record when the event carried it, and whether to fetch it."""

    event: Literal["updated", "deleted"]
    customer_id: str
    numbers: tuple[str, ...] = ()
    customer: Customer | None = None
    fetch: bool = False
    #: the event as the CRM named it (``contact.propertyChange``), for the audit trail
    name: str = ""


@dataclass(frozen=True)
class WebhookMessage:
    """A verified, decoded webhook: its changes, the nonce that must be seen only once
    (None: the scheme has none), and how many events were of no interest."""

    changes: list[CustomerChange]
    nonce: str | None = None
    ignored: int = 0


#: A customer fetched by id, with the numbers it is reachable at (E.164 or as written).
Fetched = tuple[Customer, list[str]]


class ChangeReceiver(Protocol):
    """Verifies and decodes one CRM's change webhooks (``crm.webhooks[]``)."""

    @property
    def name(self) -> str:
        """The receiver's name (metrics, logs)."""

    @property
    def path(self) -> str:
        """Where it is mounted (``/webhooks/<name>``)."""

    @property
    def max_bytes(self) -> int:
        """The largest body accepted."""

    @property
    def replay_ttl_s(self) -> float:
        """How long a nonce is remembered (covers the timestamp window)."""

    @property
    def can_fetch(self) -> bool:
        """Whether :meth:`fetch` is configured."""

    async def receive(self, request: InboundRequest, now: float) -> WebhookMessage:
        """Verify and decode; raise :class:`~router.errors.WebhookError` (401 signature,
        400 shape with the missing path, ...)."""

    def answer(self) -> tuple[str, bytes] | None:
        """The acknowledgement body the CRM expects (content type, bytes), or None for
        callroute's JSON answer."""

    async def fetch(self, customer_id: str) -> Fetched | None:
        """The customer's current record by id (None: the CRM has none); CrmError."""

def step_key(record_key: str, step: str) -> str:
    """The idempotency key of one record step of the record ``record_key``: the record's
    key for the call, ``<key>:<step>`` for the others. Each step writes it into what it
    creates (its ``find`` looks for it); an ``update`` of that object sees it too."""
    return record_key if step == "call" else f"{record_key}:{step}"


@runtime_checkable
class StepUpdater(Protocol):
    """A record sink that can change what a step created, after the record was delivered
    (the REST connector, for steps with an ``update`` request)."""

    def can_update(self, step: str) -> bool:
        """Whether ``step``'s object can be updated."""

    async def run_update(self, step: str, record: Mapping[str, Any], remote_id: str,
                         idempotency_key: str) -> StepResult:
        """Change the object ``step`` created (CRM id ``remote_id``) from ``record`` (the
        delivered record with the changes); ``idempotency_key`` is the update's own key."""
