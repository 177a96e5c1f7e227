"""Change webhooks from real CRMs, configured: how a request is signed, where its events,
records and numbers are, and how to fetch a record the event only names (no I/O here
except the fetch, which goes through the connector's HTTP client).

Each ``crm.webhooks[]`` entry is one receiver, mounted at ``/webhooks/<name>`` on the
admin server (``path`` to change it)::

    crm:
      webhooks:
        - name: hubspot
          signature: {scheme: hubspot_v3, secret: ${HUBSPOT_CLIENT_SECRET},
                      public_url: https://pbx.example.com/webhooks/hubspot}
          events: ""                    # the body is a list of events
          type: subscriptionType
          updated: [contact.propertyChange, contact.creation, contact.merge]
          deleted: [contact.deletion, contact.privacyDeletion]
          customer_id: objectId
          fetch:                        # the event names the contact only: fetch it
            url: /crm/v3/objects/contacts/{id}
            params: {properties: "firstname,lastname,phone,mobilephone,hubspot_owner_id"}
            numbers: [properties.phone, properties.mobilephone]

Signature schemes (``signature.scheme``), all compared in constant time:

================  ========================================================================
``hmac``          HMAC-SHA256 of the body, or of ``<timestamp>.<body>`` (``signed:
                  timestamp.body`` with ``timestamp_header``), in ``header``, ``hex`` or
                  ``base64``, after an optional ``prefix`` (``sha256=``)
``stripe``        ``header: t=<unix s>,v1=<hex>[,v1=...]`` over ``<t>.<body>`` (Stripe's
                  form; any ``v1`` may match, for secret rotation)
``hubspot_v3``    ``X-HubSpot-Signature-v3``: base64 HMAC-SHA256 over method + URI + body
                  + ``X-HubSpot-Request-Timestamp`` (ms), refused past 5 minutes; the URI
                  is ``public_url`` (the address HubSpot calls, in front of any proxy)
                  plus the query, else the URL the request reached
``token``         a shared token, in a header (``header``), the query (``query``) or the
                  body (``body_path``: Zoho's notification ``token``)
``basic``         HTTP basic ``username``/``password`` (Pipedrive's webhook auth)
``salesforce``    an outbound message (SOAP XML): its ``OrganizationId`` must be
                  ``organization_id`` (and a ``token`` in the query, when set); answered
                  with the SOAP ``<Ack>true</Ack>`` Salesforce waits for
================  ========================================================================

A wrong or missing signature is 401 ``bad_signature``; a timestamp outside
``tolerance_s`` 401 ``stale``; a signature seen before (timestamped schemes) 409
``replay``. A body that is not JSON (or XML) is 400 ``bad_json``; one without what the
config says is there is 400 ``bad_shape`` naming the missing path
(``[0].objectId: missing``).

Events: ``events`` is the dotted path to the list of events (``""``: the body, a list or
one object); in each, ``type`` is the event name (None: every event is an update),
mapped by ``updated``/``deleted`` (others are counted as ignored, or refused with
``unknown_events: refuse``); ``customer_id`` the
changed record's id (a list gives one change per id: Zoho's ``ids``); ``numbers`` paths
to its numbers (``*`` walks a list: ``data.phones.*.value``); ``record`` the path to the
whole record when the event carries it (``record_format: crm``: mapped by the lookup's
field map; ``customer``: callroute's own Customer shape). An update that carries no
record is fetched by id: by ``fetch`` when configured (``{id}`` in its templates), else
through the connector's lookup step that reads a record by the id a search found
(Pipedrive's ``/v1/persons/{item.item.id}``, EspoCRM's ``/Contact/{item.id}``: the
same request, field map and numbers as a call's lookup; ``lookup`` names which lookup).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from router.crm.base import CustomerChange, Fetched, InboundRequest, WebhookMessage
from router.crm.mapping import MISSING, get_path
from router.crm.numbers import stored_numbers
from router.crm.template import Compiled, compile_request
from router.errors import CrmMappingError, WebhookError
from router.models import Customer

if TYPE_CHECKING:  # the config imports this module; the client imports the config
    from router.crm.http import CrmHttp

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
HUBSPOT_WINDOW_S = 300.0
SALESFORCE_EVENTS = "Envelope.Body.notifications.Notification"
SALESFORCE_ORG = "Envelope.Body.notifications.OrganizationId"
SALESFORCE_ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body><notificationsResponse xmlns=\"http://soap.sforce.com/2005/09/outbound\">"
    "<Ack>true</Ack></notificationsResponse></soapenv:Body></soapenv:Envelope>"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignatureSettings(_Model):
    """How a webhook request proves it comes from the CRM (see the module)."""

    scheme: Literal["hmac", "stripe", "hubspot_v3", "token", "basic", "salesforce"]
    secret: SecretStr = SecretStr("")
    header: str = ""
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    signed: Literal["body", "timestamp.body"] = "body"
    timestamp_header: str | None = None
    tolerance_s: float = Field(300.0, gt=0)
    public_url: str | None = None
    token: SecretStr = SecretStr("")
    query: str | None = None
    body_path: str | None = None
    username: str = ""
    password: SecretStr = SecretStr("")
    organization_id: str = ""

    def check_complete(self) -> None:
        """ValueError naming what the scheme needs and is not given (checked for the
        webhooks that are enabled: a preset ships its webhooks off, without secrets)."""
        needs: dict[str, list[str]] = {
            "hmac": ["secret", "header"], "stripe": ["secret"], "hubspot_v3": ["secret"],
            "token": ["token"], "basic": ["username", "password"],
            "salesforce": ["organization_id"],
        }
        for name in needs[self.scheme]:
            if not getattr(self, name):
                raise ValueError(f"scheme {self.scheme} needs signature.{name}"
                                 + (" (e.g. ${CRM_WEBHOOK_SECRET})" if name == "secret" else ""))
        if self.signed == "timestamp.body" and not self.timestamp_header:
            raise ValueError("signed: timestamp.body needs signature.timestamp_header")
        if self.scheme == "token" and not (self.header or self.query or self.body_path):
            raise ValueError("scheme token needs signature.header, .query or .body_path")

    @property
    def timestamped(self) -> bool:
        """Whether the scheme signs a timestamp (so a nonce can be remembered for a while)."""
        return self.scheme in ("stripe", "hubspot_v3") or (
            self.scheme == "hmac" and self.timestamp_header is not None)

    @property
    def secrets(self) -> list[str]:
        return [s.get_secret_value() for s in (self.secret, self.token, self.password) if s]


#: Names the templates of a webhook's ``fetch`` may use.
FETCH_NAMES = frozenset({"id", "vars", "secrets"})


class FetchSettings(_Model):
    """Fetch a record by its id (``{id}``) when an event names it only."""

    method: Literal["GET", "POST"] = "GET"
    url: str
    params: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    result: str = Field("", description="dotted path to the record in the answer")
    numbers: list[str] = Field(default_factory=list)
    not_found_status: list[int] = Field(default_factory=lambda: [404])
    _compiled: Compiled | None = PrivateAttr(None)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("/", "http://", "https://")):
            raise ValueError("must be a path starting with / or an http(s):// URL")
        return value

    @model_validator(mode="after")
    def _compile(self) -> FetchSettings:
        self._compiled = compile_request(self.url, self.params, self.headers, None,
                                         FETCH_NAMES, label=f"webhook fetch {self.url}")
        return self

    def render(self, context: Mapping[str, Any]) -> tuple[str, dict[str, str], dict[str, str]]:
        """URL, query and headers for ``context`` (empty values left out)."""
        assert self._compiled is not None
        url, params, headers, _body = self._compiled(context)
        return (url, {k: v for k, v in params.items() if v != ""},
                {k: v for k, v in headers.items() if v != ""})


class WebhookSettings(_Model):
    """One change webhook of the CRM (``crm.webhooks[]``; see the module)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    enabled: bool = Field(True, description="a preset's webhooks are off until turned on")
    path: str | None = None
    format: Literal["json", "xml"] = "json"
    signature: SignatureSettings
    max_bytes: int = Field(262_144, ge=1024)
    events: str = ""
    type: str | None = "event"
    updated: list[str] = Field(default_factory=lambda: ["customer.updated"])
    deleted: list[str] = Field(default_factory=lambda: ["customer.deleted"])
    customer_id: str = "customer_id"
    numbers: list[str] = Field(default_factory=list)
    record: str | None = None
    record_format: Literal["crm", "customer"] = "crm"
    unknown_events: Literal["ignore", "refuse"] = "ignore"
    fetch: FetchSettings | None = Field(
        None, description="how to read a record the event only names; without it, the "
        "step of a lookup that reads a record by its id is used")
    lookup: str | None = Field(
        None, description="the lookup whose by-id step reads the records (default: the "
        "first lookup that has one)")

    @model_validator(mode="before")
    @classmethod
    def _salesforce_defaults(cls, value: Any) -> Any:
        sig = value.get("signature") if isinstance(value, dict) else None
        scheme = sig.get("scheme") if isinstance(sig, dict) else getattr(sig, "scheme", None)
        if scheme == "salesforce":
            value = {"format": "xml", "events": SALESFORCE_EVENTS, "type": None,
                     "customer_id": "sObject.Id", "record": "sObject", **value}
        return value

    @model_validator(mode="after")
    def _paths(self) -> WebhookSettings:
        if self.enabled:
            self.signature.check_complete()
        if self.path is not None and not self.path.startswith("/webhooks/"):
            raise ValueError("path must start with /webhooks/")
        if self.signature.scheme == "salesforce" and self.format != "xml":
            raise ValueError("scheme salesforce receives outbound messages: format xml")
        return self

    @property
    def mount(self) -> str:
        """Where the receiver is mounted."""
        return self.path or f"/webhooks/{self.name}"


