"""Configuration of the generic REST CRM connector (the ``crm:`` section of the config file).

Everything needed to point callroute at a CRM's API is written here, in YAML: where
the API is and how to authenticate; **lookups** (an ordered list, each a chain of
requests: search, then fetch each record found, ...) and how an answer maps to a
customer; how to page through changed customers (``changed``, for ``callroute sync``);
and the **records** pipeline: the requests that put a finished call into the CRM, in
order, each with a condition (``when``) and outputs later steps can use. ``preset:``
starts from a profile shipped with callroute (``router/crm/presets/*.yaml``) and the
rest of the section overrides it.

Templates are ``{expression}`` in text, compiled when the config is loaded (see
:mod:`router.crm.template` and ``docs/crm/templates.md``). Each place offers its own
names, listed on its model below (``NAMES``); a name, filter or test that is not
offered there fails ``callroute check`` with the field named. Secrets come from the
environment (``token: ${CRM_TOKEN}``) or a file (``token_file: /run/secrets/crm``); values
in ``secrets:`` (``SecretStr``, each also readable from ``<name>_file``) are usable in
templates (``{secrets.api_key}``) and are masked wherever callroute prints a request.

The one-request form of older configs (``lookup:`` and ``activity``/``lead``/``task``)
is still accepted and read as a one-lookup list and a three-step pipeline.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router.crm.auth import AuthSettings
from router.crm.limits import RateLimitSettings
from router.crm.template import check_expression, check_json, check_text, json_strings
from router.crm.webhooks import WebhookSettings
from router.models import ZoneName

_TIERS = ["platinum", "gold", "silver", "bronze"]
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

#: Names every template may use: configured constants, secrets, and ``omit`` (drops a key).
COMMON = frozenset({"vars", "secrets", "omit"})
#: The caller's number in every form (lookup templates).
NUMBER = frozenset({"e164", "national", "digits", "local", "national_format", "international",
                    "country", "last"})
#: Customer fields a record step's ``customer:`` may set.
CUSTOMER_FIELDS = ("id", "kind", "owner", "name", "tier")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_map(value: dict[str, str], names: frozenset[str]) -> None:
    for key, text in value.items():
        try:
            check_text(text, names)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None


def _check_fields_or_paths(value: dict[str, str | None], names: frozenset[str]) -> None:
    for key, text in value.items():
        if text is None or "{" not in text:
            continue
        try:
            check_text(text, names)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None


class RequestSpec(_Model):
    """One HTTP request, templated. ``url`` is absolute or a path after ``base_url``.

    Values put into a URL are percent-encoded (unless the URL is one lone expression);
    a query parameter or header that renders empty is left out; in ``body`` a string
    that is one ``{expression}`` keeps its JSON type. ``error``: a template over the
    answer (``response``, ``status``); when it renders non-empty the answer is a
    failure with that text (CRMs that say "error" with HTTP 200, like JSON-RPC).
    """

    #: Names the request's templates may use (besides :data:`COMMON`).
    NAMES: ClassVar[frozenset[str]] = frozenset()
    ERROR_NAMES: ClassVar[frozenset[str]] = COMMON | {"response", "status"}

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str
    params: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    error: str | None = None

    @classmethod
    def names(cls) -> frozenset[str]:
        """Every name this request's templates may use."""
        return cls.NAMES | COMMON

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("/", "http://", "https://", "{")):
            raise ValueError("must be a path starting with / or an http(s):// URL")
        check_text(value, cls.names())
        return value

    @field_validator("params", "headers")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        _check_map(value, cls.names())
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: Any) -> Any:
        check_json(value, cls.names())
        return value

    @field_validator("error")
    @classmethod
    def _error(cls, value: str | None) -> str | None:
        if value is not None:
            check_text(value, cls.ERROR_NAMES)
        return value


