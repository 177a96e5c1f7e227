"""Running the records pipeline: the steps that put one finished call into the CRM.

Steps run in their configured order. Each sees the call record, the ``customer`` as the
record had it and as earlier steps changed it (an unknown caller's new lead becomes
``customer.id``), and the results of the earlier steps (``steps.<name>.id``, outputs).
A step whose ``when`` is false is skipped: no request, status ``skipped``. The delivery
worker (router/records/delivery.py) calls :meth:`RecordRunner.run_step` one step at a time and
keeps each result in its per-step marker, so a retry resumes after the last step done
with the same context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from router.crm.base import StepResult, StepStatus, step_key
from router.crm.compiled import Plan, RecordStepPlan
from router.crm.config import CUSTOMER_FIELDS
from router.crm.find import find_object
from router.crm.http import CrmHttp, CrmResponse
from router.crm.mapping import get_path
from router.crm.refs import RefTables, evaluate
from router.crm.send import before_sending, send
from router.errors import CrmMappingError
from router.metrics import CRM_ERRORS

log = logging.getLogger(__name__)

#: Finds the link to a record's recording (uploading it if so configured), or None.
RecordingUrl = Callable[[Mapping[str, Any], str], Awaitable[str | None]]
#: Told that the CRM confirmed a step linking the recording (record, key, link).
RecordingLinked = Callable[[Mapping[str, Any], str, str], Awaitable[None]]
#: Told that a step linking the recording was recovered by its find (record, key, the
#: object found): the CRM holds what an earlier send created.
RecordingRecovered = Callable[[Mapping[str, Any], str, Any], Awaitable[None]]


def jsonable(record: Mapping[str, Any]) -> dict[str, Any]:
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


def now_iso() -> str:
    """The current time, ISO 8601 UTC with ``Z``."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def customer_of(record: Mapping[str, Any], previous: Mapping[str, StepResult],
                order: Sequence[str]) -> dict[str, Any]:
    """The ``customer`` a step sees: the record's, as earlier steps changed it."""
    customer: dict[str, Any] = {
        "id": record.get("customer_id") or None,
        "kind": record.get("customer_kind") or None,
        "owner": record.get("customer_owner") or None,
        "name": record.get("caller_name") or None,
        "tier": record.get("customer_tier") or None,
    }
    for name in order:
        result = previous.get(name)
        if result is not None:
            customer.update({k: v for k, v in result.customer.items() if k in CUSTOMER_FIELDS})
    return customer


