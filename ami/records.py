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

#: How the call ended for the caller:
#:
#: * ``answered``: an agent answered (``answered_by``);
#: * ``voicemail``: the caller reached a mailbox (``voicemail``, message length ``voicemail_s``);
#: * ``rejected``: the route refused the call (busy/congestion tone or hang-up, by a rule);
#: * ``missed``: agents were rung or the caller waited in a queue, nobody answered, and the
#:   call ended without the caller hanging up first (the queue's wait ran out);
#: * ``abandoned``: the caller hung up while waiting (in a queue: ``queue_wait_s``; or while
#:   an agent rang; or before any routing);
#: * ``busy``: the agent(s) rung were busy and nothing else was tried;
#: * ``failed``: the call could not be put through (channel unavailable, congestion, error).
Outcome = Literal["answered", "voicemail", "rejected", "missed", "abandoned", "busy",
                  "failed"]


def record_key_for(linkedid: str) -> str:
    """The stable idempotency key of the call with this Linkedid."""
    return f"call:{linkedid}"


class HangupCause(BaseModel):
    """The Q.850 cause with which the caller's leg was hung up."""

    code: int | None = None
    text: str | None = None


class CallRecord(BaseModel):
    """Everything the CRM learns about one customer call.

    Times are timezone-aware datetimes in UTC; durations are seconds. ``incomplete`` is
    True when AMI events of this call may have been missed (the connection dropped while
    it was in progress): the fields are a best effort.
    """

    record_key: str
    linkedid: str
    caller: str | None = Field(None, description="E.164 when the number could be normalised")
    caller_raw: str | None = Field(None, description="the caller id number as Asterisk had it")
    caller_name: str | None = None
    anonymous: bool = Field(False, description="the caller withheld their number or sent none")
    did: str | None = None
    customer_id: str | None = None
    customer_tier: str | None = None
    customer_owner: str | None = Field(None, description="CRM_OWNER set by the router: the "
                                       "customer's owner (CRM id) chosen at routing time")
    customer_kind: str | None = Field(None, description="CRM_KIND set by the router: which "
                                      "CRM object the customer is (contact, lead, ...), when "
                                      "known")
    routing_rule: str | None = None
    route_reason: str | None = None
    route_target: str | None = Field(None, description="ROUTE_TARGET set by the router")
    route_queue: str | None = Field(None, description="ROUTE_QUEUE set by the router")
    degraded: bool = Field(
        False, description="routed without a complete decision: the CRM was late or failing "
        "(route_reason deadline, crm-error, ...) or callroute was not reached (dialplan fallback)",
    )
    queue: str | None = Field(None, description="the queue the caller actually waited in")
    agents_rung: list[str] = Field(default_factory=list, description="devices rung, in order")
    answered_by: str | None = Field(None, description="device that answered")
    answered_by_agent: str | None = None
    start: datetime | None = None
    answer: datetime | None = None
    end: datetime | None = None
    wait_s: float | None = Field(
        None, description="from the start until an agent or the mailbox answered, or the end")
    talk_s: float | None = None
    queue_wait_s: float | None = Field(None, description="time spent waiting in the queue")
    voicemail: str | None = Field(None, description="the mailbox (box@context) reached")
    voicemail_s: float | None = Field(None, description="length of the message left (0: none)")
    outcome: Outcome
    hangup_cause: HangupCause | None = None
    recording: str | None = None
    recording_url: str | None = Field(None, description="link that serves the recording")
    incomplete: bool = False
    cdrs: list[dict[str, str]] = Field(default_factory=list)