class FieldMap(_Model):
    """Where each customer attribute is in the record a lookup found.

    A value without ``{`` is a dotted path into the record (``properties.firstname``,
    ``data.0.owner.id``); a value with ``{expression}`` is a template where the record is
    ``record``, earlier steps' records are ``steps.<name>``, and the caller's number
    forms are offered (``"{record.first_name} {record.last_name}"``). None: absent.
    ``kind`` defaults to the lookup's ``kind``.
    """

    NAMES: ClassVar[frozenset[str]] = COMMON | NUMBER | {"record", "steps", "kind"}

    id: str = "id"
    name: str | None = "name"
    tier: str | None = None
    value: str | None = None
    owner: str | None = None
    tags: str | None = None
    open_tickets: str | None = None
    language: str | None = None
    updated_at: str | None = None
    kind: str | None = None

    @model_validator(mode="after")
    def _templates(self) -> FieldMap:
        _check_fields_or_paths(self.model_dump(), self.NAMES)
        return self


class MultipleSettings(_Model):
    """How to pick one customer when several records match a number.

    ``highest_tier`` (by ``tier_order``, best first), ``most_recent`` (``updated_at``),
    ``highest_value``, or ``first`` (the CRM's order). Ties go to the CRM's order.
    """

    rule: Literal["highest_tier", "most_recent", "highest_value", "first"] = "highest_tier"
    tier_order: list[str] = Field(default_factory=lambda: list(_TIERS))

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"rule": value} if isinstance(value, str) else value


class LookupStep(RequestSpec):
    """One request of a lookup.

    The first step searches with the caller's number (``{e164}``, ``{national}``,
    ``{digits}``, ``{local}``, ``{national_format}``, ``{international}``, ``{country}``,
    ``{last:N}``). Each later step runs once per record the previous step kept
    (``max_candidates`` at a time, in parallel), with that record as ``item``
    (``/contacts/{item.id}``) and every earlier step's record of the same candidate as
    ``steps.<name>``. A candidate a later step drops (no record, not the caller's
    numbers, its request refused for good, its record does not fit the field map) is
    replaced by the next record of the search; a request of its that may succeed later
    (timeout, 5xx, rate limit) fails the lookup.

    ``results``: dotted path to the records in the answer (a list, or one object); default
    ``results`` for the first step and the whole answer for later ones. A status in
    ``not_found_status``, 204 or an empty result means nothing found (a later step: the
    candidate is dropped). ``numbers``: paths (or templates over ``record``) of the
    numbers stored on each record; when given, only records with a number that
    normalises (phonenumbers) to the caller's are kept.
    """

    NAMES: ClassVar[frozenset[str]] = NUMBER | {"item", "steps"}
    NUMBER_NAMES: ClassVar[frozenset[str]] = COMMON | NUMBER | {"record", "steps"}

    name: str | None = None
    results: str | None = None
    not_found_status: list[int] = Field(default_factory=lambda: [404])
    numbers: list[str] = Field(default_factory=list)

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: list[str]) -> list[str]:
        _check_fields_or_paths({str(i): v for i, v in enumerate(value)}, cls.NUMBER_NAMES)
        return value


_REQUEST_KEYS = frozenset({"method", "url", "params", "headers", "body", "error", "results",
                           "not_found_status", "numbers"})


class LookupSpec(_Model):
    """One way to find a caller: steps, then a field map. ``kind`` names the CRM object
    (contact, lead, ...) and becomes ``customer.kind``. The request keys of a one-step
    lookup may be written at the top instead of under ``steps``.
    """

    name: str = "lookup"
    kind: str | None = None
    enabled: bool = True
    steps: list[LookupStep] = Field(min_length=1)
    fields: FieldMap = Field(default_factory=FieldMap)
    tier_map: dict[str, str] = Field(
        default_factory=dict, description="CRM tier value → our tier name (case-insensitive)"
    )
    multiple: MultipleSettings = Field(default_factory=MultipleSettings)
    max_candidates: int = Field(
        5, ge=1, le=50, description="candidates the later steps keep, at most; one they drop "
        "is replaced by the next record (4 x max_candidates tried at most)")

    @model_validator(mode="before")
    @classmethod
    def _one_step(cls, value: Any) -> Any:
        if isinstance(value, dict) and "steps" not in value:
            inline = {k: v for k, v in value.items() if k in _REQUEST_KEYS}
            rest = {k: v for k, v in value.items() if k not in _REQUEST_KEYS}
            return {**rest, "steps": [{"url": "/api/customers", "params": {"phone": "{e164}"},
                                       **inline}]}
        return value

    @model_validator(mode="after")
    def _step_names(self) -> LookupSpec:
        for index, step in enumerate(self.steps):
            if step.name is None:
                step.name = "search" if index == 0 else f"step{index + 1}"
            if not _NAME.match(step.name):
                raise ValueError(f"steps[{index}].name {step.name!r}: use a-z, 0-9 and _")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        return self


