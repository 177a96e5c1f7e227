"""The ``crm:`` section compiled: what the connector runs, built once per configuration.

:func:`build_plan` turns :class:`~router.crm.config.CrmSettings` into a :class:`Plan`:
every template compiled (:mod:`router.crm.template`), field maps split into plain
paths and one compiled expression, value maps and time zone resolved. It is pure (no
I/O) and raises ValueError naming the field of the first mistake, so ``callroute
check`` catches template errors. :func:`map_customer` and :func:`choose` turn mapped
values into a :class:`~router.models.Customer` and pick one of several.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from router.crm.filters import Runtime
from router.crm.mapping import MISSING, get_path, parse_datetime, set_path
from router.crm.numbers import stored_numbers
from router.crm.redact import summarize_body
from router.crm.template import (
    OMIT,
    Compiled,
    Uses,
    compile_expression,
    compile_request,
    compile_text,
    compile_tuple,
    is_template,
    json_strings,
    paths_under,
)
from router.errors import CrmClientError, CrmMappingError
from router.metrics import CRM_ERRORS
from router.models import Customer

if TYPE_CHECKING:
    from router.crm.config import (
        ChangedSettings,
        CrmSettings,
        FieldMap,
        FindSpec,
        LookupSpec,
        LookupStep,
        MultipleSettings,
        RecordStep,
        RefSpec,
        RequestSpec,
    )

#: Customer attributes of a field map, in :class:`Customer` order.
FIELDS = ("id", "name", "tier", "value", "owner", "tags", "open_tickets", "language",
          "updated_at", "kind")


#: A rendered request: method, URL, query parameters, headers, JSON body.
Rendered = tuple[str, str, dict[str, str], dict[str, str], Any]


@dataclass(frozen=True)
class Request:
    """A compiled request: ``render(context)`` gives ``(method, url, params, headers, body)``;
    ``error`` (optional) renders non-empty text for an answer that is a failure."""

    method: str
    template: Compiled
    error: Compiled | None = None

    @property
    def uses(self) -> Uses:
        """Names, refs and maps the request refers to."""
        return self.template.uses | (self.error.uses if self.error else Uses())

    def render(self, context: Mapping[str, Any]) -> Rendered:
        """The request for ``context``: empty params and headers are left out."""
        return self.finish(self.template(context))

    def finish(self, value: Any) -> Rendered:
        """The request from its template's value (``render`` without the evaluation)."""
        url, params, headers, body = value
        params = {k: v for k, v in params.items() if v != ""}
        headers = {k: v for k, v in headers.items() if v != ""}
        return self.method, url, params, headers, body

    def check(self, answer: Any, status: int, context: Mapping[str, Any], where: str,
              op: str, secrets: Collection[str] = ()) -> None:
        """Raise :class:`CrmClientError` when the ``error`` template calls the answer a
        failure (renders non-empty text); the text is kept as the error's detail,
        masked as an error body is (:func:`~router.crm.redact.summarize_body`)."""
        if self.error is None:
            return
        text = self.error({**context, "response": answer, "status": status})
        if text:
            CRM_ERRORS.labels(op, CrmClientError.kind).inc()
            raise CrmClientError(f"{where}: the CRM answered an error", status=status,
                                 detail=summarize_body(str(text), secrets))


