"""The generic REST connector: any CRM with a JSON API, configured in YAML only.

:class:`RestConnector` implements both :class:`~router.crm.base.CustomerDirectory` and
:class:`~router.crm.base.RecordSink` from a :class:`~router.crm.config.CrmSettings`.
Requests go through :class:`~router.crm.http.CrmHttp` (timeouts, TLS, error classes);
this module turns numbers and records into requests, and answers into customers, using
the templates and dotted paths of the config. An answer that does not fit the mapping
raises :class:`~router.errors.CrmMappingError` naming the config field and the path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp

from router.crm.base import ChangedPage, PostResult
from router.crm.config import (
    ChangedSettings,
    CrmSettings,
    FieldMap,
    MultipleSettings,
    PostSettings,
    RecordingSettings,
)
from router.crm.http import CrmHttp, CrmResponse
from router.crm.mapping import (
    MISSING,
    get_path,
    parse_datetime,
    render_json,
    render_text,
    set_path,
    url_quote,
)
from router.errors import CrmMappingError
from router.metrics import CRM_ERRORS
from router.models import CallerNumber, Customer, NumberKind
from router.phone import normalize

log = logging.getLogger(__name__)

PostKind = Literal["activity", "lead", "task"]
_CURSOR_SEP = "|"


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

    def __repr__(self) -> str:
        return f"RestConnector({self.settings.name!r}, {self.settings.base_url!r})"

    async def aclose(self) -> None:
        """Release HTTP connections."""
        await self.http.aclose()

    def enabled(self, kind: PostKind) -> bool:
        """Whether posting ``kind`` (activity, lead, task) is configured."""
        return getattr(self.settings, kind) is not None

    # --- lookups ---------------------------------------------------------------------

    async def find_by_number(self, number: CallerNumber) -> Customer | None:
        """The customer for ``number``, None when unknown; several matches → one by rule."""
        customers = await self.find_all(number)
        if not customers:
            return None
        chosen = choose(customers, self.settings.lookup.multiple)
        if len(customers) > 1:
            log.info(
                "crm lookup: %d records matched, chose %s by %s (others: %s)",
                len(customers), chosen.id, self.settings.lookup.multiple.rule,
                ", ".join(c.id for c in customers if c is not chosen),
            )
        return chosen

    async def find_all(self, number: CallerNumber) -> list[Customer]:
        """Every record the CRM returns for ``number``, mapped, in the CRM's order."""
        if not number.lookupable:
            return []
        spec = self.settings.lookup
        context = {
            "e164": number.e164, "national": number.national, "digits": number.digits,
            "country": number.country,
        }
        resp = await self.http.request(
            "lookup", spec.method, render_text(spec.url, context, encode=url_quote),
            params=_render_map(spec.params, context),
            headers=_render_map(spec.headers, context) or None,
            json_body=render_json(spec.body, context) if spec.body is not None else None,
            accept_status=spec.not_found_status,
        )
        if resp.status in spec.not_found_status or resp.body is None:
            return []
        records = self._results("lookup", resp.body, spec.results, "crm.lookup.results")
        return [
            self._customer("lookup", record, spec.fields, f"crm.lookup.fields (record {i})")
            for i, record in enumerate(records)
        ]

    # --- sync ------------------------------------------------------------------------

    async def changed_since(self, cursor: str | None) -> ChangedPage:
        """One page of customers changed since ``cursor`` (None: since ``initial_since``).

        ``cursor`` may also be an ISO date-time, to start from that time. Pass the
        returned ``next_cursor`` back for the next page; None means the last page.
        """
        spec = self.settings.changed
        if spec is None:
            log.warning("crm changed_since: crm.changed is not configured; nothing to sync")
            return ChangedPage(entries=[], next_cursor=None)
        since, remote = _split_cursor(cursor, spec)
        context = {"updated_since": since, "cursor": remote or None}
        if spec.cursor.type == "next_url" and remote:
            url, params, body = remote, {}, None
        else:
            url = render_text(spec.url, context, encode=url_quote)
            params = _render_map(spec.params, context)
            body = render_json(spec.body, context) if spec.body is not None else None
        resp = await self.http.request(
            "changed", spec.method, url, params=params, json_body=body,
            headers=_render_map(spec.headers, context) or None,
        )
        records = self._results("changed", resp.body, spec.results, "crm.changed.results")
        fields = spec.fields or self.settings.lookup.fields
        entries = [
            (
                self._customer("changed", record, fields, f"crm.changed.fields (record {i})"),
                self._numbers(record, spec),
            )
            for i, record in enumerate(records)
        ]
        return ChangedPage(entries=entries, next_cursor=self._next_cursor(spec, since, resp,
                                                                          entries))

    def _next_cursor(
        self,
        spec: ChangedSettings,
        since: str,
        resp: CrmResponse,
        entries: list[tuple[Customer, list[str]]],
    ) -> str | None:
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
            self._mapping_error(
                "changed", f"crm.changed.cursor.path: {spec.cursor.path!r} is not a string"
            )
        return f"{since}{_CURSOR_SEP}{value}"

    def _numbers(self, record: Any, spec: ChangedSettings) -> list[str]:
        found: list[str] = []
        for path in spec.numbers:
            value = get_path(record, path)
            values = value if isinstance(value, list) else [value]
            for item in values:
                if isinstance(item, str | int) and not isinstance(item, bool):
                    number = normalize(str(item), self.region)
                    if number.kind is NumberKind.E164 and number.e164 not in found:
                        found.append(str(number.e164))
        return found

    # --- records ---------------------------------------------------------------------

    async def post_call(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Create the call activity (``crm.activity``)."""
        return await self._post("activity", self.settings.activity, record, idempotency_key)

    async def create_lead(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Create a lead for an unknown caller (``crm.lead``)."""
        return await self._post("lead", self.settings.lead, record, idempotency_key)

    async def create_task(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        """Create a follow-up task (``crm.task``)."""
        return await self._post("task", self.settings.task, record, idempotency_key)

    async def _post(
        self,
        kind: PostKind,
        spec: PostSettings | None,
        record: Mapping[str, Any],
        key: str,
    ) -> PostResult:
        if spec is None:
            return PostResult(extra={"disabled": True})
        data = _jsonable(record)
        rec = self.settings.recordings
        if rec is not None and not data.get("recording_url"):
            data["recording_url"] = self._uploaded.get(key) or await self._recording_url(data, key)
        context = {
            "record": data, "idempotency_key": key,
            "now": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        headers = _render_map(spec.headers, context)
        if spec.idempotency_header:
            headers[spec.idempotency_header] = key
        resp = await self.http.request(
            kind, spec.method, render_text(spec.url, context, encode=url_quote),
            params=_render_map(spec.params, context), json_body=_post_body(spec, data, context),
            headers=headers, accept_status=spec.duplicate_status,
        )
        result = PostResult(
            remote_id=self._remote_id(kind, spec, resp),
            duplicate=resp.status in spec.duplicate_status,
            extra={"status": resp.status},
        )
        if (kind == "activity" and rec is not None and rec.mode == "upload"
                and data.get("recording_url")):
            await self._after_upload(rec, data, key, str(data["recording_url"]))
        return result

    async def _after_upload(self, rec: RecordingSettings, data: Mapping[str, Any], key: str,
                            url: str) -> None:
        """The CRM confirmed the activity linking the uploaded recording: remember the
        link for the record's other steps and, if configured, delete the local file."""
        self._uploaded[key] = url
        while len(self._uploaded) > 1024:
            self._uploaded.pop(next(iter(self._uploaded)))
        path = data.get(rec.path_field)
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

    def _remote_id(self, kind: PostKind, spec: PostSettings, resp: CrmResponse) -> str | None:
        if not spec.id_path:
            return None
        value = get_path(resp.body, spec.id_path)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
        # The object was created: do not fail the delivery, but make the mismatch visible.
        CRM_ERRORS.labels(kind, CrmMappingError.kind).inc()
        log.warning(
            "crm %s: created, but no id at crm.%s.id_path %r in the answer",
            kind, kind, spec.id_path,
        )
        return None

    # --- recordings ------------------------------------------------------------------

    def recording_url(self, path: str) -> str | None:
        """The link to a recording file in ``url`` mode (None when not configured)."""
        rec = self.settings.recordings
        if rec is None or rec.mode != "url" or not path:
            return None
        file = Path(path)
        context = {"basename": file.name, "name": file.stem, "path": path.lstrip("/")}
        return render_text(rec.url, context, encode=lambda t: url_quote(t).replace("%2F", "/"))

    async def _recording_url(self, record: Mapping[str, Any], key: str) -> str | None:
        rec = self.settings.recordings
        path = record.get(rec.path_field) if rec is not None else None
        if rec is None or not isinstance(path, str) or not path:
            return None
        if rec.mode == "url":
            return self.recording_url(path)
        return await self._upload(rec, Path(path), key)

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
            self._mapping_error(
                "recording", f"crm.recordings.result_path: {rec.result_path!r} not a string"
            )
        return str(value)

    # --- mapping ---------------------------------------------------------------------

    def _mapping_error(self, op: str, message: str) -> None:
        CRM_ERRORS.labels(op, CrmMappingError.kind).inc()
        raise CrmMappingError(message)

    def _results(self, op: str, body: Any, path: str, where: str) -> list[Any]:
        value = get_path(body, path)
        if value is MISSING:
            self._mapping_error(op, f"{where}: path {path!r} not found in the answer")
        if value is None:
            return []
        if isinstance(value, dict):
            return [value]
        if not isinstance(value, list):
            self._mapping_error(
                op, f"{where}: path {path!r} is a {type(value).__name__}, not a list or object"
            )
        return list(value)

    def _customer(self, op: str, record: Any, fields: FieldMap, where: str) -> Customer:
        try:
            return map_customer(record, fields, self.settings.lookup.tier_map)
        except CrmMappingError as exc:
            CRM_ERRORS.labels(op, exc.kind).inc()
            raise CrmMappingError(f"{where}: {exc}") from exc


# --- pure helpers ----------------------------------------------------------------------


def map_customer(record: Any, fields: FieldMap, tier_map: Mapping[str, str]) -> Customer:
    """A :class:`Customer` from one CRM record; CrmMappingError names the failing path."""
    if not isinstance(record, Mapping):
        raise CrmMappingError(f"record is a {type(record).__name__}, not an object")

    def value(name: str) -> Any:
        path = getattr(fields, name)
        found = get_path(record, path) if path is not None else None
        return None if found is MISSING else found

    def fail(name: str, what: str) -> CrmMappingError:
        return CrmMappingError(f"{name}: path {getattr(fields, name)!r} {what}")

    raw_id = get_path(record, fields.id)
    if raw_id is MISSING or raw_id is None or raw_id == "":
        raise fail("id", "not found in the record")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise fail("id", f"is a {type(raw_id).__name__}, not a string or number")
    tier = _text(value("tier"), lambda w: fail("tier", w))
    if tier is not None:
        tier = {k.lower(): v for k, v in tier_map.items()}.get(tier.lower(), tier)
    try:
        updated = parse_datetime(value("updated_at"))
    except ValueError as exc:
        raise fail("updated_at", "is not a date-time") from exc
    return Customer(
        id=str(raw_id),
        name=_text(value("name"), lambda w: fail("name", w)),
        tier=tier,
        value=_number(value("value"), lambda w: fail("value", w)),
        owner=_text(value("owner"), lambda w: fail("owner", w)),
        tags=_tags(value("tags"), lambda w: fail("tags", w)),
        open_tickets=_count(value("open_tickets"), lambda w: fail("open_tickets", w)),
        language=_text(value("language"), lambda w: fail("language", w)),
        updated_at=updated,
    )


def _text(value: Any, fail: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise fail(f"is a {type(value).__name__}, not text")


def _number(value: Any, fail: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise fail("is a bool, not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise fail(f"is {type(value).__name__} {str(value)[:40]!r}, not a number") from None


def _count(value: Any, fail: Any) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, list):
        return len(value)
    if isinstance(value, bool):
        raise fail("is a bool, not a count")
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise fail(f"is {type(value).__name__} {str(value)[:40]!r}, not a count") from None


def _tags(value: Any, fail: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        sep = ";" if ";" in value else ","
        return tuple(t.strip() for t in value.split(sep) if t.strip())
    if isinstance(value, list) and all(
        isinstance(t, str | int) and not isinstance(t, bool) for t in value
    ):
        return tuple(str(t) for t in value)
    raise fail("is not a list of text or a ;/, separated text")


def choose(customers: list[Customer], rule: MultipleSettings) -> Customer:
    """One customer of several by ``rule``; ties go to the earliest in the CRM's order."""
    indexed = list(enumerate(customers))
    if rule.rule == "highest_tier":
        order = [t.lower() for t in rule.tier_order]

        def rank(c: Customer) -> int:
            tier = (c.tier or "").lower()
            return order.index(tier) if tier in order else len(order)

        return min(indexed, key=lambda ic: (rank(ic[1]), ic[0]))[1]
    if rule.rule == "most_recent":
        def age(c: Customer) -> float:
            return -c.updated_at.timestamp() if c.updated_at else float("inf")

        return min(indexed, key=lambda ic: (age(ic[1]), ic[0]))[1]
    if rule.rule == "highest_value":
        return min(
            indexed,
            key=lambda ic: (-(ic[1].value if ic[1].value is not None else float("-inf")), ic[0]),
        )[1]
    return customers[0]


def _read_limited(file: Path, limit: int) -> bytes | None:
    """The file's bytes, or None when it is larger than ``limit`` (blocking: run in a thread)."""
    with file.open("rb") as handle:
        content = handle.read(limit + 1)
    return None if len(content) > limit else content


def _render_map(templates: Mapping[str, str], context: Mapping[str, Any]) -> dict[str, str]:
    """Query parameters or headers rendered; those that render empty are left out."""
    rendered = {k: render_text(v, context) for k, v in templates.items()}
    return {k: v for k, v in rendered.items() if v != ""}


def _split_cursor(cursor: str | None, spec: ChangedSettings) -> tuple[str, str]:
    if not cursor:
        return spec.initial_since, ""
    since, sep, remote = cursor.partition(_CURSOR_SEP)
    return (since or spec.initial_since), (remote if sep else "")


def _jsonable(record: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-JSON copy of ``record`` (date-times and other objects as text)."""
    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return obj.isoformat()
        if isinstance(obj, set | frozenset | tuple):
            return list(obj)
        return str(obj)

    result = json.loads(json.dumps(dict(record), default=default))
    assert isinstance(result, dict)
    return result


def _post_body(spec: PostSettings, data: dict[str, Any], context: Mapping[str, Any]) -> Any:
    if spec.body is not None:
        return render_json(spec.body, context)
    if spec.fields is not None:
        body: dict[str, Any] = {}
        for target, template in spec.fields.items():
            set_path(body, target, render_json(template, context))
        return body
    return data


__all__ = ["RestConnector", "choose", "map_customer"]