class CursorSettings(_Model):
    """How the next page of changed customers is found.

    ``path``: the answer has the CRM's next cursor at ``path`` (null/absent: last page);
    ``next_url``: the answer has the next page's URL at ``path`` (Salesforce
    ``nextRecordsUrl``); ``updated_at``: the next ``{updated_since}`` is the newest
    ``updated_at`` of the page (last page when the page has fewer than ``page_size``).
    """

    type: Literal["path", "next_url", "updated_at"] = "path"
    path: str | None = "next_cursor"

    @model_validator(mode="after")
    def _needs_path(self) -> CursorSettings:
        if self.type != "updated_at" and not self.path:
            raise ValueError(f"cursor type {self.type} needs crm.changed.cursor.path")
        return self


class ChangedSettings(RequestSpec):
    """Page through customers changed since a time (pre-warming the cache with ``sync``).

    Templates: ``{updated_since}`` (ISO 8601), ``{cursor}`` (empty on the first page).
    """

    NAMES: ClassVar[frozenset[str]] = frozenset({"updated_since", "cursor"})
    NUMBER_NAMES: ClassVar[frozenset[str]] = COMMON | {"record"}

    url: str = "/api/customers/changed"
    params: dict[str, str] = Field(
        default_factory=lambda: {"updated_since": "{updated_since}", "cursor": "{cursor}"}
    )
    results: str = "results"
    not_found_status: list[int] = Field(
        default_factory=list, description="statuses that mean nothing changed (Zoho: 304)")
    numbers: list[str] = Field(
        default_factory=lambda: ["phones"], min_length=1,
        description="paths (or templates over record), per record, to a number or a list",
    )
    fields: FieldMap | None = Field(None, description="None: the first lookup's field mapping")
    kind: str | None = None
    cursor: CursorSettings = Field(default_factory=CursorSettings)
    page_size: int | None = Field(None, ge=1)
    initial_since: str = "1970-01-01T00:00:00Z"

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: list[str]) -> list[str]:
        _check_fields_or_paths({str(i): v for i, v in enumerate(value)}, cls.NUMBER_NAMES)
        return value


#: Names of record-step templates.
RECORD_NAMES = frozenset({"record", "customer", "steps", "idempotency_key", "now", "plan",
                          "step"})
#: Names of templates evaluated on a step's answer (``outputs``, ``customer``).
ANSWER_NAMES = COMMON | RECORD_NAMES | {"response", "id", "status"}


class FetchSpec(RequestSpec):
    """How to read an object a step created back by its id (``{id}``): the doctor shows it."""

    NAMES: ClassVar[frozenset[str]] = RECORD_NAMES | {"id"}


class MatchSpec(_Model):
    """How an object a search found proves it is this step's: the text at ``path``
    equals (or contains) the rendered template (a broad search is never trusted). The
    step's body must write that text: its idempotency key, or a natural key such as the
    caller's number the step stores on a new contact."""

    path: str = Field(min_length=1)
    equals: str | None = None
    contains: str | None = None

    @model_validator(mode="after")
    def _one(self) -> MatchSpec:
        if (self.equals is None) == (self.contains is None):
            raise ValueError("give exactly one of equals or contains")
        check_text(self.equals or self.contains or "", COMMON | RECORD_NAMES)
        return self


