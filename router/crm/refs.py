"""Reference tables: values read through a second call and cached (``{x | ref('owners')}``).

Templates are synchronous, so a reference is resolved in two passes: the ``ref``
filter answers from :class:`RefTables` when it can, and notes the keys it could not
(:attr:`router.crm.filters.Runtime.missing`); :func:`evaluate` then fetches those (one
request per key, or one for the whole table, as configured; one fetch per key at a time)
and evaluates again. Entries live ``ttl_s``; past it they are fetched again, and while
that fails the old value is served (logged) rather than failing the lookup. A key the
CRM does not know is remembered as none.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from router.crm.compiled import Fields, RefPlan
from router.crm.filters import Runtime
from router.crm.http import CrmHttp
from router.crm.mapping import MISSING, get_path
from router.crm.template import Compiled
from router.errors import CrmError, CrmMappingError
from router.models import Customer

log = logging.getLogger(__name__)

#: Evaluation passes at most (a ref whose value is itself looked up needs two).
MAX_PASSES = 3
_TABLE = "\x00table"


class RefTables:
    """The cached reference tables of one connector."""

    def __init__(self, refs: Mapping[str, RefPlan], http: CrmHttp, base: Mapping[str, Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refs = refs
        self.http = http
        self.base = base
        self.clock = clock
        # name -> key -> (value, expires at); a table is stored whole under _TABLE
        self._entries: dict[str, OrderedDict[str, tuple[Any, float]]] = {
            name: OrderedDict() for name in refs
        }
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}

    def get(self, name: str, key: str) -> Any:
        """The cached value, or :data:`MISSING` when it must be fetched."""
        ref = self.refs[name]
        entries = self._entries[name]
        now = self.clock()
        if ref.spec.key is not None:
            table = entries.get(_TABLE)
            if table is None or table[1] <= now:
                return MISSING
            return table[0].get(key)
        entry = entries.get(key)
        if entry is None or entry[1] <= now:
            return MISSING
        return entry[0]

    async def fetch(self, missing: set[tuple[str, str]]) -> None:
        """Fetch every missing ``(name, key)`` (tables once), at once."""
        wanted: set[tuple[str, str]] = set()
        for name, key in missing:
            wanted.add((name, _TABLE) if self.refs[name].spec.key is not None else (name, key))
        tasks = []
        for item in wanted:
            task = self._inflight.get(item)
            if task is None:
                task = asyncio.create_task(self._fetch_one(*item))
                self._inflight[item] = task
                task.add_done_callback(self._forget(item))
            tasks.append(task)
        results = await asyncio.gather(*(asyncio.shield(t) for t in tasks),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _forget(self, item: tuple[str, str]) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._inflight.pop(item, None)

        return done

    async def _fetch_one(self, name: str, key: str) -> None:
        ref = self.refs[name]
        table = key == _TABLE
        context = {**self.base, "key": None if table else key}
        method, url, params, headers, body = ref.request.render(context)
        try:
            resp = await self.http.request(
                f"ref:{name}", method, url, params=params, headers=headers or None,
                json_body=body, accept_status=ref.spec.not_found_status,
            )
            if resp.status not in ref.spec.not_found_status:
                ref.request.check(resp.body, resp.status, context, f"crm.refs.{name}",
                                  f"ref:{name}", self.http.secrets)
            value = self._read(ref, resp.status, resp.body, key)
        except CrmError as exc:
            old = self._entries[name].get(key)
            if old is None:
                raise
            log.warning("crm ref %s: refresh failed, serving the previous value for %.0f s: %s",
                        name, ref.spec.ttl_s / 10, exc)
            self._store(name, key, old[0], ref.spec.ttl_s / 10)
            return
        self._store(name, key, value, ref.spec.ttl_s)

    def _read(self, ref: RefPlan, status: int, body: Any, key: str) -> Any:
        if status in ref.spec.not_found_status or body is None:
            return {} if key == _TABLE else None
        found = get_path(body, ref.spec.results)
        if found is MISSING:
            raise CrmMappingError(f"crm.refs.{ref.name}.results: path {ref.spec.results!r} "
                                  "not found in the answer")
        if key != _TABLE:
            item = found[0] if isinstance(found, list) and found else found
            return self._value(ref, item, body, key)
        if not isinstance(found, list):
            raise CrmMappingError(f"crm.refs.{ref.name}.results: path {ref.spec.results!r} "
                                  "is not a list")
        table: dict[str, Any] = {}
        for item in found:
            item_key = get_path(item, ref.spec.key or "")
            if item_key is MISSING or item_key is None:
                continue
            table[str(item_key)] = self._value(ref, item, body, str(item_key))
        return table

    def _value(self, ref: RefPlan, item: Any, response: Any, key: str) -> Any:
        if isinstance(ref.value, Compiled):
            return ref.value({**self.base, "item": item, "response": response, "key": key})
        found = get_path(item, ref.value)
        return None if found is MISSING else found

    def _store(self, name: str, key: str, value: Any, ttl_s: float) -> None:
        entries = self._entries[name]
        entries[key] = (value, self.clock() + ttl_s)
        entries.move_to_end(key)
        while len(entries) > self.refs[name].spec.max_entries:
            entries.popitem(last=False)


async def map_record(fields: Fields, record: Any, base: Mapping[str, Any], runtime: Runtime,
                     refs: RefTables | None, steps: Mapping[str, Any] | None = None
                     ) -> Customer:
    """The customer for ``record`` by ``fields``, fetching the references its templates use.

    The templates see ``base`` (the plan's, or a lookup's with the caller's number),
    ``record``, the ``steps`` that found it and the field map's ``kind``.
    """
    if not isinstance(record, Mapping):
        raise CrmMappingError(f"record is a {type(record).__name__}, not an object")
    values = fields.path_values(record)
    if fields.templates is not None:
        context = {**base, "record": record, "steps": steps or {}, "kind": fields.kind}
        values.update(await evaluate(fields.templates, context, runtime, refs))
    return fields.finish(values)


async def evaluate(template: Compiled, context: dict[str, Any], runtime: Runtime,
                   refs: RefTables | None) -> Any:
    """Evaluate ``template``, fetching the reference keys it needs (see the module doc)."""
    if refs is None or not template.uses.refs:
        context["_rt"] = runtime
        return template(context)
    value = None
    for _ in range(MAX_PASSES):
        rt = replace(runtime, refs=refs.get, missing=set())
        context["_rt"] = rt
        value = template(context)
        if not rt.missing:
            return value
        await refs.fetch(rt.missing)
    return value
