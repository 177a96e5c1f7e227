"""Sending one configured request: render it, send it through the CRM's client, check
the answer against the request's ``error`` template.

Every configured request of a step (a lookup step; a record step and its ``find``,
``fetch`` and ``update``) goes through :func:`send`, so each resolves the references
its templates use (``ref``: :mod:`router.crm.refs`) and each answer that is not a
"nothing found" passes its ``error`` template, the CRM's words masked
(:meth:`~router.crm.compiled.Request.check`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from router.crm.compiled import Rendered, Request
from router.crm.filters import Runtime
from router.crm.http import CrmHttp, CrmResponse
from router.crm.refs import RefTables, evaluate
from router.errors import CrmError


@contextmanager
def before_sending() -> Iterator[None]:
    """What fails inside fails before the request leaves (a template, a reference, a
    recording's upload): the CRM cannot have acted on it, so a CrmError raised here says
    so (``may_have_acted`` False: the delivery's ledger does not hold the step as sent)."""
    try:
        yield
    except CrmError as exc:
        exc.may_have_acted = False
        raise


async def render_request(request: Request, context: dict[str, Any], runtime: Runtime,
                         refs: RefTables | None) -> Rendered:
    """``request`` for ``context`` (method, url, params, headers, body; empty params and
    headers left out), fetching the reference keys its templates use first."""
    if refs is not None and request.template.uses.refs:
        return request.finish(await evaluate(request.template, context, runtime, refs))
    return request.render(context)


async def send(
    http: CrmHttp, request: Request, context: dict[str, Any], *, op: str, where: str,
    runtime: Runtime, refs: RefTables | None, not_found: Collection[int] = (),
    accept: Collection[int] = (), headers: Mapping[str, str] | None = None,
) -> CrmResponse:
    """Send ``request`` rendered for ``context`` (plus ``headers``) as ``op``; the answer.

    Statuses in ``not_found`` (nothing there) and ``accept`` (a duplicate) are returned
    like a 2xx. Every answer but a not-found one must pass the request's ``error``
    template: CrmClientError naming ``where`` otherwise.
    """
    with before_sending():
        method, url, params, sent, body = await render_request(request, context, runtime, refs)
    sent.update(headers or {})
    resp = await http.request(op, method, url, params=params, headers=sent or None,
                              json_body=body, accept_status=(*not_found, *accept))
    if resp.status not in not_found:
        request.check(resp.body, resp.status, context, where, op, http.secrets)
    return resp


__all__ = ["before_sending", "render_request", "send"]