class FindSpec(RequestSpec):
    """Find the object an earlier send of the step created, by the key the step writes
    into it (an external-id field, a tag, a marker in the description): asked after an
    answer was lost, instead of creating the object again (docs/crm/exactly-once.md).

    ``results`` is the dotted path to the objects in the answer; ``match`` checks each;
    the first match's ``id_path`` is the id, and the step's ``outputs`` and ``customer``
    are read from that object (as ``response``). ``settle_s``: a "not found" sooner than
    this after the lost send is not believed (search indexes that lag). A status in
    ``not_found_status`` means nothing found. Templates see what the step's see.
    """

    NAMES: ClassVar[frozenset[str]] = RECORD_NAMES

    results: str = "results"
    match: MatchSpec | None = None
    id_path: str = "id"
    settle_s: float = Field(0.0, ge=0, le=3600)
    not_found_status: list[int] = Field(default_factory=lambda: [404])


class UpdateSpec(RequestSpec):
    """How to change the object a step created, by its id (``{id}``), after the record
    was delivered: the agent's disposition given after the wrap-up time updates the call's
    activity (``PATCH /crm/v3/objects/calls/{id}``). Templates see what the step's do,
    the record carrying the changes (``record.disposition``, ``record.disposition_note``)
    and ``id``; ``steps`` is empty. Without ``body`` the record itself is sent."""

    NAMES: ClassVar[frozenset[str]] = RECORD_NAMES | {"id"}

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "PATCH"