def callroute_webhook(secret: str | SecretStr, tolerance_s: float,
                      max_bytes: int) -> WebhookSettings:
    """callroute's own scheme (``POST /webhooks/crm``, ``admin.webhook_secret``): HMAC
    hex of ``<timestamp>.<body>`` in ``X-Callroute-Signature: sha256=...``; events
    ``customer.updated``/``customer.deleted`` with ``customer_id``, ``numbers`` and an
    optional ``customer`` in callroute's Customer shape."""
    return WebhookSettings(
        name="crm", path="/webhooks/crm", max_bytes=max_bytes, enabled=True,
        signature=SignatureSettings(
            scheme="hmac", secret=SecretStr(secret) if isinstance(secret, str) else secret,
            header="X-Callroute-Signature",
            prefix="sha256=",
            signed="timestamp.body", timestamp_header="X-Callroute-Timestamp",
            tolerance_s=tolerance_s),
        numbers=["numbers"], record="customer", record_format="customer",
        unknown_events="refuse",
    )


def sign(secret: str, timestamp: str | int, body: bytes) -> str:
    """The ``X-Callroute-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


# --- verification ------------------------------------------------------------------------


def _refuse(status: int, outcome: str, message: str) -> WebhookError:
    return WebhookError(status, outcome, message)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _mac(secret: str, payload: bytes, encoding: str) -> str:
    digest = hmac.new(secret.encode(), payload, hashlib.sha256).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def _check_time(stamp: str, now: float, tolerance: float) -> None:
    try:
        sent = float(stamp)
    except ValueError as exc:
        raise _refuse(401, "stale", f"timestamp {stamp[:20]!r} is not a unix time") from exc
    if sent > 1e12:  # milliseconds
        sent /= 1000.0
    if abs(now - sent) > tolerance:
        raise _refuse(401, "stale", f"timestamp {stamp[:20]} is {now - sent:+.0f}s off our "
                                    f"clock (tolerance {tolerance:g}s)")


def _hmac(sig: SignatureSettings, req: InboundRequest, now: float) -> str:
    given = req.headers.get(sig.header, "").strip()
    if not given:
        raise _refuse(401, "bad_signature", f"header {sig.header} missing")
    payload = req.body
    if sig.timestamp_header:
        stamp = req.headers.get(sig.timestamp_header, "").strip()
        if not stamp:
            raise _refuse(401, "bad_signature", f"header {sig.timestamp_header} missing")
        if sig.signed == "timestamp.body":
            payload = f"{stamp}.".encode() + req.body
    expected = sig.prefix + _mac(sig.secret.get_secret_value(), payload, sig.encoding)
    if sig.encoding == "hex":
        given = given[: len(sig.prefix)] + given[len(sig.prefix):].lower()
    if not _same(given, expected):
        raise _refuse(401, "bad_signature", f"{sig.header} does not match")
    if sig.timestamp_header:
        _check_time(req.headers.get(sig.timestamp_header, ""), now, sig.tolerance_s)
    return expected


def _stripe(sig: SignatureSettings, req: InboundRequest, now: float) -> str:
    header = sig.header or "Stripe-Signature"
    parts = [p.strip().partition("=") for p in req.headers.get(header, "").split(",")]
    stamps = [v for k, _, v in parts if k == "t"]
    given = [v.lower() for k, _, v in parts if k == "v1"]
    if not stamps or not given:
        raise _refuse(401, "bad_signature", f"{header} needs t= and v1=")
    expected = _mac(sig.secret.get_secret_value(), f"{stamps[0]}.".encode() + req.body, "hex")
    if not any(_same(g, expected) for g in given):
        raise _refuse(401, "bad_signature", f"no v1 of {header} matches")
    _check_time(stamps[0], now, sig.tolerance_s)
    return expected


#: The characters HubSpot's v3 validation decodes in the request URI.
_HUBSPOT_DECODE = {"%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
                   "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";"}


def _hubspot_uri(sig: SignatureSettings, req: InboundRequest) -> str:
    if sig.public_url:
        query = req.url.partition("?")[2]
        uri = sig.public_url + (f"?{query}" if query else "")
    else:
        uri = req.url
    for code, char in _HUBSPOT_DECODE.items():
        uri = uri.replace(code, char).replace(code.lower(), char)
    return uri


def _hubspot(sig: SignatureSettings, req: InboundRequest, now: float) -> str:
    given = req.headers.get("X-HubSpot-Signature-v3", "").strip()
    stamp = req.headers.get("X-HubSpot-Request-Timestamp", "").strip()
    if not given or not stamp:
        raise _refuse(401, "bad_signature",
                      "X-HubSpot-Signature-v3 or X-HubSpot-Request-Timestamp missing")
    payload = (req.method.upper() + _hubspot_uri(sig, req)).encode() + req.body + stamp.encode()
    expected = _mac(sig.secret.get_secret_value(), payload, "base64")
    if not _same(given, expected):
        raise _refuse(401, "bad_signature", "X-HubSpot-Signature-v3 does not match")
    _check_time(stamp, now, min(sig.tolerance_s, HUBSPOT_WINDOW_S))
    return expected


def _basic(sig: SignatureSettings, req: InboundRequest) -> None:
    pair = base64.b64encode(
        f"{sig.username}:{sig.password.get_secret_value()}".encode()).decode()
    if not _same(req.headers.get("Authorization", ""), f"Basic {pair}"):
        raise _refuse(401, "bad_signature", "HTTP basic credentials missing or wrong")


def _token(sig: SignatureSettings, req: InboundRequest, doc: Any) -> None:
    if sig.header:
        given = req.headers.get(sig.header, "")
    elif sig.query:
        given = req.query.get(sig.query, "")
    else:
        value = get_path(doc, sig.body_path or "")
        given = value if isinstance(value, str) else ""
    if not given or not _same(given, sig.token.get_secret_value()):
        raise _refuse(401, "bad_signature", "webhook token missing or wrong")


# --- decoding ----------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"


def _element(node: ET.Element) -> Any:
    children = list(node)
    if not children:
        return None if node.get(_NIL) == "true" else (node.text or "").strip()
    groups: dict[str, list[Any]] = {}
    for child in children:
        groups.setdefault(_local(child.tag), []).append(_element(child))
    return {tag: values[0] if len(values) == 1 else values for tag, values in groups.items()}


def xml_document(body: bytes) -> Any:
    """A SOAP/XML body as JSON-like data (namespaces dropped, repeated elements as lists,
    ``xsi:nil`` as None). DTDs are refused (no entity expansion)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise _refuse(400, "bad_json", "XML with a DTD is not accepted")
    try:
        root = ET.fromstring(body)  # noqa: S314 - DTDs refused above: no entity to expand
        return {_local(root.tag): _element(root)}
    except ET.ParseError as exc:
        raise _refuse(400, "bad_json", f"body is not XML: {exc}") from exc
    except RecursionError:
        raise _refuse(400, "bad_json", "body is nested too deeply") from None


