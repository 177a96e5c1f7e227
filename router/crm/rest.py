"""The generic REST connector: any CRM with a JSON API, configured in YAML only.

:class:`RestConnector` implements :class:`~router.crm.base.CustomerDirectory`,
:class:`~router.crm.base.RecordSink` and :class:`~router.crm.base.StepSink` from a
:class:`~router.crm.config.CrmSettings`, compiled once (:func:`build_plan`). Requests go
through :class:`~router.crm.http.CrmHttp` (timeouts, TLS, error classes); lookups run in
:mod:`router.crm.lookups`, record steps in :mod:`router.crm.records`, second-call
references in :mod:`router.crm.refs`. An answer that does not fit the mapping raises
:class:`~router.errors.CrmMappingError` naming the config field and the path.
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import aiohttp

from router.crm.base import ChangedPage, Fetched, PostResult, Recovery, StepResult
from router.crm.compiled import ChangedPlan, build_plan, choose, map_customer
from router.crm.config import CrmSettings, RecordingSettings
from router.crm.http import CrmHttp, CrmResponse
from router.crm.lookups import LookupRunner, results
from router.crm.mapping import MISSING, get_path
from router.crm.records import RecordRunner
from router.crm.refs import RefTables, map_record
from router.crm.template import url_quote
from router.crm.webhooks import FetchSettings, fetch_record
from router.errors import CrmMappingError
from router.metrics import CRM_ERRORS
from router.models import CallerNumber, Customer, NumberKind
from router.phone import normalize

log = logging.getLogger(__name__)

_CURSOR_SEP = "|"
#: The legacy sink methods and the record step each runs.
_LEGACY_STEPS = ("call", "lead", "task")


class RestConnector:
    """Customer directory and record sink for a CRM described by ``settings``.

    ``region`` is used to normalise the numbers read from changed customers to E.164.
    """

    def __init__(
        self, settings: CrmSettings, *, region: str = "CN", http: CrmHttp | None = None
    ) -> None:
        self.settings = settings
        self.region = region
        self.http = http or CrmHttp(settings)
        #: record key -> link of its uploaded recording (its other steps reuse it)
        self._uploaded: dict[str, str] = {}
        #: record key -> link of an upload no step has confirmed yet (a lost answer's)
        self._unconfirmed: dict[str, str] = {}
        self.plan = build_plan(settings)
        self.refs = RefTables(self.plan.refs, self.http, self.plan.base) if self.plan.refs \
            else None
        self.lookups = LookupRunner(self.plan, self.http, self.refs)
        self.records = RecordRunner(self.plan, self.http, self.refs, self._recording_url,
                                    self._recording_linked, self._recording_recovered)

    def __repr__(self) -> str:
        return f"RestConnector({self.settings.name!r}, {self.settings.base_url!r})"

    async def aclose(self) -> None:
        """Release HTTP connections."""
        await self.http.aclose()

    def enabled(self, step: str) -> bool:
        """Whether a record step called ``step`` (call, lead, task, ...) is configured."""
        return self.plan.record_step(step) is not None

    # --- lookups ---------------------------------------------------------------------

    async def find_by_number(self, number: CallerNumber) -> Customer | None:
        """The customer for ``number``, None when unknown; several matches → one by rule."""
        lookup, customers = await self.lookups.find(number)
        if not customers or lookup is None:
            return None
        chosen = choose(customers, lookup.multiple)
        if len(customers) > 1:
            log.info(
                "crm lookup %s: %d records matched, chose %s by %s (others: %s)",
                lookup.name, len(customers), chosen.id, lookup.multiple.rule,
                ", ".join(c.id for c in customers if c is not chosen),
            )
        return chosen

    async def find_all(self, number: CallerNumber) -> list[Customer]:
        """Every record the first lookup that finds any returns, mapped, in the CRM's order."""
        return (await self.lookups.find(number))[1]

    # --- sync ------------------------------------------------------------------------

    async def changed_since(self, cursor: str | None) -> ChangedPage:
        """One page of customers changed since ``cursor`` (None: since ``initial_since``).

        ``cursor`` may also be an ISO date-time, to start from that time. Pass the
        returned ``next_cursor`` back for the next page; None means the last page.
        """
        changed = self.plan.changed
        if changed is None:
            log.warning("crm changed_since: crm.changed is not configured; nothing to sync")
            return ChangedPage(entries=[], next_cursor=None)
        spec = changed.spec
        since, remote = _split_cursor(cursor, spec.initial_since)
        context: dict[str, Any] = {**self.plan.base, "updated_since": since,
                                   "cursor": remote or None}
        method, url, params, headers, body = changed.request.render(context)
        if spec.cursor.type == "next_url" and remote:
            url, params, body = remote, {}, None
        resp = await self.http.request(
            "changed", method, url, params=params, json_body=body, headers=headers or None,
            accept_status=spec.not_found_status,
        )
        if resp.status in spec.not_found_status or resp.body is None:
            return ChangedPage(entries=[], next_cursor=None)
        changed.request.check(resp.body, resp.status, context, "crm changed", "changed",
                              self.http.secrets)
        records = results(resp.body, spec.results, "crm.changed.results", "changed")
        entries = [(await self._changed_customer(changed, record, i),
                    self._numbers(changed, record)) for i, record in enumerate(records)]
        return ChangedPage(entries=entries,
                           next_cursor=self._next_cursor(changed, since, resp, entries))

    async def _changed_customer(self, changed: ChangedPlan, record: Any, index: int
                                ) -> Customer:
        try:
            return await map_record(changed.fields, record, self.plan.base, self.plan.runtime,
                                    self.refs)
        except CrmMappingError as exc:
            CRM_ERRORS.labels("changed", exc.kind).inc()
            raise CrmMappingError(f"crm.changed.fields (record {index}): {exc}") from exc

    def _next_cursor(
        self,
        changed: ChangedPlan,
        since: str,
        resp: CrmResponse,
        entries: list[tuple[Customer, list[str]]],
    ) -> str | None:
        spec = changed.spec
        if spec.cursor.type == "updated_at":
            times = [c.updated_at for c, _ in entries if c.updated_at is not None]
            if not times or (spec.page_size is not None and len(entries) < spec.page_size):
                return None
            newest = max(times).astimezone(UTC).isoformat().replace("+00:00", "Z")
            return None if newest == since else newest
        value = get_path(resp.body, spec.cursor.path or "")
        if value is MISSING or value is None or value == "" or value is False:
            return None
        if isinstance(value, dict | list):
            CRM_ERRORS.labels("changed", CrmMappingError.kind).inc()
            raise CrmMappingError(
                f"crm.changed.cursor.path: {spec.cursor.path!r} is not a string")
        return f"{since}{_CURSOR_SEP}{value}"

    def _numbers(self, changed: ChangedPlan, record: Any) -> list[str]:
        found: list[str] = []
        for item in changed.numbers.stored(record, {**self.plan.base, "record": record}):
            number = normalize(item, self.region)
            if number.kind is NumberKind.E164 and number.e164 not in found:
                found.append(str(number.e164))
        return found

    # --- records ---------------------------------------------------------------------

    def step_names(self) -> list[str]:
        """The configured record steps, in order."""
        return self.records.step_names()

    def wants(self, step: str, record: Mapping[str, Any], previous: Mapping[str, StepResult],
              plan: Sequence[str]) -> bool:
        """Whether record step ``step`` applies (its ``when``)."""
        return self.records.wants(step, record, previous, plan)

    async def run_step(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                       previous: Mapping[str, StepResult], plan: Sequence[str]) -> StepResult:
        """Run record step ``step`` (see :mod:`router.crm.records`)."""
        return await self.records.run_step(step, record, idempotency_key, previous, plan)

    # --- change webhooks (router.crm.webhooks) ----------------------------------------

    async def customer_from_record(self, record: Any) -> Customer:
        """A CRM record (as a webhook or a fetch carries it) mapped by the first lookup's
        field map."""
        try:
            return await map_record(self.plan.lookups[0].fields, record, self.plan.base,
                                    self.plan.runtime, self.refs)
        except CrmMappingError as exc:
            CRM_ERRORS.labels("webhook", exc.kind).inc()
            raise

    def can_fetch_by_id(self, lookup: str | None = None) -> bool:
        """Whether a lookup (``lookup``, or any) has a step that reads a record by id."""
        return self.lookups.by_id_lookup(lookup) is not None

    async def fetch_by_id(self, spec: FetchSettings | None, customer_id: str,
                          lookup: str | None = None) -> Fetched | None:
        """The customer ``customer_id``, with its numbers: by the webhook's ``fetch``
        request when it has one, else by the step of a lookup (``lookup``, or the first
        that has one) that reads a record by its id."""
        if spec is not None:
            return await fetch_record(self.http, spec, customer_id, self.customer_from_record,
                                      self.plan.base)
        plan = self.lookups.by_id_lookup(lookup)
        if plan is None:
            raise CrmMappingError("no fetch: configured and no lookup step reads a record "
                                  "by its id")
        return await self.lookups.fetch_by_id(plan, customer_id)

    # --- exactly once (router.crm.base.CreatedFinder) ---------------------------------

    def recovery(self, step: str) -> Recovery:
        """After a lost answer of ``step``: find it by its key (``find``), post it again
        (an ``idempotency_header`` the CRM honours), or hold it (neither: a second post
        could duplicate the object)."""
        spec = self.plan.record_step(step)
        if spec is None:
            return Recovery("repost")  # nothing is posted for this step
        if spec.find is not None:
            return Recovery("find", spec.find.spec.settle_s)
        if spec.spec.lost_answer is not None:
            return Recovery(spec.spec.lost_answer)
        return Recovery("repost" if spec.spec.idempotency_header else "hold")

    async def find_created(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                           previous: Mapping[str, StepResult], plan: Sequence[str]
                           ) -> StepResult | None:
        """The object an earlier send of ``step`` created, found by its key."""
        if self.plan.record_step(step) is None:
            return None
        return await self.records.find_existing(step, record, idempotency_key, previous, plan)

    def can_update(self, step: str) -> bool:
        """Whether record step ``step`` has an ``update`` request."""
        return self.records.can_update(step)

    async def run_update(self, step: str, record: Mapping[str, Any], remote_id: str,
                         idempotency_key: str) -> StepResult:
        """Change the object ``step`` created (see :meth:`RecordRunner.run_update`)."""
        return await self.records.run_update(step, record, remote_id, idempotency_key)

    async def post_call(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Run the record step ``call`` alone."""
        return await self._legacy("call", record, idempotency_key)

    async def create_lead(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Run the record step ``lead`` alone."""
        return await self._legacy("lead", record, idempotency_key)

    async def create_task(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Run the record step ``task`` alone."""
        return await self._legacy("task", record, idempotency_key)

    async def _legacy(self, step: str, record: Mapping[str, Any], key: str) -> PostResult:
        if not self.enabled(step):
            return PostResult(extra={"disabled": True})
        result = await self.run_step(step, record, key, {}, _LEGACY_STEPS)
        return result.result

    # --- recordings ------------------------------------------------------------------

    def recording_url(self, path: str) -> str | None:
        """The link to a recording file in ``url`` mode (None when not configured)."""
        template = self.plan.recording_url
        if template is None or not path:
            return None
        file = Path(path)

        def encode(text: str) -> str:
            return url_quote(text).replace("%2F", "/")

        context = {"basename": encode(file.name), "name": encode(file.stem),
                   "path": encode(path.lstrip("/"))}
        return str(template(context))

    async def _recording_url(self, record: Mapping[str, Any], key: str) -> str | None:
        rec = self.settings.recordings
        path = record.get(rec.path_field) if rec is not None else None
        if rec is None or not isinstance(path, str) or not path:
            return None
        if rec.mode == "url":
            return self.recording_url(path)
        link = self._uploaded.get(key)
        if link is None:
            link = await self._upload(rec, Path(path), key)
            if link is not None:
                _remember(self._unconfirmed, key, link)
        return link

    async def _recording_linked(self, record: Mapping[str, Any], key: str, url: str) -> None:
        """The CRM confirmed a step linking the recording: in upload mode, remember the
        link for the record's other steps and, if configured, delete the local file."""
        rec = self.settings.recordings
        if rec is None or rec.mode != "upload":
            return
        _remember(self._uploaded, key, url)
        self._unconfirmed.pop(key, None)
        path = record.get(rec.path_field)
        if not rec.delete_after_upload or not isinstance(path, str) or not path:
            return
        try:
            await asyncio.to_thread(Path(path).unlink)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("crm recording %s: uploaded, but the local file could not be "
                        "deleted: %s", Path(path).name, exc.strerror)
            return
        log.info("crm recording %s: uploaded and confirmed, local file deleted",
                 Path(path).name)

    async def _recording_recovered(self, record: Mapping[str, Any], key: str, found: Any
                                   ) -> None:
        """A step linking the recording was recovered by its find: when the object found
        holds the link of this record's upload, the CRM has confirmed it as surely as
        a created step's answer does (so the file may go, with delete_after_upload).
        A link this process did not upload (the worker that did crashed) cannot be
        recognised: the file is kept."""
        rec = self.settings.recordings
        path = record.get(rec.path_field) if rec is not None else None
        if rec is None or rec.mode != "upload" or not isinstance(path, str) or not path:
            return
        link = self._uploaded.get(key) or self._unconfirmed.get(key)
        name = Path(path).name
        if link is None:
            log.info("crm recording %s: the step was found at the CRM, but which upload it "
                     "links is not known here: the local file is kept", name)
            return
        if not _holds(found, link):
            log.info("crm recording %s: the object found does not hold the upload's link: "
                     "the local file is kept", name)
            return
        await self._recording_linked(record, key, link)

    async def _upload(self, rec: RecordingSettings, file: Path, key: str) -> str | None:
        try:
            content = await asyncio.to_thread(_read_limited, file, rec.max_bytes)
        except OSError as exc:
            log.warning("crm recording %s: cannot read: %s", file.name, exc.strerror)
            return None
        if content is None:
            log.warning("crm recording %s: over %d bytes, not uploaded", file.name, rec.max_bytes)
            return None
        form = aiohttp.FormData()
        form.add_field(rec.file_field, content, filename=file.name,
                       content_type="application/octet-stream")
        resp = await self.http.request(
            "recording", "POST", rec.url, data=form,
            headers={"Idempotency-Key": f"{key}:recording"},
        )
        value = get_path(resp.body, rec.result_path)
        if not isinstance(value, str):
            CRM_ERRORS.labels("recording", CrmMappingError.kind).inc()
            raise CrmMappingError(
                f"crm.recordings.result_path: {rec.result_path!r} not a string")
        return value


# --- pure helpers ----------------------------------------------------------------------


def _read_limited(file: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than ``limit`` (blocking: run in a thread)."""
    with file.open("rb") as handle:
        content = handle.read(limit + 1)
    return None if len(content) > limit else content


def _remember(table: dict[str, str], key: str, value: str, limit: int = 1024) -> None:
    """``table[key] = value``, dropping the oldest entries beyond ``limit``."""
    table[key] = value
    while len(table) > limit:
        table.pop(next(iter(table)))


def _holds(value: Any, text: str) -> bool:
    """Whether a string of ``value`` (walked through objects and lists) contains ``text``,
    as is or HTML-escaped (a link in a rich-text body)."""
    if isinstance(value, str):
        return text in value or html.escape(text) in value
    if isinstance(value, dict):
        return any(_holds(v, text) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, text) for v in value)
    return False


def _split_cursor(cursor: str | None, initial: str) -> tuple[str, str]:
    if not cursor:
        return initial, ""
    since, sep, remote = cursor.partition(_CURSOR_SEP)
    return (since or initial), (remote if sep else "")


__all__ = ["RestConnector", "choose", "map_customer"]