class RecordStep(RequestSpec):
    """One request of the records pipeline (create a lead, post the call, add a task...).

    Steps run in order for every finished call. ``when`` is an expression over the
    record (``customer.id is empty``, ``record.outcome in ['missed', 'abandoned']``,
    ``'task' in plan``); a step whose ``when`` is false is skipped, not failed.

    Templates see ``record`` (the call record, ami/records.py), ``customer`` (``id``,
    ``kind``, ``owner``, ``name``, ``tier``: from the record, as changed by earlier steps),
    ``steps.<name>`` (``id``, ``status``, and the ``outputs`` of each earlier step),
    ``idempotency_key``, ``now`` (ISO 8601 UTC), ``plan`` (which of call, lead, task the
    ``outbox`` settings want for this record) and ``step`` (this step's name).

    The body is ``body`` (a JSON template), or built from ``fields`` (target dotted path
    → template). ``id_path`` is where the created object's id is in the answer; a status
    in ``duplicate_status`` means "already there" (still a success). After the step,
    ``outputs`` (templates over ``response``, ``id``, ``status``) are kept as
    ``steps.<name>.<output>``, and ``customer`` sets fields of ``customer`` for later
    steps (``customer: {id: "{id}", kind: lead}`` after creating a lead).
    ``idempotency_header`` sends the step's idempotency key in that header. ``find``
    looks the object up by that key after a lost answer (exactly once without the CRM's
    idempotency support). ``update`` is how to change the created object later
    (:class:`UpdateSpec`).
    """

    NAMES: ClassVar[frozenset[str]] = RECORD_NAMES

    name: str
    enabled: bool = True
    when: str | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    fields: dict[str, str] | None = None
    idempotency_header: str | None = None
    id_path: str | None = "id"
    duplicate_status: list[int] = Field(default_factory=list)
    outputs: dict[str, str] = Field(default_factory=dict)
    customer: dict[str, str] = Field(default_factory=dict)
    fetch: FetchSpec | None = None
    find: FindSpec | None = Field(
        None, description="after a lost answer, find the object by the key written into it "
        "instead of creating it again (docs/crm/exactly-once.md)")
    lost_answer: Literal["hold", "repost"] | None = Field(
        None, description="without find, after a lost answer: hold the record for a person "
        "(default without an idempotency_header) or post again (default with one)")
    update: UpdateSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r}: use a-z, 0-9 and _ (it is used as steps.{value})")
        return value

    @field_validator("when")
    @classmethod
    def _when(cls, value: str | None) -> str | None:
        if value is not None:
            check_expression(_strip_braces(value), COMMON | RECORD_NAMES, repr(value))
        return value

    @field_validator("fields")
    @classmethod
    def _field_templates(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            try:
                check_json(text, cls.names())
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _NAME.match(key) or key in ("id", "status"):
                raise ValueError(f"output name {key!r}: use a-z, 0-9 and _ (not id or status)")
        _check_map(value, ANSWER_NAMES)
        return value

    @field_validator("customer")
    @classmethod
    def _customer(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(CUSTOMER_FIELDS))
        if unknown:
            raise ValueError(f"unknown customer field {unknown[0]!r} "
                             f"(known: {', '.join(CUSTOMER_FIELDS)})")
        _check_map(value, ANSWER_NAMES)
        return value

    @model_validator(mode="after")
    def _one_body(self) -> RecordStep:
        if self.body is not None and self.fields is not None:
            raise ValueError("give either body or fields, not both")
        if self.find is not None and not self._writes_key():
            raise ValueError("find looks the object up by its key, but the body never "
                             "writes {idempotency_key} (or {record.record_key}, or the text "
                             "find.match checks) into it (an external-id field, a tag or a "
                             "marker in the description)")
        return self

    def _writes_key(self) -> bool:
        texts = json_strings(self.body) + list((self.fields or {}).values())
        if self.body is None and self.fields is None:
            return True  # the record itself is posted: its record_key is the key
        match = self.find.match if self.find is not None else None
        checked = (match.equals or match.contains or "") if match is not None else ""
        return any("idempotency_key" in t or "record.record_key" in t
                   or (checked and checked in t) for t in texts)


def _strip_braces(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}") and not stripped.startswith("{{"):
        return stripped[1:-1]
    return stripped


class RefSpec(RequestSpec):
    """A reference table read through a second call, cached (tag ids → names, owner id →
    extension), used in templates as ``{value | ref('name')}``.

    One request per key when ``key`` is not given: the request uses ``{key}``
    (``/owners/{key}``) and ``value`` is a path (or template over ``response``) into
    its answer. One request for the whole table when ``key`` is given: ``results`` is
    the list in the answer, ``key`` the path of each item's key and ``value`` the path
    (or template over ``item``) of its value. Entries live ``ttl_s`` seconds; a key the
    CRM does not know is remembered as none for as long.
    """

    NAMES: ClassVar[frozenset[str]] = frozenset({"key"})
    VALUE_NAMES: ClassVar[frozenset[str]] = COMMON | {"response", "item", "key"}

    results: str = ""
    key: str | None = None
    value: str
    ttl_s: float = Field(3600.0, gt=0)
    not_found_status: list[int] = Field(default_factory=lambda: [404])
    max_entries: int = Field(10_000, ge=1)

    @field_validator("value")
    @classmethod
    def _value(cls, value: str) -> str:
        _check_fields_or_paths({"value": value}, cls.VALUE_NAMES)
        return value


class RecordingSettings(_Model):
    """How a call's recording reaches the CRM (as ``{record.recording_url}``).

    ``url``: ``url`` is a template of the public link, e.g.
    ``https://pbx.example.com/recordings/{basename}``; ``upload``: the file is POSTed as
    multipart ``file_field`` to ``url`` and the link is read at ``result_path``. The file's
    path is taken from the record's ``path_field``. With ``delete_after_upload`` the local
    file is deleted once the CRM has confirmed the call activity that links the uploaded
    copy (never before: a retried activity would have nothing to upload).
    """

    NAMES: ClassVar[frozenset[str]] = frozenset({"basename", "name", "path"})

    mode: Literal["url", "upload"] = "url"
    url: str
    path_field: str = "recording"
    file_field: str = "file"
    result_path: str = "url"
    max_bytes: int = Field(200 * 1024 * 1024, ge=1)
    delete_after_upload: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        check_text(value, cls.NAMES)
        return value


#: Where ``callroute sample-crm`` and ``callroute demo`` serve the sample CRM by default:
#: the default ``crm.base_url`` (examples/config.yaml and the README say the same).
SAMPLE_CRM_PORT = 8088
SAMPLE_CRM_URL = f"http://127.0.0.1:{SAMPLE_CRM_PORT}"

_LEGACY_POSTS = (("activity", "call", None), ("lead", "lead", "'lead' in plan"),
                 ("task", "task", "'task' in plan"))


class CrmSettings(_Model):
    """How to reach the CRM and map its answers (the ``crm:`` section)."""

    preset: str | None = Field(None, description="start from router/crm/presets/<name>.yaml")
    name: str = "crm"
    base_url: str = SAMPLE_CRM_URL
    headers: dict[str, str] = Field(default_factory=dict)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    verify_tls: bool = True
    ca_file: Path | None = Field(None, description="extra CA bundle (PEM) to trust")
    timeout_s: float = Field(2.0, gt=0, le=120)
    max_connections: int = Field(64, ge=1)
    max_response_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    limits: RateLimitSettings = Field(default_factory=RateLimitSettings)
    timezone: ZoneName = Field("UTC", description="the CRM's time zone, for date filters")
    vars: dict[str, Any] = Field(default_factory=dict, description="constants: {vars.x}")
    secrets: dict[str, SecretStr] = Field(
        default_factory=dict, description="secret values ({secrets.x}), masked when printed; "
        "each may instead be given as <name>_file: PATH")
    maps: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="value maps for the translate filter")
    refs: dict[str, RefSpec] = Field(default_factory=dict)
    lookups: list[LookupSpec] = Field(
        default_factory=lambda: [LookupSpec.model_validate({})], min_length=1)
    changed: ChangedSettings | None = None
    records: list[RecordStep] = Field(default_factory=list)
    recordings: RecordingSettings | None = None
    webhooks: list[WebhookSettings] = Field(
        default_factory=list, description="change webhooks the CRM sends (router.crm.webhooks)")

    @field_validator("webhooks")
    @classmethod
    def _one_per_path(cls, value: list[WebhookSettings]) -> list[WebhookSettings]:
        names = [w.name for w in value]
        paths = [w.mount for w in value if w.enabled]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two webhooks called {name}")
        for path in paths:
            if paths.count(path) > 1 or path == "/webhooks/crm":
                raise ValueError(f"two webhooks at {path} (/webhooks/crm is callroute's own)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _preset_and_legacy(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        data = dict(value)
        if data.get("preset"):
            from router.crm.presets import apply_preset

            data = apply_preset(str(data["preset"]), data)
        return _legacy(data)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _whole(self) -> CrmSettings:
        for what, names in (("lookups", [x.name for x in self.lookups]),
                            ("records", [x.name for x in self.records])):
            if len(set(names)) != len(names):
                raise ValueError(f"crm.{what}: names must be unique: {names}")
        if not any(x.enabled for x in self.lookups):
            raise ValueError("crm.lookups: every lookup is disabled")
        from router.crm.compiled import build_plan

        plan = build_plan(self)  # compiles every template; ValueError names the field
        for index, hook in enumerate(self.webhooks):
            if hook.enabled and hook.fetch is None and hook.lookup is not None and not any(
                    x.name == hook.lookup and x.by_id is not None for x in plan.lookups):
                raise ValueError(f"crm.webhooks[{index}] ({hook.name}).lookup: no enabled "
                                 f"lookup {hook.lookup!r} with a step that reads a record "
                                 "by its id (give fetch: instead)")
        return self

    @property
    def enabled_webhooks(self) -> list[WebhookSettings]:
        """The webhooks to mount."""
        return [w for w in self.webhooks if w.enabled]

    @property
    def lookup(self) -> LookupSpec:
        """The first lookup (what one-lookup configs call ``lookup``)."""
        return self.lookups[0]

    @property
    def all_secrets(self) -> list[str]:
        """Every secret value of this section (auth and ``secrets``), to mask."""
        return [*self.auth.secrets,
                *(v for s in self.secrets.values() if (v := s.get_secret_value()))]

    def secret_values(self) -> dict[str, str]:
        """``secrets`` in clear, as templates see them (``{secrets.api_key}``)."""
        return {name: value.get_secret_value() for name, value in self.secrets.items()}

    def record_step(self, name: str) -> RecordStep | None:
        """The enabled record step called ``name``, if any."""
        return next((s for s in self.records if s.name == name and s.enabled), None)

    @classmethod
    def sample(cls, base_url: str = SAMPLE_CRM_URL, **extra: Any) -> CrmSettings:
        """Settings for the bundled sample CRM (``router.samplecrm``), every feature on."""
        return cls.model_validate({**sample_crm_section(base_url), **extra})


def _legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Read the one-request form: ``lookup:`` and ``activity``/``lead``/``task``."""
    if "lookup" in data:
        if "lookups" in data:
            raise ValueError("give crm.lookup or crm.lookups, not both")
        lookup = data.pop("lookup")
        data["lookups"] = [lookup if lookup is not None else {}]
    elif "lookups" not in data:
        data["lookups"] = [{}]
    legacy = [(key, name, when) for key, name, when in _LEGACY_POSTS if key in data]
    if legacy:
        if "records" in data:
            raise ValueError("give crm.records or crm.activity/lead/task, not both")
        records = []
        for key, name, when in legacy:
            spec = data.pop(key)
            if spec is None:
                continue
            if not isinstance(spec, dict):
                raise ValueError(f"crm.{key} must be a mapping")
            step = {"idempotency_header": "Idempotency-Key", **spec, "name": name}
            if when is not None:
                step["when"] = when
            records.append(step)
        data["records"] = records
    return data


def sample_crm_section(base_url: str = SAMPLE_CRM_URL) -> dict[str, Any]:
    """The ``crm:`` section (as data) that points the connector at the sample CRM.

    Written in the one-request form of older configs (``lookup``, ``activity``, ``lead``,
    ``task``), which is still read; ``examples/config.yaml`` shows the steps form.
    """
    # Placeholders name fields of the call record (ami.records.CallRecord).
    record_body = {
        "call_id": "{record.linkedid}",
        "record_key": "{record.record_key}",
        "customer_id": "{record.customer_id}",
        "caller": "{record.caller}",
        "caller_name": "{record.caller_name}",
        "did": "{record.did}",
        "direction": "inbound",
        "outcome": "{record.outcome}",
        "queue": "{record.queue}",
        "agent": "{record.answered_by_agent}",
        "started_at": "{record.start}",
        "answered_at": "{record.answer}",
        "ended_at": "{record.end}",
        "wait_s": "{record.wait_s}",
        "talk_s": "{record.talk_s}",
        "recording_url": "{record.recording_url}",
        "incomplete": "{record.incomplete}",
    }
    return {
        "name": "sample",
        "base_url": base_url,
        "auth": {"type": "bearer", "token": "demo-token"},
        "timeout_s": 2.0,
        "lookup": {
            "url": "/api/customers",
            "params": {"phone": "{e164}"},
            "results": "results",
            "fields": {
                "id": "id", "name": "name", "tier": "tier", "value": "value",
                "owner": "owner.id", "tags": "tags", "open_tickets": "open_tickets",
                "language": "language", "updated_at": "updated_at",
            },
            "multiple": {"rule": "highest_tier", "tier_order": list(_TIERS)},
        },
        "changed": {
            "url": "/api/customers/changed",
            "params": {"updated_since": "{updated_since}", "cursor": "{cursor}", "limit": "100"},
            "results": "results",
            "numbers": ["phones"],
            "cursor": {"type": "path", "path": "next_cursor"},
        },
        "activity": {
            "url": "/api/activities", "body": record_body,
            "idempotency_header": "Idempotency-Key", "id_path": "id", "duplicate_status": [200],
            "update": {"url": "/api/activities/{id}",
                       "body": {"disposition": "{record.disposition}",
                                "note": "{record.disposition_note}"}},
        },
        "lead": {
            "url": "/api/leads",
            "body": {
                "phone": "{record.caller}", "name": "{record.caller_name}",
                "source": "inbound call", "did": "{record.did}", "call_id": "{record.linkedid}",
            },
            "idempotency_header": "Idempotency-Key", "id_path": "id", "duplicate_status": [200],
        },
        "task": {
            "url": "/api/tasks",
            "body": {
                "customer_id": "{record.customer_id}",
                "subject": "Call back {record.caller} ({record.outcome} call)",
                "due_at": "{now}", "call_id": "{record.linkedid}",
            },
            "idempotency_header": "Idempotency-Key", "id_path": "id", "duplicate_status": [200],
        },
        "recordings": {
            "mode": "url", "url": base_url.rstrip("/") + "/recordings/{basename}",
        },
    }