class RecordRunner:
    """Runs the compiled record steps of one connector."""

    def __init__(self, plan: Plan, http: CrmHttp, refs: RefTables | None,
                 recording_url: RecordingUrl | None = None,
                 recording_linked: RecordingLinked | None = None,
                 recording_recovered: RecordingRecovered | None = None) -> None:
        self.plan = plan
        self.http = http
        self.refs = refs
        self.recording_url = recording_url
        self.recording_linked = recording_linked
        self.recording_recovered = recording_recovered
        self.order = [s.name for s in plan.records]

    def step_names(self) -> list[str]:
        """Every enabled step, in order."""
        return list(self.order)

    def context(self, step: str, data: Mapping[str, Any], key: str,
                previous: Mapping[str, StepResult], plan: Sequence[str]) -> dict[str, Any]:
        """The names a step's templates see."""
        steps = {
            name: {**r.outputs, "id": r.remote_id, "status": r.status}
            for name in self.order if (r := previous.get(name)) is not None
        }
        return {
            **self.plan.base, "record": data, "customer": customer_of(data, previous, self.order),
            "steps": steps, "idempotency_key": key, "now": now_iso(), "plan": list(plan),
            "step": step,
        }

    def _spec(self, step: str) -> RecordStepPlan:
        spec = self.plan.record_step(step)
        if spec is None:
            raise KeyError(f"no record step {step!r} (configured: {', '.join(self.order)})")
        return spec

    def wants(self, step: str, record: Mapping[str, Any], previous: Mapping[str, StepResult],
              plan: Sequence[str]) -> bool:
        """Whether ``step``'s ``when`` holds for this record."""
        spec = self._spec(step)
        if spec.when is None:
            return True
        return bool(spec.when(self.context(step, jsonable(record), "", previous, plan)))

    async def run_step(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                       previous: Mapping[str, StepResult], plan: Sequence[str]) -> StepResult:
        """Run one step (or skip it); raise :class:`CrmError` when the CRM fails it."""
        spec = self._spec(step)
        data = jsonable(record)
        context = self.context(step, data, idempotency_key, previous, plan)
        with before_sending():
            if spec.when is not None and not spec.when(context):
                log.debug("record step %s skipped: when %r is false", step, spec.spec.when)
                return StepResult(step=step, status="skipped")
            if spec.needs_recording and self.recording_url is not None and not data.get(
                    "recording_url"):
                data["recording_url"] = await self.recording_url(data, idempotency_key)
        header = spec.spec.idempotency_header
        resp = await send(self.http, spec.request, context, op=step,
                          where=f"crm record step {step}", runtime=self.plan.runtime,
                          refs=self.refs, accept=spec.spec.duplicate_status,
                          headers={header: idempotency_key} if header else None)
        duplicate = resp.status in spec.spec.duplicate_status
        remote_id = self._remote_id(spec, resp, duplicate)
        result = await self._result(spec, context, "duplicate" if duplicate else "done",
                                    remote_id, resp.body, resp.status)
        link = data.get("recording_url")
        if spec.needs_recording and self.recording_linked is not None and link:
            await self.recording_linked(data, idempotency_key, str(link))
        return result

    async def find_existing(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                            previous: Mapping[str, StepResult], plan: Sequence[str]
                            ) -> StepResult | None:
        """The object an earlier send of ``step`` created, by its ``find`` (None: not
        found, or no ``find``); its outputs and customer fields read from that object.
        A step that links the recording is then a confirmed one (delete_after_upload)."""
        spec = self._spec(step)
        if spec.find is None:
            return None
        data = jsonable(record)
        context = self.context(step, data, idempotency_key, previous, plan)
        found = await find_object(self.http, spec.find, context, f"{step}.find",
                                  self.plan.runtime, self.refs)
        if found is None:
            return None
        remote_id, obj = found
        result = await self._result(spec, context, "done", remote_id, obj, 200)
        if spec.needs_recording and self.recording_recovered is not None:
            await self.recording_recovered(data, idempotency_key, obj)
        return result

    def can_update(self, step: str) -> bool:
        """Whether ``step`` has an ``update`` request (its object can be changed later)."""
        spec = self.plan.record_step(step)
        return spec is not None and spec.update is not None

    async def run_update(self, step: str, record: Mapping[str, Any], remote_id: str,
                         idempotency_key: str) -> StepResult:
        """Change the object ``step`` created (CRM id ``remote_id``) with the step's
        ``update`` request; ``record`` is the delivered record carrying the changes.

        The templates see what the step's saw: ``idempotency_key`` is the step's (the key
        it wrote into the object, which its ``find`` looks for), so an update that writes
        the step's text again keeps it; ``record.recording_url`` is the link in ``url``
        mode. ``idempotency_key`` here is the update's own (logged). Raises
        :class:`CrmError` when the CRM refuses it."""
        spec = self._spec(step)
        if spec.update is None:
            raise KeyError(f"record step {step!r} has no update")
        data = jsonable(record)
        if spec.update_needs_recording and self.plan.recording_url is not None \
                and self.recording_url is not None and not data.get("recording_url"):
            # url mode only: the link is the file's; an upload is never made again here
            data["recording_url"] = await self.recording_url(data, idempotency_key)
        key = step_key(str(data.get("record_key") or idempotency_key), step)
        context = {**self.context(step, data, key, {}, []), "id": remote_id}
        await send(self.http, spec.update, context, op=f"{step}:update",
                   where=f"crm record step {step} update", runtime=self.plan.runtime,
                   refs=self.refs)
        log.debug("%s: step %s's object %s updated", idempotency_key, step, remote_id)
        return StepResult(step=step, status="done", remote_id=remote_id)

    async def fetch(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                    previous: Mapping[str, StepResult], plan: Sequence[str],
                    result: StepResult) -> CrmResponse:
        """Read the object ``result`` created back (the step's ``fetch``), for the doctor."""
        spec = self._spec(step)
        if spec.fetch is None:
            raise KeyError(f"record step {step!r} has no fetch")
        context = {**self.context(step, jsonable(record), idempotency_key, previous, plan),
                   "id": result.remote_id}
        return await send(self.http, spec.fetch, context, op=f"{step}:fetch",
                          where=f"crm record step {step} fetch", runtime=self.plan.runtime,
                          refs=self.refs)

    async def _result(self, spec: RecordStepPlan, context: Mapping[str, Any],
                      status: StepStatus, remote_id: str | None, answer: Any,
                      http_status: int) -> StepResult:
        """The step's result: its ``outputs`` and ``customer`` read from ``answer`` (what
        the CRM answered to the step, or the object its find found)."""
        reply = {**context, "response": answer, "id": remote_id, "status": http_status}
        outputs = await self._evaluate(spec.outputs, reply)
        customer = await self._evaluate(spec.customer, reply)
        return StepResult(
            step=spec.name, status=status, remote_id=remote_id, outputs=outputs,
            customer={k: v for k, v in customer.items() if v not in (None, "")},
        )

    async def _evaluate(self, template: Any, context: dict[str, Any]) -> dict[str, Any]:
        if template is None:
            return {}
        value = await evaluate(template, context, self.plan.runtime, self.refs)
        return dict(value) if isinstance(value, Mapping) else {}

    def _remote_id(self, spec: RecordStepPlan, resp: CrmResponse, duplicate: bool) -> str | None:
        if not spec.spec.id_path:
            return None
        value = get_path(resp.body, spec.spec.id_path)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
        if not duplicate:
            # created, but the id is not where the config says: do not fail the delivery,
            # but make the mismatch visible
            CRM_ERRORS.labels(spec.name, CrmMappingError.kind).inc()
            log.warning("crm record step %s: created, but no id at crm.records (%s).id_path %r",
                        spec.name, spec.name, spec.spec.id_path)
        return None
