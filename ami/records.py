"""The call record: one per customer call (one Asterisk ``Linkedid``), posted to the CRM.

Built by :class:`ami.tracker.CallTracker` from the call's AMI events and Cdr rows;
JSON-serialisable (``record.model_dump(mode="json")`` / ``model_dump_json()``).
``record_key`` is the idempotency key: the same call always gets the same key, so a
retried delivery can never create a second record in the CRM.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

Outcome = Literal["answered", "missed", "abandoned", "busy", "failed"]


def record_key_for(linkedid: str) -> str:
    """The stable idempotency key of the call with this Linkedid."""
    return f"call:{linkedid}"


class HangupCause(BaseModel):
    """The Q.850 cause with which the caller's leg was hung up."""

    code: int | None = None
    text: str | None = None


class CallRecord(BaseModel):
    """Everything the CRM learns about one customer call.

    Times are timezone-aware datetimes; durations are seconds. ``incomplete`` is True
    when AMI events of this call may have been missed (the connection dropped while it
    was in progress): the fields are a best effort.
    """

    record_key: str
    linkedid: str
    caller: str | None = Field(None, description="E.164 when the number could be normalised")
    caller_raw: str | None = Field(None, description="the caller id number as Asterisk had it")
    caller_name: str | None = None
    did: str | None = None
    customer_id: str | None = None
    customer_tier: str | None = None
    customer_owner: str | None = Field(None, description="CRM_OWNER set by the router: the "
                                       "customer's owner (CRM id) chosen at routing time")
    customer_kind: str | None = Field(None, description="which CRM object the customer is "
                                      "(contact, lead, ...), when known")
    routing_rule: str | None = None
    route_reason: str | None = None
    route_target: str | None = Field(None, description="ROUTE_TARGET set by the router")
    route_queue: str | None = Field(None, description="ROUTE_QUEUE set by the router")
    queue: str | None = Field(None, description="the queue the caller actually waited in")
    agents_rung: list[str] = Field(default_factory=list, description="devices rung, in order")
    answered_by: str | None = Field(None, description="device that answered")
    answered_by_agent: str | None = None
    start: datetime | None = None
    answer: datetime | None = None
    end: datetime | None = None
    wait_s: float | None = None
    talk_s: float | None = None
    outcome: Outcome
    hangup_cause: HangupCause | None = None
    recording: str | None = None
    incomplete: bool = False
    cdrs: list[dict[str, str]] = Field(default_factory=list)
