"""Running lookups: an ordered list, each a chain of requests, then a field map.

For a caller, the lookups are tried in order and the first that keeps a record wins
(exact E.164 search, then last digits, then leads...). Within a lookup, the first step
searches; the later steps run for each record kept so far (``max_candidates`` at a
time, in parallel), e.g. to fetch the whole record by the id the search returned. A
candidate that does not fit (no record, not the caller's numbers, the CRM refused its
own request for good) is skipped and the next one tried; one whose request failed in a
way that may pass (timeout, 5xx, rate limit) fails the lookup. A step with
``numbers`` keeps only the records whose stored numbers normalise to the caller's
(:func:`router.crm.numbers.stored_matches`). The records left are mapped to customers
(the lookup's ``kind`` on each); the connector picks one by the lookup's ``multiple``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from router.crm.compiled import LookupPlan, LookupStepPlan, Plan
from router.crm.http import CrmHttp
from router.crm.mapping import MISSING, get_path
from router.crm.numbers import number_context, stored_matches
from router.crm.refs import RefTables, map_record
from router.crm.send import send
from router.errors import CrmError, CrmMappingError
from router.metrics import CRM_ERRORS
from router.models import CallerNumber, Customer

log = logging.getLogger(__name__)

#: One candidate: the record each step found for it, by step name, in step order.
Chain = dict[str, Any]
#: The later steps of a lookup are run for at most this many times ``max_candidates``
#: candidates (those dropped are replaced by the next): a broad search whose records do
#: not fit costs a bounded number of requests.
TRIED_PER_KEPT = 4


class LookupRunner:
    """Runs the compiled lookups of one connector."""

    def __init__(self, plan: Plan, http: CrmHttp, refs: RefTables | None) -> None:
        self.plan = plan
        self.http = http
        self.refs = refs

    async def find(self, number: CallerNumber) -> tuple[LookupPlan | None, list[Customer]]:
        """The first lookup that finds records for ``number``, and its customers."""
        if not number.lookupable:
            return None, []
        for lookup in self.plan.lookups:
            customers = await self.run(lookup, number)
            if customers:
                return lookup, customers
        return None, []

    async def run(self, lookup: LookupPlan, number: CallerNumber) -> list[Customer]:
        """Every customer one lookup finds for ``number``, in the CRM's order.

        With later steps, the candidates are followed ``max_candidates`` at a time; one
        that does not fit (a later step finds no record for it, its numbers are not the
        caller's, the CRM refuses its request for good, its record does not fit the
        field map) is skipped and the next one followed instead, until
        ``max_candidates`` are kept or :data:`TRIED_PER_KEPT` x ``max_candidates`` were
        tried. A failure that may pass (no answer in time, 5xx, a rate limit: the
        error's ``retryable``) of a candidate before the last one kept fails the lookup:
        that candidate may be the caller's (or rank first), and the others would be
        answered and cached in its place. When none is kept and one failed, the lookup
        fails with that error (never "unknown caller" because a request failed).
        """
        base: dict[str, Any] = {**self.plan.base, **number_context(number, lookup.names),
                                "item": None, "steps": {}}
        region = number.country or ""
        first = lookup.steps[0]
        chains: list[Chain] = [
            {first.name: record} for record in await self._records(lookup, first, base)
        ]
        chains = self._matching(lookup, first, chains, base, region)
        failed: list[CrmError] = []
        if len(lookup.steps) > 1:
            customers = await self._follow_all(lookup, chains, base, region, failed)
        else:
            outcomes = [await self._mapped(lookup, chain, base, i)
                        for i, chain in enumerate(chains)]
            customers = _keep(outcomes, len(outcomes), failed)
        if failed:
            if not customers:
                raise failed[0]
            log.warning("crm lookup %s: %d candidate(s) skipped, %d kept; first: %s",
                        lookup.name, len(failed), len(customers), failed[0])
        return customers

    async def _follow_all(self, lookup: LookupPlan, chains: list[Chain],
                          base: Mapping[str, Any], region: str, failed: list[CrmError]
                          ) -> list[Customer]:
        """The customers of the first ``max_candidates`` candidates every later step
        keeps, followed a full batch of ``max_candidates`` at a time (in parallel: at
        most :data:`TRIED_PER_KEPT` rounds, however many are dropped; candidates past
        the last one kept are ignored); failures skipped go to ``failed``."""
        limit = lookup.max_candidates
        pending = list(enumerate(chains[:limit * TRIED_PER_KEPT]))
        if len(chains) > limit:
            log.info("crm lookup %s: %d records, the later steps run for %d at a time "
                     "(at most %d)", lookup.name, len(chains), limit, len(pending))
        kept: list[Customer] = []
        while pending and len(kept) < limit:
            batch, pending = pending[:limit], pending[limit:]
            outcomes = await asyncio.gather(
                *(self._follow(lookup, base, chain, region, index) for index, chain in batch))
            kept += _keep(outcomes, limit - len(kept), failed)
        return kept

    async def _follow(self, lookup: LookupPlan, base: Mapping[str, Any], chain: Chain,
                      region: str, index: int) -> Customer | CrmError | None:
        """One candidate through the later steps, mapped; None when a step finds no
        record for it or keeps none of its numbers; the error when one failed."""
        try:
            for step in lookup.steps[1:]:
                record = await self._one(lookup, step, base, chain)
                if record is None:
                    return None
                chain = {**chain, step.name: record}
                if not self._matching(lookup, step, [chain], base, region):
                    return None
        except CrmError as exc:
            return exc
        return await self._mapped(lookup, chain, base, index)

    async def _mapped(self, lookup: LookupPlan, chain: Chain, base: Mapping[str, Any],
                      index: int) -> Customer | CrmError:
        """The candidate's customer, or the error when its record does not fit the field
        map (or a reference it reads failed)."""
        try:
            return await self._customer(lookup, chain, base, index)
        except CrmError as exc:
            return exc

    # --- a record by its id (webhooks) -------------------------------------------------

    def by_id_lookup(self, name: str | None = None) -> LookupPlan | None:
        """The lookup called ``name`` (None: the first) that has a step reading a record
        by its id, if any."""
        return next((x for x in self.plan.lookups
                     if (name is None or x.name == name) and x.by_id is not None), None)

    async def fetch_by_id(self, lookup: LookupPlan, record_id: str
                          ) -> tuple[Customer, list[str]] | None:
        """The record ``record_id`` read by the lookup's by-id step (and the steps after
        it), mapped by its field map, with the numbers stored on it; None when the CRM
        has no such record."""
        start = lookup.by_id
        assert start is not None
        step = lookup.steps[start]
        assert step.by_id is not None
        base: dict[str, Any] = {**self.plan.base, "item": None, "steps": {}}
        records = await self._records(lookup, step,
                                      {**base, "item": _nested(step.by_id, record_id)})
        if not records:
            return None
        chain: Chain = {step.name: records[0]}
        for later in lookup.steps[start + 1:]:
            record = await self._one(lookup, later, base, chain)
            if record is None:
                return None
            chain[later.name] = record
        customer = await self._customer(lookup, chain, base, 0)
        return customer, self._stored(lookup, chain, base, start)

    def _stored(self, lookup: LookupPlan, chain: Chain, base: Mapping[str, Any],
                start: int) -> list[str]:
        """The numbers of the record a by-id read found: the last of its steps that says
        where numbers are, else the lookup's first step's paths applied to the record."""
        steps = [s for s in lookup.steps[start:] if s.numbers] or [lookup.steps[0]]
        step = steps[-1]
        record = chain.get(step.name, next(reversed(chain.values())))
        return step.numbers.stored(record, {**base, "record": record, "steps": chain})

    # --- one step --------------------------------------------------------------------

    async def _records(self, lookup: LookupPlan, step: LookupStepPlan,
                       context: dict[str, Any]) -> list[Any]:
        resp = await send(self.http, step.request, context, op="lookup",
                          where=f"crm lookup {lookup.name}.{step.name}",
                          runtime=self.plan.runtime, refs=self.refs,
                          not_found=step.not_found_status)
        if resp.status in step.not_found_status or resp.body is None:
            return []
        return results(resp.body, step.results,
                       f"crm.lookups ({lookup.name}).steps ({step.name}).results", "lookup")

    async def _one(self, lookup: LookupPlan, step: LookupStepPlan, base: Mapping[str, Any],
                   chain: Chain) -> Any:
        context = {**base, "item": next(reversed(chain.values())), "steps": chain}
        records = await self._records(lookup, step, context)
        return records[0] if records else None

    def _matching(self, lookup: LookupPlan, step: LookupStepPlan, chains: list[Chain],
                  base: Mapping[str, Any], region: str) -> list[Chain]:
        if not step.numbers or not chains:
            return chains
        e164 = base["e164"]
        kept = []
        for chain in chains:
            record = chain[step.name]
            stored = step.numbers.stored(record, {**base, "record": record, "steps": chain})
            if stored_matches(stored, e164, region):
                kept.append(chain)
        if len(kept) < len(chains):
            log.debug("crm lookup %s.%s: %d of %d records have the caller's number",
                      lookup.name, step.name, len(kept), len(chains))
        return kept

    async def _customer(self, lookup: LookupPlan, chain: Chain, base: Mapping[str, Any],
                        index: int) -> Customer:
        record = next(reversed(chain.values()))
        try:
            return await map_record(lookup.fields, record, base, self.plan.runtime, self.refs,
                                    steps=chain)
        except CrmMappingError as exc:
            CRM_ERRORS.labels("lookup", exc.kind).inc()
            raise CrmMappingError(
                f"crm.lookups ({lookup.name}).fields (record {index}): {exc}") from exc


def _keep(outcomes: Sequence[Customer | CrmError | None], room: int,
          failed: list[CrmError]) -> list[Customer]:
    """The customers of ``outcomes`` (candidates in the CRM's order), at most ``room``;
    the failures before the last one kept go to ``failed``, or, when one may pass
    (``retryable``), are raised: the candidate it hid may be the caller's."""
    kept: list[Customer] = []
    for outcome in outcomes:
        if len(kept) >= room:
            break
        if isinstance(outcome, CrmError):
            if outcome.retryable:
                raise outcome
            failed.append(outcome)
        elif outcome is not None:
            kept.append(outcome)
    return kept


def _nested(path: str, value: str) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for the path ``a.b``."""
    out: dict[str, Any] = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def results(body: Any, path: str, where: str, op: str) -> list[Any]:
    """The records at ``path`` in an answer: a list, one object, or none (null)."""
    value = get_path(body, path)
    if value is MISSING:
        CRM_ERRORS.labels(op, CrmMappingError.kind).inc()
        raise CrmMappingError(f"{where}: path {path!r} not found in the answer")
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        CRM_ERRORS.labels(op, CrmMappingError.kind).inc()
        raise CrmMappingError(
            f"{where}: path {path!r} is a {type(value).__name__}, not a list or object")
    return list(value)