def compile_request_spec(spec: RequestSpec, names: frozenset[str], where: str,
                         body: Any = None) -> Request:
    """Compile the request part of ``spec`` (``body`` overrides ``spec.body``)."""
    try:
        template = compile_request(spec.url, spec.params, spec.headers,
                                   spec.body if body is None else body, names, label=where)
        error = (compile_text(spec.error, spec.ERROR_NAMES, native=False,
                              label=f"{where}.error")
                 if spec.error is not None else None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return Request(spec.method, template, error)


@dataclass(frozen=True)
class Fields:
    """A compiled field map: plain dotted paths, and the templates as one expression."""

    paths: tuple[tuple[str, str], ...]
    templates: Compiled | None
    tier_map: Mapping[str, str] = field(default_factory=dict)
    kind: str | None = None

    @property
    def uses(self) -> Uses:
        """What the templates refer to."""
        return self.templates.uses if self.templates is not None else Uses()

    def path_values(self, record: Any) -> dict[str, Any]:
        """The raw value of each attribute mapped by a plain path."""
        out: dict[str, Any] = {}
        for name, path in self.paths:
            found = get_path(record, path)
            out[name] = None if found is MISSING else found
        return out

    def values(self, record: Any, context: Mapping[str, Any] | None) -> dict[str, Any]:
        """The raw value of each mapped attribute (paths into ``record``, templates with
        ``context``, which must hold ``record``)."""
        out = self.path_values(record)
        if self.templates is not None:
            out.update(self.templates(context if context is not None else {"record": record}))
        return out

    def customer(self, record: Any, context: Mapping[str, Any] | None = None) -> Customer:
        """The :class:`Customer` for ``record``; CrmMappingError names the failing field."""
        if not isinstance(record, Mapping):
            raise CrmMappingError(f"record is a {type(record).__name__}, not an object")
        return self.finish(self.values(record, context))

    def finish(self, values: dict[str, Any]) -> Customer:
        """The :class:`Customer` for raw mapped values."""
        if values.get("kind") is None and self.kind is not None:
            values["kind"] = self.kind
        return map_customer(values, self.tier_map, self.source)

    def source(self, name: str) -> str:
        """What maps ``name`` (for error messages)."""
        for field_name, path in self.paths:
            if field_name == name:
                return f"path {path!r}"
        return "template"


def compile_fields(fields: FieldMap, names: frozenset[str], where: str,
                   tier_map: Mapping[str, str] | None = None, kind: str | None = None) -> Fields:
    """Compile a field map (paths stay paths; templates become one expression)."""
    paths: list[tuple[str, str]] = []
    templates: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(fields, name)
        if value is None:
            continue
        if "{" in value and is_template(value):
            templates[name] = value
        else:
            paths.append((name, value))
    try:
        compiled = compile_tuple(templates, names, label=where) if templates else None
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    lowered = {k.lower(): v for k, v in (tier_map or {}).items()}
    return Fields(tuple(paths), compiled, lowered, kind)


@dataclass(frozen=True)
class Numbers:
    """Where the stored numbers of a record are: paths, or templates over ``record``."""

    paths: tuple[str, ...]
    templates: tuple[Compiled, ...]

    @property
    def uses(self) -> Uses:
        """What the templates refer to."""
        out = Uses()
        for template in self.templates:
            out = out | template.uses
        return out

    def __bool__(self) -> bool:
        return bool(self.paths or self.templates)

    def values(self, record: Any, context: Mapping[str, Any]) -> list[Any]:
        """The raw values (a number, text or list each) for one record."""
        found = [get_path(record, path) for path in self.paths]
        found += [template(context) for template in self.templates]
        return [v for v in found if v is not MISSING and v is not None]

    def stored(self, record: Any, context: Mapping[str, Any]) -> list[str]:
        """The numbers stored on one record, as written."""
        return [n for value in self.values(record, context) for n in stored_numbers(value)]


def compile_numbers(items: list[str], names: frozenset[str], where: str) -> Numbers:
    """Compile a ``numbers:`` list."""
    paths = tuple(p for p in items if not ("{" in p and is_template(p)))
    try:
        templates = tuple(compile_text(p, names, native=True, label=where)
                          for p in items if "{" in p and is_template(p))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return Numbers(paths, templates)


@dataclass(frozen=True)
class LookupStepPlan:
    """One compiled lookup step."""

    name: str
    request: Request
    results: str
    not_found_status: tuple[int, ...]
    numbers: Numbers
    #: for a later step that reads one record by the id of the previous step's record
    #: (its templates read one path of ``item`` and nothing of the caller's number or
    #: other steps): that path (``id``, ``item.id``); webhooks fetch records through it
    by_id: str | None = None


@dataclass(frozen=True)
class LookupPlan:
    """One compiled lookup: steps, field map, and how to choose among several."""

    name: str
    kind: str | None
    steps: tuple[LookupStepPlan, ...]
    fields: Fields
    multiple: MultipleSettings
    max_candidates: int
    #: every name the lookup's templates use (which number forms to compute)
    names: frozenset[str] = frozenset()

    @property
    def uses(self) -> Uses:
        """What every template of the lookup refers to."""
        out = self.fields.uses
        for step in self.steps:
            out = out | step.request.uses | step.numbers.uses
        return out

    @property
    def by_id(self) -> int | None:
        """The index of the first step that reads a record by its id, if any."""
        return next((i for i, s in enumerate(self.steps) if s.by_id is not None), None)


@dataclass(frozen=True)
class ChangedPlan:
    """The compiled ``changed`` feed."""

    spec: ChangedSettings
    request: Request
    numbers: Numbers
    fields: Fields


@dataclass(frozen=True)
class FindPlan:
    """A compiled ``find``: the search, and the match each object found must pass.

    Without a ``match`` in the config, ``match`` is the key the step writes (its
    ``{idempotency_key}``, or ``{record.record_key}`` when only that, or the record
    itself, is posted) and ``anywhere`` is True: an object is taken only when one of
    its values contains that key."""

    spec: FindSpec
    request: Request
    match: Compiled | None
    anywhere: bool = False

    @property
    def uses(self) -> Uses:
        return self.request.uses | (self.match.uses if self.match else Uses())


@dataclass(frozen=True)
class RecordStepPlan:
    """One compiled record step."""

    name: str
    spec: RecordStep
    when: Compiled | None
    request: Request
    outputs: Compiled | None
    customer: Compiled | None
    fetch: Request | None
    #: whether the step's templates read ``record.recording_url`` (an upload is made then)
    needs_recording: bool
    #: the search for the object a lost answer's send may have created
    find: FindPlan | None = None
    #: how to change the created object later (``update``), by its id
    update: Request | None = None
    #: whether the update's templates read ``record.recording_url``
    update_needs_recording: bool = False

    @property
    def uses(self) -> Uses:
        """What every template of the step refers to."""
        out = self.request.uses
        for part in (self.when, self.outputs, self.customer):
            if part is not None:
                out = out | part.uses
        for request in (self.fetch, self.update):
            if request is not None:
                out = out | request.uses
        if self.find is not None:
            out = out | self.find.uses
        return out


@dataclass(frozen=True)
class RefPlan:
    """A compiled reference table."""

    name: str
    spec: RefSpec
    request: Request
    value: Compiled | str


@dataclass(frozen=True)
class Plan:
    """Everything the connector runs, compiled."""

    lookups: tuple[LookupPlan, ...]
    changed: ChangedPlan | None
    records: tuple[RecordStepPlan, ...]
    refs: Mapping[str, RefPlan]
    recording_url: Compiled | None
    runtime: Runtime
    #: what every template sees (:data:`~router.crm.config.COMMON`: ``vars``,
    #: ``secrets``, ``omit``) and the runtime its filters read (``_rt``): every
    #: evaluation's context starts from it
    base: Mapping[str, Any]

    def record_step(self, name: str) -> RecordStepPlan | None:
        """The compiled record step called ``name``."""
        return next((s for s in self.records if s.name == name), None)


def build_plan(settings: CrmSettings) -> Plan:
    """Compile ``settings``; ValueError names the field of the first mistake."""
    from router.crm.config import (
        ANSWER_NAMES,
        COMMON,
        RECORD_NAMES,
        FetchSpec,
        FieldMap,
        LookupStep,
        RecordingSettings,
        RecordStep,
    )

    lookups = tuple(_lookup(spec, i, FieldMap.NAMES, LookupStep)
                    for i, spec in enumerate(settings.lookups) if spec.enabled)
    changed = None
    if settings.changed is not None:
        spec = settings.changed
        fields = spec.fields or settings.lookups[0].fields
        changed = ChangedPlan(
            spec=spec,
            request=compile_request_spec(spec, spec.names(), "crm.changed"),
            numbers=compile_numbers(spec.numbers, spec.NUMBER_NAMES, "crm.changed.numbers"),
            fields=compile_fields(fields, FieldMap.NAMES, "crm.changed.fields",
                                  settings.lookups[0].tier_map,
                                  spec.kind or settings.lookups[0].kind),
        )
    records = tuple(
        _record_step(step, f"crm.records[{i}] ({step.name})", RecordStep.names(),
                     ANSWER_NAMES, FetchSpec.names(), COMMON | RECORD_NAMES)
        for i, step in enumerate(settings.records) if step.enabled
    )
    refs = {name: _ref(name, spec) for name, spec in settings.refs.items()}
    recording = None
    if settings.recordings is not None and settings.recordings.mode == "url":
        # values arrive percent-encoded (slashes kept): see RestConnector.recording_url
        recording = compile_text(settings.recordings.url, RecordingSettings.NAMES,
                                 label="crm.recordings.url")
    runtime = Runtime(tz=ZoneInfo(settings.timezone), maps=settings.maps)
    plan = Plan(
        lookups=lookups, changed=changed, records=records, refs=refs,
        recording_url=recording, runtime=runtime,
        base={"vars": settings.vars, "secrets": settings.secret_values(), "omit": OMIT,
              "_rt": runtime},
    )
    _check_references(plan, settings)
    return plan


def _lookup(spec: LookupSpec, index: int, field_names: frozenset[str],
            step_model: type[LookupStep]) -> LookupPlan:
    where = f"crm.lookups[{index}] ({spec.name})"
    steps = []
    for j, step in enumerate(spec.steps):
        at = f"{where}.steps[{j}]"
        request = compile_request_spec(step, step_model.names(), at)
        steps.append(LookupStepPlan(
            name=step.name or f"step{j + 1}",
            request=request,
            results=step.results if step.results is not None else ("results" if j == 0 else ""),
            not_found_status=tuple(step.not_found_status),
            numbers=compile_numbers(step.numbers, step_model.NUMBER_NAMES, f"{at}.numbers"),
            by_id=_by_id(step, request) if j > 0 else None,
        ))
    plan = LookupPlan(
        name=spec.name, kind=spec.kind, steps=tuple(steps),
        fields=compile_fields(spec.fields, field_names, f"{where}.fields", spec.tier_map,
                              spec.kind),
        multiple=spec.multiple, max_candidates=spec.max_candidates,
    )
    return replace(plan, names=plan.uses.names)


def _by_id(step: LookupStep, request: Request) -> str | None:
    """The one path of ``item`` a later step reads, when that is all it depends on."""
    from router.crm.config import NUMBER

    if request.uses.names & (NUMBER | {"steps"}):
        return None
    texts = [step.url, *step.params.values(), *step.headers.values(),
             *json_strings(step.body)]
    paths = paths_under(texts, "item")
    return next(iter(paths)) if len(paths) == 1 and "" not in paths else None


def _record_step(step: RecordStep, where: str, names: frozenset[str],
                 answer_names: frozenset[str], fetch_names: frozenset[str],
                 when_names: frozenset[str]) -> RecordStepPlan:
    body = step.body
    if step.fields is not None:
        body = {}
        for target, template in step.fields.items():
            set_path(body, target, template)
    elif body is None and step.method in ("POST", "PUT", "PATCH"):
        body = "{record}"  # neither body nor fields: the call record itself
    try:
        when = (compile_expression(step.when, when_names, repr(step.when),
                                   label=f"{where}.when")
                if step.when is not None else None)
        outputs = (compile_tuple(step.outputs, answer_names, label=f"{where}.outputs")
                   if step.outputs else None)
        customer = (compile_tuple(step.customer, answer_names, label=f"{where}.customer")
                    if step.customer else None)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    request = compile_request_spec(step, names, where, body=body)
    fetch = (compile_request_spec(step.fetch, fetch_names, f"{where}.fetch")
             if step.fetch is not None else None)
    find = None
    if step.find is not None:
        anywhere = step.find.match is None
        if step.find.match is not None:
            text = step.find.match.equals or step.find.match.contains or ""
        else:  # the key the step writes, looked for in every value of an object found
            written = json_strings(body)
            text = "{idempotency_key}" if any("idempotency_key" in t for t in written) \
                else "{record.record_key}"
        try:
            match = compile_text(text, names, native=False, label=f"{where}.find.match")
        except ValueError as exc:
            raise ValueError(f"{where}.find.match: {exc}") from None
        find = FindPlan(step.find, compile_request_spec(step.find, names, f"{where}.find"),
                        match, anywhere)
    update = None
    update_text = ""
    if step.update is not None:
        spec = step.update
        update_body = "{record}" if spec.body is None and spec.method in (
            "POST", "PUT", "PATCH") else None
        update = compile_request_spec(spec, spec.names(), f"{where}.update", body=update_body)
        update_text = f"{spec.url} {spec.params} {spec.headers} {spec.body}"
    text = f"{step.url} {step.params} {step.headers} {body}"
    return RecordStepPlan(
        name=step.name, spec=step, when=when, request=request, outputs=outputs,
        customer=customer, fetch=fetch, needs_recording="recording_url" in text, find=find,
        update=update, update_needs_recording="recording_url" in update_text,
    )


def _ref(name: str, spec: RefSpec) -> RefPlan:
    where = f"crm.refs.{name}"
    request = compile_request_spec(spec, spec.names(), where)
    value: Compiled | str = spec.value
    if "{" in spec.value and is_template(spec.value):
        try:
            value = compile_text(spec.value, spec.VALUE_NAMES, native=True,
                                 label=f"{where}.value")
        except ValueError as exc:
            raise ValueError(f"{where}.value: {exc}") from None
    return RefPlan(name, spec, request, value)


def _check_references(plan: Plan, settings: CrmSettings) -> None:
    parts: list[tuple[str, Uses]] = [(f"crm.lookups ({p.name})", p.uses) for p in plan.lookups]
    parts += [(f"crm.records ({p.name})", p.uses) for p in plan.records]
    if plan.changed is not None:
        parts.append(("crm.changed", plan.changed.request.uses | plan.changed.fields.uses
                      | plan.changed.numbers.uses))
    for name, ref in plan.refs.items():
        uses = ref.request.uses
        if isinstance(ref.value, Compiled):
            uses = uses | ref.value.uses
        parts.append((f"crm.refs.{name}", uses))
    for where, uses in parts:
        for ref_name in sorted(uses.refs):
            if ref_name not in settings.refs:
                known = ", ".join(sorted(settings.refs)) or "none configured"
                raise ValueError(f"{where}: ref({ref_name!r}) is not in crm.refs ({known})")
        for map_name in sorted(uses.maps):
            if map_name not in settings.maps:
                known = ", ".join(sorted(settings.maps)) or "none configured"
                raise ValueError(f"{where}: translate({map_name!r}) is not in crm.maps ({known})")


# --- values to a customer -----------------------------------------------------------------


def map_customer(values: Mapping[str, Any], tier_map: Mapping[str, str],
                 source: Callable[[str], str] = lambda name: name) -> Customer:
    """A :class:`Customer` from raw mapped values; CrmMappingError names the failing field.

    ``tier_map`` keys are lower-case CRM tier values; ``source(name)`` says what maps
    ``name`` (a path or a template), for the message.
    """

    def fail(name: str, what: str) -> CrmMappingError:
        return CrmMappingError(f"{name}: {source(name)} {what}")

    raw_id = values.get("id")
    if _absent(raw_id):
        raise fail("id", "not found in the record")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise fail("id", f"is a {type(raw_id).__name__}, not a string or number")
    tier = _text(values.get("tier"), lambda w: fail("tier", w))
    if tier is not None:
        tier = tier_map.get(tier.lower(), tier)
    try:
        updated = parse_datetime(values.get("updated_at"))
    except ValueError as exc:
        raise fail("updated_at", "is not a date-time") from exc
    return Customer(
        id=str(raw_id),
        name=_text(values.get("name"), lambda w: fail("name", w)),
        tier=tier,
        value=_number(values.get("value"), lambda w: fail("value", w)),
        owner=_text(values.get("owner"), lambda w: fail("owner", w)),
        tags=_tags(values.get("tags"), lambda w: fail("tags", w)),
        open_tickets=_count(values.get("open_tickets"), lambda w: fail("open_tickets", w)),
        language=_text(values.get("language"), lambda w: fail("language", w)),
        updated_at=updated,
        kind=_text(values.get("kind"), lambda w: fail("kind", w)),
    )


Fail = Callable[[str], CrmMappingError]


def _absent(value: Any) -> bool:
    """None, empty text, or ``false`` (how Odoo and others say "no value")."""
    return value is None or value == "" or value is False


def _text(value: Any, fail: Fail) -> str | None:
    if _absent(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise fail(f"is a {type(value).__name__}, not text")


def _number(value: Any, fail: Fail) -> float | None:
    if _absent(value):
        return None
    if isinstance(value, bool):
        raise fail("is a bool, not a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past a float's
        raise fail(f"is {type(value).__name__} {str(value)[:40]!r}, not a number") from None


def _count(value: Any, fail: Fail) -> int:
    if _absent(value):
        return 0
    if isinstance(value, list):
        return len(value)
    if isinstance(value, bool):
        raise fail("is a bool, not a count")
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999, 10**400
        raise fail(f"is {type(value).__name__} {str(value)[:40]!r}, not a count") from None


def _tags(value: Any, fail: Fail) -> tuple[str, ...]:
    if _absent(value):
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