def collect(doc: Any, path: str) -> list[Any]:
    """Every value at ``path``; a ``*`` part walks each item of a list (or value of an
    object); a list at the end is flattened. Missing parts give nothing."""
    nodes = [doc]
    for part in path.split(".") if path else []:
        following: list[Any] = []
        for node in nodes:
            if part == "*":
                if isinstance(node, list):
                    following.extend(node)
                elif isinstance(node, dict):
                    following.extend(node.values())
                continue
            value = get_path(node, part)
            if value is not MISSING:
                following.append(value)
        nodes = following
    out: list[Any] = []
    for node in nodes:
        out.extend(node if isinstance(node, list) else [node])
    return out


def _where(events: str, index: int | None, path: str) -> str:
    base = f"{events}[{index}]" if index is not None else (events or "(body)")
    return f"{base}.{path}" if path else base


Mapper = Callable[[Any], Awaitable[Customer]]
#: Fetches a record by id: the webhook's ``fetch`` (None: the connector's lookup step
#: that reads a record by id), the id, and the lookup to use (None: the first).
Fetcher = Callable[[FetchSettings | None, str, str | None], Awaitable[Fetched | None]]


class WebhookReceiver:
    """Verifies and decodes one configured webhook (a
    :class:`~router.crm.base.ChangeReceiver`).

    ``mapper`` maps a CRM record to a Customer (the lookup's field map; needed for
    ``record_format: crm``); ``fetcher`` fetches a record by id: by the webhook's
    ``fetch``, or, without one and when ``by_id`` says the connector can, through the
    lookup step that reads a record by its id.
    """

    def __init__(self, settings: WebhookSettings, *, mapper: Mapper | None = None,
                 fetcher: Fetcher | None = None, by_id: bool = False) -> None:
        self.settings = settings
        self.mapper = mapper
        self.fetcher = fetcher
        self.by_id = by_id

    @classmethod
    def for_connector(cls, settings: WebhookSettings, connector: Any) -> WebhookReceiver:
        """The receiver of ``settings`` on a connector (a RestConnector: its field map
        maps records, it fetches by ``fetch`` or its by-id lookup step)."""
        can_fetch_by_id = getattr(connector, "can_fetch_by_id", None)
        return cls(settings, mapper=getattr(connector, "customer_from_record", None),
                   fetcher=getattr(connector, "fetch_by_id", None),
                   by_id=bool(can_fetch_by_id(settings.lookup)) if can_fetch_by_id else False)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def path(self) -> str:
        return self.settings.mount

    @property
    def max_bytes(self) -> int:
        return self.settings.max_bytes

    @property
    def replay_ttl_s(self) -> float:
        return 2 * self.settings.signature.tolerance_s + 1

    @property
    def can_fetch(self) -> bool:
        return self.fetcher is not None and (self.settings.fetch is not None or self.by_id)

    def answer(self) -> tuple[str, bytes] | None:
        if self.settings.signature.scheme == "salesforce":
            return "text/xml", SALESFORCE_ACK.encode()
        return None

    async def fetch(self, customer_id: str) -> Fetched | None:
        if not self.can_fetch:
            return None
        assert self.fetcher is not None
        return await self.fetcher(self.settings.fetch, customer_id, self.settings.lookup)

    async def receive(self, request: InboundRequest, now: float) -> WebhookMessage:
        """Verify (signature first when it covers the raw body), parse, decode."""
        sig = self.settings.signature
        nonce: str | None = None
        if sig.scheme == "hmac":
            nonce = _hmac(sig, request, now)
        elif sig.scheme == "stripe":
            nonce = _stripe(sig, request, now)
        elif sig.scheme == "hubspot_v3":
            nonce = _hubspot(sig, request, now)
        elif sig.scheme == "basic":
            _basic(sig, request)
        elif sig.scheme == "token" and not sig.body_path:
            _token(sig, request, None)
        doc = self._parse(request.body)
        if sig.scheme == "token" and sig.body_path:
            _token(sig, request, doc)
        if sig.scheme == "salesforce":
            self._salesforce(sig, request, doc)
        changes, ignored = await self._changes(doc)
        return WebhookMessage(changes, nonce if sig.timestamped else None, ignored)

    def _parse(self, body: bytes) -> Any:
        if self.settings.format == "xml":
            return xml_document(body)
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _refuse(400, "bad_json", f"body is not JSON: {exc}") from exc
        except RecursionError:
            raise _refuse(400, "bad_json", "body is nested too deeply") from None

    def _salesforce(self, sig: SignatureSettings, req: InboundRequest, doc: Any) -> None:
        org = get_path(doc, SALESFORCE_ORG)
        if not isinstance(org, str) or not _same(org, sig.organization_id):
            raise _refuse(401, "bad_signature", "OrganizationId is not the configured one")
        token = sig.token.get_secret_value()
        if token and not _same(req.query.get(sig.query or "token", ""), token):
            raise _refuse(401, "bad_signature", "webhook token missing or wrong")

    async def _changes(self, doc: Any) -> tuple[list[CustomerChange], int]:
        s = self.settings
        found = get_path(doc, s.events)
        if found is MISSING or found is None:
            raise _refuse(400, "bad_shape", f"{s.events or '(body)'}: missing")
        indexed = isinstance(found, list)
        events = found if indexed else [found]
        if len(events) > MAX_EVENTS:
            raise _refuse(400, "bad_shape", f"{len(events)} events, at most {MAX_EVENTS}")
        changes: list[CustomerChange] = []
        ignored = 0
        for i, event in enumerate(events):
            index = i if indexed else None
            kind = self._kind(event, index)
            if kind is None:
                ignored += 1
                continue
            name = get_path(event, s.type) if s.type is not None else kind
            changes += await self._event(event, kind, index, str(name))
        return changes, ignored

    def _kind(self, event: Any, index: int | None) -> Literal["updated", "deleted"] | None:
        s = self.settings
        if s.type is None:
            return "updated"
        name = get_path(event, s.type)
        if name is MISSING or name is None:
            raise _refuse(400, "bad_shape", f"{_where(s.events, index, s.type)}: missing")
        if str(name) in s.deleted:
            return "deleted"
        if str(name) in s.updated:
            return "updated"
        if s.unknown_events == "refuse":
            raise _refuse(400, "bad_shape", f"{_where(s.events, index, s.type)}: unknown event "
                                            f"{str(name)[:40]!r}")
        return None

    async def _event(self, event: Any, kind: Literal["updated", "deleted"],
                     index: int | None, name: str) -> list[CustomerChange]:
        s = self.settings
        where = _where(s.events, index, s.customer_id)
        raw = get_path(event, s.customer_id)
        if raw is MISSING or raw is None or raw == "" or raw == []:
            raise _refuse(400, "bad_shape", f"{where}: missing")
        ids = raw if isinstance(raw, list) else [raw]
        for value in ids:
            if isinstance(value, bool) or not isinstance(value, str | int) or not str(value):
                raise _refuse(400, "bad_shape", f"{where}: not an id ({type(value).__name__})")
        numbers = tuple(_numbers(event, s.numbers))
        customer = await self._record(event, index) \
            if kind == "updated" and len(ids) == 1 else None
        if customer is not None and customer.id != str(ids[0]):
            raise _refuse(400, "bad_shape", f"{where}: {ids[0]!r} differs from the record's "
                                            f"id {customer.id!r}")
        fetch = kind == "updated" and customer is None and self.can_fetch
        return [CustomerChange(kind, str(i), numbers, customer, fetch, name) for i in ids]

    async def _record(self, event: Any, index: int | None) -> Customer | None:
        s = self.settings
        if s.record is None:
            return None
        record = get_path(event, s.record)
        if record is MISSING or record is None:
            return None
        where = _where(s.events, index, s.record)
        if s.record_format == "customer":
            try:
                return Customer.model_validate(record)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise _refuse(400, "bad_shape", f"{where}.{loc}: {first['msg']}") from exc
        if self.mapper is None:
            return None
        try:
            return await self.mapper(record)
        except CrmMappingError as exc:
            raise _refuse(400, "bad_shape", f"{where}: {exc}") from exc


