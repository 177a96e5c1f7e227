"""Builds the screen pop's parts from the settings, for :func:`router.app.serve`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.audit import AuditLog
from router.auth.access import AuthContext
from router.crypto import keyring_from_settings
from router.keys import Keys
from router.lookup.cache import TwoLevelCache
from router.models import Customer
from router.phone import normalize
from router.rules.presence import Presence, device_of
from router.settings import Settings
from router.web.audit import PageAudit
from router.web.decisions import DecisionStore
from router.web.history import History
from router.web.live import FALLBACK, LiveState
from router.web.pending import Pending
from router.web.routes import WebService
from router.web.wrapup import Enqueue, Wrapup

log = logging.getLogger(__name__)

AgentsOf = Callable[[], Mapping[str, Any]]  # agent id -> AgentEntry (dial, name)
#: How long (s) to look again for a customer a late CRM answer puts into the cache.
CACHE_WAITS = (0.3, 0.7, 1.5)


class CardCustomers:
    """Finds a card's customer in the customer cache (this instance's LRU, then Redis),
    only reading: no CRM request, no cache write, nothing counted in
    ``callroute_lookups`` or fed to the breaker. The call's own lookup, on whichever
    instance routed it, fills the shared cache; a page only reads what it left there.
    With ``wait``, it looks again a few times (:data:`CACHE_WAITS`): a CRM that answered
    after the routing deadline fills the cache in the background a moment later."""

    def __init__(self, cache: TwoLevelCache, waits: Sequence[float] = CACHE_WAITS) -> None:
        self.cache = cache
        self.waits = tuple(waits)

    async def find(self, e164: str, *, wait: bool = False) -> Customer | None:
        """The cached customer of ``e164`` (None: not cached, or known to be nobody)."""
        cache, policy = self.cache, self.cache.policy
        for delay in (0.0, *(self.waits if wait else ())):
            if delay:
                await asyncio.sleep(delay)
            now = cache.clock()
            slot = cache.get_local(e164)
            if slot is not None and policy.usable(slot[0], now) and slot[0].found:
                return slot[0].customer
            ok, entry = await cache.get_shared(e164)
            if ok and entry is not None and policy.usable(entry, now):
                if entry.found:
                    return entry.customer
                if not wait:
                    return None
        return None


class Roster:
    """Agent ids by device, from the rules' agents table (rebuilt when the rules are)."""

    def __init__(self, agents: AgentsOf) -> None:
        self.agents = agents
        self._source: object = None
        self._by_device: dict[str, str] = {}
        self._names: dict[str, tuple[str | None, str]] = {}

    def _refresh(self) -> None:
        table = self.agents()
        if table is not self._source:
            self._source = table
            self._by_device = {device_of(a.dial): agent for agent, a in table.items()}
            self._names = {agent: (getattr(a, "name", None), a.dial)
                           for agent, a in table.items()}

    def agent_of(self, device: str) -> str | None:
        """The agent id whose dial string rings ``device``."""
        self._refresh()
        return self._by_device.get(device_of(device))

    def names(self) -> dict[str, tuple[str | None, str]]:
        """Agent id → (name, dial string)."""
        self._refresh()
        return self._names


@dataclass
class WebParts:
    """The screen pop's objects, before the admin server exists."""

    live: LiveState
    decisions: DecisionStore
    roster: Roster
    history: History | None = None
    wrapup: Wrapup | None = None


def build_parts(settings: Settings, presence: Presence, agents: AgentsOf,
                describe: Callable[[str], str | None],
                customers: CardCustomers | None = None) -> WebParts:
    """The live view and the decision store (Redis parts come with :func:`attach_records`);
    cards without the customer's details (a call routed on another instance, or past the
    CRM's deadline) are completed from the cache by ``customers``."""
    roster = Roster(agents)
    parts: WebParts
    live = LiveState(roster.agent_of, presence=presence, roster=roster.names,
                     crm_url=settings.web.crm_url, wrapup_s=settings.web.wrapup_s)
    decisions = DecisionStore(describe=describe, on_lookup=live.note_lookup)
    live.decisions = decisions
    parts = WebParts(live, decisions, roster)
    region = settings.phone.default_region

    async def enrich(card: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        customer = card.get("customer") or {}
        caller = card.get("caller")
        number = normalize(caller, region) if caller else None
        e164 = number.e164 if number is not None and number.lookupable else None
        late = card.get("degraded") == "deadline"
        if customers is not None and e164 is not None and "name" not in customer and (
                customer or late or card.get("degraded") == FALLBACK):
            found = await customers.find(e164, wait=late)
            if found is not None and (not customer or found.id == customer.get("id")):
                extra["customer"] = found.model_dump(mode="json", exclude={"updated_at"})
                customer = extra["customer"]
        if parts.history is not None:
            try:
                extra["last_calls"] = await parts.history.recent(customer.get("id"), e164)
            except (RedisError, OSError) as exc:  # the card says so; the rest stays
                log.warning("call %s: the caller's last calls not read (Redis: %s)",
                            card.get("call"), exc)
                extra["last_calls_error"] = True
        return extra

    live.enrich = enrich
    return parts


def late_dispositions_s(settings: Settings) -> float:
    """How long a disposition can still update a sent call's activity: ``web.
    late_disposition_s`` when the CRM's call step says how (``update``), else 0."""
    call = settings.crm.record_step("call")
    return settings.web.late_disposition_s if call is not None and call.update is not None \
        else 0.0


def attach_records(parts: WebParts, settings: Settings, redis: Redis, keys: Keys,
                   enqueue: Enqueue) -> Enqueue:
    """History, wrap-up and the agents' calls awaiting a disposition on the outbox's
    Redis, encrypted with the deployment's key ring; returns the tracker's record
    consumer."""
    web = settings.web
    crypto = keyring_from_settings(settings)
    late_s = late_dispositions_s(settings)
    parts.history = History(redis, keys, tz=web.timezone, days=web.history_days,
                            last_calls=web.last_calls, crypto=crypto)
    pending = Pending(redis, keys, hold_s=web.wrapup_s, late_s=late_s, crypto=crypto,
                      name_of=parts.live.shown_name)
    parts.wrapup = Wrapup(redis, keys, enqueue, web.wrapup_s, filed=parts.history.add,
                          noted=parts.live.note_record, crypto=crypto, late_s=late_s,
                          redisposed=parts.history.redispose, pending=pending)
    return parts.wrapup.put


def make_service(parts: WebParts, settings: Settings, auth: AuthContext, *,
                 record_key_for: Callable[[str], str], outbox_status: Any = None,
                 ami_connected: Callable[[], bool] | None = None,
                 audit: AuditLog | None = None,
                 number_target: Callable[[str], str] | None = None) -> WebService:
    """The pages' service, checking users with the admin API's ``auth``; a call's
    Linkedid names its record by ``record_key_for``. With ``audit``, every customer a
    page shows is written to the audit trail (behind the push, :mod:`router.web.audit`),
    an unknown caller as ``number_target(number)`` (a keyed hash)."""
    page_audit = PageAudit(audit, number_target or (lambda _n: "number:?")) \
        if audit is not None else None
    return WebService(
        settings=settings.web, auth=auth, live=parts.live, record_key_for=record_key_for,
        history=parts.history, wrapup=parts.wrapup, outbox_status=outbox_status,
        ami_connected=ami_connected, roster_names=parts.roster.names, audit=audit,
        page_audit=page_audit,
    )
