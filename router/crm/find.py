"""Find an object a record step created earlier, by the key written into it.

For CRMs without idempotency keys, exactly-once delivery needs a way to ask "is the
activity of call K already there?" after an answer was lost. The step writes its
idempotency key into the object (an external-id field, a tag, a marker such as
``callroute:{idempotency_key}`` in the description), and its ``find``
(:class:`~router.crm.config.FindSpec`) says how to search for it::

    records:
      - name: call
        url: /crm/v3/objects/calls
        body: {properties: {hs_call_body: "... callroute:{idempotency_key}"}}
        find:
          method: POST
          url: /crm/v3/objects/calls/search
          body: {filterGroups: [{filters: [{propertyName: hs_call_body,
                 operator: CONTAINS_TOKEN, value: "callroute:{idempotency_key}"}]}]}
          results: results
          match: {path: properties.hs_call_body, contains: "callroute:{idempotency_key}"}
          id_path: id
          settle_s: 10

callroute never trusts a broad search: each object must carry the key at ``match.path``
(equal to, or containing, the rendered text); the first that does is the step's object.
Contained means as a whole: a key followed by a character a key may go on with (a digit,
``.``, ``:``...) is the start of another (``call:1700000000.12`` in a neighbour's
``call:1700000000.123``, or in this call's ``...12:lead``), not this one.
Without a ``match``, an object must carry the key the step writes (its
``idempotency_key``, or the record's key when the record itself is posted) in one of
its values: an answer whose results do not carry it (a search that ignored a filter, a
neighbour's object) is "not found", never taken for the step's object.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any, Final

from router.crm.lookups import results
from router.crm.mapping import MISSING, get_path
from router.crm.send import send
from router.errors import CrmMappingError

if TYPE_CHECKING:
    from router.crm.compiled import FindPlan
    from router.crm.filters import Runtime
    from router.crm.http import CrmHttp
    from router.crm.refs import RefTables


async def find_object(
    http: CrmHttp, find: FindPlan, context: dict[str, Any], op: str, runtime: Runtime,
    refs: RefTables | None,
) -> tuple[str, Any] | None:
    """The id and the object the search finds and ``match`` accepts, or None.

    Raises the request's CrmError, or CrmMappingError naming the config path when the
    answer has no list (or object) at ``results`` or a matching object no id at
    ``id_path``: a shape that cannot be read is never taken for "not there", which would
    post the step again.
    """
    spec = find.spec
    resp = await send(http, find.request, context, op=op, where=f"crm {op}", runtime=runtime,
                      refs=refs, not_found=spec.not_found_status)
    if resp.status in spec.not_found_status or resp.body is None:
        return None
    wanted = str(find.match(context)) if find.match is not None else ""
    for obj in results(resp.body, spec.results, f"{op}.results", op):
        if spec.match is not None:
            if not _matches(get_path(obj, spec.match.path), wanted,
                            spec.match.equals is not None):
                continue
        elif not _carries(obj, wanted):
            continue
        value = get_path(obj, spec.id_path)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value), obj
        raise CrmMappingError(f"{op}.id_path: {spec.id_path!r} not in the object found")
    return None


#: Characters a key may go on with (a Linkedid's digits, ``:<step>``): ``wanted`` found
#: followed by one is the start of another key, not this one (``call:1700000000.12`` in
#: a neighbour's ``call:1700000000.123`` or this call's ``call:1700000000.12:lead``).
_KEY_CHARS: Final = frozenset(string.ascii_letters + string.digits + "._:-")


def _contains(text: str, wanted: str) -> bool:
    """Whether ``text`` holds ``wanted`` as a whole: not followed by a character that
    would make it the start of a longer key."""
    if not wanted:
        return False
    if wanted[-1] not in _KEY_CHARS:
        return wanted in text
    start = text.find(wanted)
    while start != -1:
        end = start + len(wanted)
        if end == len(text) or text[end] not in _KEY_CHARS:
            return True
        start = text.find(wanted, start + 1)
    return False


def _matches(value: Any, wanted: str, equals: bool) -> bool:
    """Whether ``value`` (what an object holds at ``match.path``) carries ``wanted``."""
    if value is MISSING or value is None or not wanted:
        return False
    text = str(value)
    return text == wanted if equals else _contains(text, wanted)


def _carries(value: Any, wanted: str, depth: int = 0) -> bool:
    """Whether one of the values of ``value`` (an object found, walked down to 32
    levels) is text containing ``wanted``."""
    if not wanted or depth > 32:
        return False
    if isinstance(value, str):
        return _contains(value, wanted)
    if isinstance(value, dict):
        return any(_carries(v, wanted, depth + 1) for v in value.values())
    if isinstance(value, list):
        return any(_carries(v, wanted, depth + 1) for v in value)
    return False


__all__ = ["find_object"]