async def fetch_record(http: CrmHttp, spec: FetchSettings, customer_id: str,
                       mapper: Mapper, base: Mapping[str, Any] | None = None) -> Fetched | None:
    """GET (or POST) one record by id through the connector's client; None when the CRM
    answers one of ``not_found_status`` or nothing. ``base``: ``vars`` and ``secrets``."""
    url, params, headers = spec.render({**(base or {}), "id": customer_id})
    resp = await http.request(
        "webhook.fetch", spec.method, url, params=params, headers=headers or None,
        accept_status=spec.not_found_status,
    )
    if resp.status in spec.not_found_status or resp.body is None:
        return None
    record = get_path(resp.body, spec.result)
    if record is MISSING or record is None:
        return None
    if isinstance(record, list):
        if not record:
            return None
        record = record[0]
    return await mapper(record), _numbers(record, spec.numbers)


def _numbers(doc: Any, paths: list[str]) -> list[str]:
    """The numbers (text or digits) at ``paths`` in ``doc``, as written."""
    return [n for path in paths for n in stored_numbers(collect(doc, path))]


__all__ = [
    "FetchSettings",
    "SignatureSettings",
    "WebhookReceiver",
    "WebhookSettings",
    "callroute_webhook",
    "collect",
    "fetch_record",
    "sign",
    "xml_document",
]
