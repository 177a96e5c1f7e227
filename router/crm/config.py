"""Configuration of the generic REST CRM connector (the ``crm:`` section of the config file).

Everything needed to point callroute at an existing CRM's REST API is written here, in
YAML, without Python: where the API is, how to authenticate, how to look a caller up and
read the answer (dotted paths into the JSON), how to page through changed customers, and
how to post call activities, leads and follow-up tasks (JSON body templates).

Templates use ``{placeholder}``: ``{e164}``, ``{national}``, ``{digits}``, ``{country}``
in ``lookup``; ``{updated_since}`` and ``{cursor}`` in ``changed``;
``{record.<field>}``, ``{idempotency_key}`` and ``{now}`` in ``activity``/``lead``/``task``;
``{basename}``, ``{name}``, ``{path}`` in ``recordings.url``. A filter may follow a ``|``:
``{record.duration_s|ms}`` (see :data:`router.crm.mapping.FILTERS`). Values put into a
URL path are percent-encoded; a query parameter or header that renders empty (the
first page's ``{cursor}``) is left out, and a lone placeholder with no value is JSON
``null``. Secrets come from the environment: ``token: ${CRM_TOKEN}``.

See ``examples/crm-*.yaml`` for the sample CRM, HubSpot, Zoho and Salesforce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from router.crm.mapping import check_template, json_strings

_TIERS = ["platinum", "gold", "silver", "bronze"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthSettings(_Model):
    """How each request proves who we are.

    ``bearer``: ``Authorization: Bearer <token>``; ``api_key``: ``<header>: <key>`` (or a
    query parameter named ``header`` when ``location: query``); ``basic``: HTTP basic
    with ``username``/``password``; ``none``: nothing.
    """

    type: Literal["none", "bearer", "api_key", "basic"] = "none"
    token: SecretStr = SecretStr("")
    header: str = "X-API-Key"
    key: SecretStr = SecretStr("")
    location: Literal["header", "query"] = "header"
    username: str = ""
    password: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        needed = {"bearer": "token", "api_key": "key", "basic": "username"}.get(self.type)
        if needed and not getattr(self, needed):
            raise ValueError(f"auth type {self.type} needs crm.auth.{needed} (e.g. ${{CRM_TOKEN}})")
        if ":" in self.username:
            raise ValueError("crm.auth.username must not contain ':' (HTTP basic auth)")
        return self

    @property
    def secrets(self) -> list[str]:
        """The secret values (to mask wherever they could be printed)."""
        return [s.get_secret_value() for s in (self.token, self.key, self.password) if s]


class _Request(_Model):
    """One HTTP request, templated. ``url`` is absolute or a path after ``base_url``."""

    #: Placeholders allowed in this request's templates (besides ``record.*`` when allowed).
    VARIABLES: ClassVar[frozenset[str]] = frozenset()
    RECORD: ClassVar[bool] = False

    method: Literal["GET", "POST", "PUT", "PATCH"] = "GET"
    url: str
    params: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None

    @classmethod
    def _allowed(cls, name: str) -> bool:
        return name in cls.VARIABLES or (cls.RECORD and name.startswith("record."))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("/", "http://", "https://", "{")):
            raise ValueError("must be a path starting with / or an http(s):// URL")
        check_template(value, cls._allowed)
        return value

    @field_validator("params", "headers")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for text in value.values():
            check_template(text, cls._allowed)
        return value

    @field_validator("body")
    @classmethod
    def _body(cls, value: Any) -> Any:
        for text in json_strings(value):
            check_template(text, cls._allowed)
        return value


class FieldMap(_Model):
    """Where each customer attribute is in one CRM record (dotted paths; None = absent)."""

    id: str = "id"
    name: str | None = "name"
    tier: str | None = None
    value: str | None = None
    owner: str | None = None
    tags: str | None = None
    open_tickets: str | None = None
    language: str | None = None
    updated_at: str | None = None


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


class LookupSettings(_Request):
    """Find customers by the caller's number.

    ``results`` is the dotted path to the list (or single object) of records in the
    answer (``""``: the whole body). A status in ``not_found_status`` (404 by default),
    204, or an empty/null result means an unknown caller.
    """

    VARIABLES: ClassVar[frozenset[str]] = frozenset({"e164", "national", "digits", "country"})

    url: str = "/api/customers"
    params: dict[str, str] = Field(default_factory=lambda: {"phone": "{e164}"})
    results: str = "results"
    fields: FieldMap = Field(default_factory=FieldMap)
    tier_map: dict[str, str] = Field(
        default_factory=dict, description="CRM tier value → our tier name (case-insensitive)"
    )
    multiple: MultipleSettings = Field(default_factory=MultipleSettings)
    not_found_status: list[int] = Field(default_factory=lambda: [404])


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


class ChangedSettings(_Request):
    """Page through customers changed since a time (pre-warming the cache with ``sync``)."""

    VARIABLES: ClassVar[frozenset[str]] = frozenset({"updated_since", "cursor"})

    url: str = "/api/customers/changed"
    params: dict[str, str] = Field(
        default_factory=lambda: {"updated_since": "{updated_since}", "cursor": "{cursor}"}
    )
    results: str = "results"
    numbers: list[str] = Field(
        default_factory=lambda: ["phones"], min_length=1,
        description="dotted paths, per record, to a number or a list of numbers",
    )
    fields: FieldMap | None = Field(None, description="None: the lookup's field mapping")
    cursor: CursorSettings = Field(default_factory=CursorSettings)
    page_size: int | None = Field(None, ge=1)
    initial_since: str = "1970-01-01T00:00:00Z"


class PostSettings(_Request):
    """Create one object in the CRM (call activity, lead or task).

    The body is ``body`` (a JSON template), or built from ``fields`` (target dotted path →
    template), or the record itself when neither is given. ``idempotency_header`` carries
    the record's idempotency key on every attempt; ``id_path`` is where the created
    object's id is in the answer; a status in ``duplicate_status`` means "already seen".
    """

    VARIABLES: ClassVar[frozenset[str]] = frozenset({"idempotency_key", "now"})
    RECORD: ClassVar[bool] = True

    method: Literal["GET", "POST", "PUT", "PATCH"] = "POST"
    fields: dict[str, str] | None = None
    idempotency_header: str | None = "Idempotency-Key"
    id_path: str | None = "id"
    duplicate_status: list[int] = Field(default_factory=list)

    @field_validator("fields")
    @classmethod
    def _field_templates(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for text in (value or {}).values():
            check_template(text, cls._allowed)
        return value

    @model_validator(mode="after")
    def _one_body(self) -> PostSettings:
        if self.body is not None and self.fields is not None:
            raise ValueError("give either body or fields, not both")
        return self


class RecordingSettings(_Model):
    """How a call's recording reaches the CRM (as ``{record.recording_url}``).

    ``url``: ``url`` is a template of the public link, e.g.
    ``https://pbx.example.com/recordings/{basename}``; ``upload``: the file is POSTed as
    multipart ``file_field`` to ``url`` and the link is read at ``result_path``. The file's
    path is taken from the record's ``path_field``. With ``delete_after_upload`` the local
    file is deleted once the CRM has confirmed the call activity that links the uploaded
    copy (never before: a retried activity would have nothing to upload).
    """

    VARIABLES: ClassVar[frozenset[str]] = frozenset({"basename", "name", "path"})

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
        check_template(value, lambda name: name in cls.VARIABLES)
        return value


class CrmSettings(_Model):
    """How to reach the CRM and map its answers (the ``crm:`` section)."""

    name: str = "crm"
    base_url: str = "http://127.0.0.1:8088"
    headers: dict[str, str] = Field(default_factory=dict)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    verify_tls: bool = True
    ca_file: Path | None = Field(None, description="extra CA bundle (PEM) to trust")
    timeout_s: float = Field(2.0, gt=0, le=120)
    max_connections: int = Field(64, ge=1)
    max_response_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    lookup: LookupSettings = Field(default_factory=LookupSettings)
    changed: ChangedSettings | None = None
    activity: PostSettings | None = None
    lead: PostSettings | None = None
    task: PostSettings | None = None
    recordings: RecordingSettings | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @classmethod
    def sample(cls, base_url: str = "http://127.0.0.1:8088", **extra: Any) -> CrmSettings:
        """Settings for the bundled sample CRM (``router.samplecrm``), every feature on."""
        return cls.model_validate({**sample_crm_section(base_url), **extra})


def sample_crm_section(base_url: str = "http://127.0.0.1:8088") -> dict[str, Any]:
    """The ``crm:`` section (as data) that points the connector at the sample CRM."""
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
