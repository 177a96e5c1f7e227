"""``callroute crm doctor``: the first thing to run when wiring a new CRM.

Against the configured CRM (nothing else: no Redis, no outbox), it shows every request
of every lookup step and what came back (secrets masked), the records each step kept,
and the customer the caller maps to. With ``--post`` it then sends a test call record
(a missed call from that number, with the customer just found) through every record
step, showing each request, answer and result, reads each created object back (the
step's ``fetch``), finds it again by the key it wrote (the step's ``find``: what a retry
does after a lost answer; a search that lags is asked again until ``settle_s``), changes
it with the step's ``update`` when it has one (a test disposition, what an agent's
disposition given after the wrap-up time does) and reads it back to show the fields the
update changed, and looks the caller up again: a lead the pipeline created should now be
found. Exit status 0 when everything answered, every find found its object and every
update changed what it read back, 1 otherwise (a field find filters on that the CRM
lacks, or cannot filter on, shows here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from yarl import URL

from router.crm.base import StepResult, step_key
from router.crm.compiled import LookupPlan, choose
from router.crm.http import Exchange, mask_headers
from router.crm.rest import RestConnector
from router.errors import CrmError
from router.models import CallerNumber, Customer
from router.settings import Settings, config_option

MASK = "***"
MAX_BODY = 3000
#: How often (s) a step's find is asked again while its search may still lag.
FIND_POLL_S = 2.0
#: The note of the doctor's test disposition.
TEST_NOTE = "callroute doctor: a test note"
#: Which of call, lead and task the outbox settings want for a record (records.delivery.plan).
OutboxPlan = Callable[[Mapping[str, Any], Any], list[str]]


class Doctor:
    """Runs the checks and writes the report to ``out``."""

    def __init__(self, settings: Settings, out: TextIO, plan: OutboxPlan | None = None
                 ) -> None:
        self.settings = settings
        self.plan = plan
        self.crm = settings.crm
        self.out = out
        self.conn = RestConnector(self.crm, region=settings.phone.default_region)
        self.trace: list[Exchange] = []
        self.conn.http.trace = self.trace
        self.ok = True

    # --- output ----------------------------------------------------------------------

    def say(self, text: str = "", indent: int = 0) -> None:
        """Write one line, secrets masked."""
        print(" " * indent + self.mask(text), file=self.out)

    @property
    def secrets(self) -> list[str]:
        """The values to mask, longest first: the configured secrets and what the client
        holds now (an OAuth2 token it was given)."""
        held = {*self.crm.all_secrets, *self.conn.http.secrets}
        return sorted((s for s in held if len(s) >= 3), key=len, reverse=True)

    def mask(self, value: Any) -> Any:
        """``value`` with every secret replaced by ``***`` (in text, lists and objects)."""
        return _masked(value, self.secrets)

    def body(self, value: Any, indent: int) -> None:
        """A JSON body, pretty and bounded."""
        if value is None:
            return
        text = value if isinstance(value, str) else json.dumps(
            self.mask(value), ensure_ascii=False, indent=2, default=str)
        if len(text) > MAX_BODY:
            text = text[:MAX_BODY] + f"\n... ({len(text) - MAX_BODY} more characters)"
        for line in self.mask(text).splitlines():
            self.say(line, indent)

    def exchanges(self, indent: int = 2) -> None:
        """Every request since the last call, and its answer."""
        for ex in self.trace:
            url = URL(ex.url)
            if ex.params:
                url = url.update_query(ex.params)
            self.say(f"-> {ex.method} {url.human_repr()}   ({ex.op})", indent)
            for name, value in mask_headers(ex.headers, self.conn.http.secret_headers).items():
                if name.lower() not in ("accept", "user-agent"):
                    self.say(f"{name}: {value}", indent + 3)
            self.body(ex.body, indent + 3)
            status = "no answer" if ex.status is None else f"HTTP {ex.status}"
            self.say(f"<- {status} in {ex.elapsed_ms:.0f} ms", indent)
            limits = {k: v for k, v in ex.response_headers.items()
                      if k.lower() == "retry-after" or "ratelimit" in k.lower()}
            for name, value in limits.items():
                self.say(f"{name}: {value}", indent + 3)
            self.body(ex.response, indent + 3)
            if ex.error:
                self.say(f"!! {ex.error}", indent + 3)
        self.trace.clear()

    # --- the checks --------------------------------------------------------------------

    def header(self) -> None:
        """What is configured."""
        crm = self.crm
        preset = f" (preset {crm.preset})" if crm.preset else ""
        self.say(f"CRM {crm.name}{preset} at {crm.base_url}; auth {crm.auth.type}; "
                 f"time zone {crm.timezone}")
        lookups = ", ".join(f"{x.name} ({x.kind or 'customer'}, {len(x.steps)} step(s))"
                            for x in self.conn.plan.lookups)
        self.say(f"lookups: {lookups}")
        steps = ", ".join(s.name + (f" [when {s.spec.when}]" if s.spec.when else "")
                          for s in self.conn.plan.records) or "none"
        self.say(f"record steps: {steps}")
        self.say("templates: compiled")

    async def lookup(self, number: CallerNumber) -> Customer | None:
        """Run each lookup in order, showing its requests; the customer found, if any."""
        self.say()
        if not number.lookupable:
            self.say(f"caller {number.raw!r} is {number.kind.value}: not looked up")
            return None
        from router.crm.numbers import number_context

        forms = number_context(number)
        self.say(f"caller {forms['e164']}: national {forms['national']}, local "
                 f"{forms['local']}, national_format {forms['national_format']!r}, "
                 f"international {forms['international']!r}, country {forms['country']}")
        plans = self.conn.plan.lookups
        for index, plan in enumerate(plans, 1):
            self.say()
            self.say(f"lookup {index}/{len(plans)}: {plan.name} ({plan.kind or 'customer'})")
            customers = await self._run_lookup(plan, number)
            if customers is None:
                return None
            if customers:
                chosen = choose(customers, plan.multiple)
                if len(customers) > 1:
                    self.say(f"{len(customers)} records kept; chosen by "
                             f"{plan.multiple.rule}: {chosen.id}", 2)
                self.say(f"=> customer {self._describe(chosen)}", 2)
                return chosen
            self.say("no record kept", 2)
        self.say()
        self.say("=> unknown caller (no lookup kept a record)")
        return None

    async def _run_lookup(self, plan: LookupPlan, number: CallerNumber
                          ) -> list[Customer] | None:
        try:
            customers = await self.conn.lookups.run(plan, number)
        except CrmError as exc:
            self.exchanges()
            self.say(f"!! lookup failed: {exc.kind}: {exc}", 2)
            self.ok = False
            return None
        self.exchanges()
        return customers

    @staticmethod
    def _describe(customer: Customer) -> str:
        fields = customer.model_dump(exclude_none=True, exclude_defaults=True)
        return ", ".join(f"{k}={v}" for k, v in fields.items())

    async def post(self, number: CallerNumber, customer: Customer | None) -> None:
        """Send a test record through every step, read back what was made, look again."""
        record = test_record(number, customer)
        wanted = (self.plan(record, self.settings.outbox) if self.plan is not None
                  else ["call", "lead", "task"])
        self.say()
        self.say(f"test call record {record['record_key']}: a missed call from "
                 f"{record['caller'] or 'a withheld number'}, customer "
                 f"{record['customer_id'] or 'unknown'}; outbox plan {wanted}")
        previous: dict[str, StepResult] = {}
        for name in self.conn.step_names():
            self.say()
            key = step_key(record["record_key"], name)
            if not self.conn.wants(name, record, previous, wanted):
                spec = self.conn.plan.record_step(name)
                self.say(f"step {name}: skipped (when {spec.spec.when if spec else '?'} "
                         "is false)")
                previous[name] = StepResult(step=name, status="skipped")
                continue
            self.say(f"step {name}:")
            try:
                result = await self.conn.run_step(name, record, key, previous, wanted)
            except CrmError as exc:
                self.exchanges()
                self.say(f"!! step {name} failed: {exc.kind}: {exc}", 2)
                self.ok = False
                return
            self.exchanges()
            before = dict(previous)
            previous[name] = result
            self.say(f"=> {result.status}, id {result.remote_id}"
                     + (f", outputs {dict(result.outputs)}" if result.outputs else "")
                     + (f", customer {dict(result.customer)}" if result.customer else ""), 2)
            read = await self._fetch_back(name, record, key, previous, wanted, result)
            await self._find_back(name, record, key, before, wanted, result)
            await self._update(name, record, key, previous, wanted, result, read)
        if number.lookupable:
            self.say()
            self.say("looking the caller up again:")
            found = await self.lookup(number)
            created = {r.customer.get("id") for r in previous.values() if r.customer}
            if created and found is not None and found.id in created:
                self.say("=> found the record the pipeline created")

    async def _fetch_back(self, name: str, record: Mapping[str, Any], key: str,
                          previous: Mapping[str, StepResult], wanted: Sequence[str],
                          result: StepResult) -> Any:
        """Read the created object back (the step's fetch); its answer, or None."""
        spec = self.conn.plan.record_step(name)
        if spec is None or spec.fetch is None or not result.remote_id:
            return None
        self.say(f"reading {name} {result.remote_id} back:", 2)
        try:
            resp = await self.conn.records.fetch(name, record, key, previous, wanted, result)
        except CrmError as exc:
            self.exchanges(4)
            self.say(f"!! could not read it back: {exc.kind}: {exc}", 4)
            self.ok = False
            return None
        self.exchanges(4)
        return resp.body

    async def _update(self, name: str, record: Mapping[str, Any], key: str,
                      previous: Mapping[str, StepResult], wanted: Sequence[str],
                      result: StepResult, before: Any) -> None:
        """Change the object with the step's update (a test disposition), read it back
        and show what changed: what a disposition given after the wrap-up time does."""
        spec = self.conn.plan.record_step(name)
        if spec is None or spec.update is None or not result.remote_id:
            return
        codes = [d.code for d in self.settings.web.dispositions]
        changed = {**record, "disposition": codes[0] if codes else "doctor",
                   "disposition_note": TEST_NOTE, "disposition_by": None}
        self.say(f"updating {name} {result.remote_id} with a test disposition "
                 f"{changed['disposition']!r} (what a disposition after the wrap-up time "
                 "does):", 2)
        try:
            await self.conn.run_update(name, changed, result.remote_id, f"{key}:disposition")
        except CrmError as exc:
            self.exchanges(4)
            self.say(f"!! update failed: {exc.kind}: {exc}", 4)
            self.ok = False
            return
        self.exchanges(4)
        if spec.fetch is None:
            self.say("=> updated (the step has no fetch: not read back)", 4)
            return
        after = await self._fetch_back(name, changed, key, previous, wanted, result)
        if after is None:
            return
        diff = changes(before, after)
        if diff:
            self.say("changed by the update:", 4)
        for path, value in diff.items():
            self.say(f"{path}: {_short(value)}", 6)
        if any(_carries(v, (str(changed["disposition"]), TEST_NOTE)) for v in diff.values()):
            self.say("=> the disposition is on it", 4)
        else:
            self.say("!! reading it back shows no field with the test disposition: check "
                     "what the update writes and what the fetch reads", 4)
            self.ok = False


    async def _find_back(self, name: str, record: Mapping[str, Any], key: str,
                         previous: Mapping[str, StepResult], wanted: Sequence[str],
                         result: StepResult) -> None:
        """Find the object again by its key, as a retry after a lost answer would."""
        spec = self.conn.plan.record_step(name)
        if spec is None or spec.find is None or result.status != "done":
            return
        settle = spec.find.spec.settle_s
        self.say(f"finding {name} by its key (what a retry does after a lost answer):", 2)
        deadline = time.monotonic() + settle
        while True:
            try:
                found = await self.conn.records.find_existing(name, record, key, previous,
                                                              wanted)
            except CrmError as exc:
                self.exchanges(4)
                self.say(f"!! find failed: {exc.kind}: {exc} (does the CRM have the field "
                         "it filters on, and may it filter on it?)", 4)
                self.ok = False
                return
            self.exchanges(4)
            if found is not None:
                if found.remote_id == result.remote_id:
                    self.say(f"=> found it by its key (id {found.remote_id})", 4)
                else:
                    self.say(f"!! found another object (id {found.remote_id}), not the one "
                             f"just created ({result.remote_id}): the key is not unique", 4)
                    self.ok = False
                return
            if time.monotonic() >= deadline:
                within = f" within settle_s ({settle:g} s)" if settle else ""
                self.say(f"!! not found by its key{within}: after a lost answer the step "
                         "would be posted again (check what find filters and matches on)", 4)
                self.ok = False
                return
            self.say(f"not found yet (the CRM's search may lag up to settle_s, {settle:g} s):"
                     f" asking again in {FIND_POLL_S:g} s", 4)
            await asyncio.sleep(FIND_POLL_S)


def _masked(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {_masked(str(k), secrets): _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    return value


def changes(before: Any, after: Any, path: str = "") -> dict[str, Any]:
    """The values of ``after`` that differ from ``before``, by dotted path (an object
    read back before and after an update)."""
    if isinstance(after, dict):
        old = before if isinstance(before, dict) else {}
        out: dict[str, Any] = {}
        for key, value in after.items():
            out.update(changes(old.get(key), value, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(after, list) and isinstance(before, list) and len(after) == len(before):
        out = {}
        for index, (old_item, new_item) in enumerate(zip(before, after, strict=True)):
            out.update(changes(old_item, new_item, f"{path}.{index}" if path else str(index)))
        return out
    return {} if after == before else {path or "(answer)": after}


def _carries(value: Any, texts: Sequence[str]) -> bool:
    return any(text in str(value) for text in texts)


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                          default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def test_record(number: CallerNumber, customer: Customer | None) -> dict[str, Any]:
    """The doctor's test call record (the JSON of ami.records.CallRecord, as the outbox
    holds it): a missed call a minute ago from ``number``."""
    now = datetime.now(UTC).replace(microsecond=0)
    linkedid = f"doctor.{int(now.timestamp())}"
    return {
        "record_key": f"call:{linkedid}", "linkedid": linkedid, "caller": number.e164,
        "caller_raw": number.raw, "caller_name": None, "anonymous": number.e164 is None,
        "did": None,
        "customer_id": customer.id if customer else None,
        "customer_tier": customer.tier if customer else None,
        "customer_owner": customer.owner if customer else None,
        "customer_kind": customer.kind if customer else None,
        "routing_rule": "callroute-doctor", "route_reason": "doctor", "route_target": None,
        "route_queue": None, "degraded": False, "queue": None, "agents_rung": [],
        "answered_by": None,
        "answered_by_agent": None, "start": _iso(now - timedelta(minutes=1)),
        "answer": None, "end": _iso(now - timedelta(seconds=30)), "wait_s": 30.0,
        "talk_s": None, "queue_wait_s": None, "voicemail": None, "voicemail_s": None,
        "outcome": "missed", "hangup_cause": None, "recording": None, "recording_url": None,
        "incomplete": False, "cdrs": [],
    }


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


async def doctor(settings: Settings, number: str | None, *, post: bool,
                 out: TextIO | None = None, plan: OutboxPlan | None = None) -> int:
    """Run the doctor; 0 when every request answered, 1 otherwise. ``plan`` says which of
    call, lead and task the outbox wants for the test record (default: all three)."""
    from router.phone import normalize

    doc = Doctor(settings, out or sys.stdout, plan)
    try:
        doc.header()
        if number is None:
            doc.say("give a caller's number to look it up (and --post to send a test record)")
            return 0
        caller = normalize(number, settings.phone.default_region, settings.phone.internal_pattern)
        customer = await doc.lookup(caller)
        if post and doc.ok:
            await doc.post(caller, customer)
    finally:
        await doc.conn.aclose()
    doc.say()
    doc.say("doctor: OK" if doc.ok else "doctor: FAILED (see the lines marked !!)")
    return 0 if doc.ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``callroute crm doctor`` to the command line."""
    crm = sub.add_parser("crm", help="the CRM connector: doctor")
    crm_sub = crm.add_subparsers(dest="crm_command", required=True)
    p = crm_sub.add_parser("doctor", help="show each CRM request and answer for a number")
    config_option(p)
    p.add_argument("number", nargs="?", help="a caller's number to look up")
    p.add_argument("--post", action="store_true",
                   help="also send a test call record through every record step")


__all__ = ["Doctor", "doctor", "register", "test_record"]
