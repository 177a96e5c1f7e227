"""The connector's template language: ``{expression}`` in text, compiled once, run sandboxed.

A template is text with expressions in single braces: ``"Call back {record.caller}"``.
An expression is a Jinja2 expression (dotted paths, literals, ``a if cond else b``,
``and``/``or``/``not``, comparisons, ``in``, ``~`` to join text, filters after ``|``,
tests after ``is``), evaluated in :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`
with the filters and tests of this module only (see :data:`FILTERS` and :data:`TESTS`;
``docs/crm/templates.md`` documents each). There are no statements (``{% %}``): a
template is an expression, so it cannot loop or define anything.

Rules of evaluation:

* ``a.b`` and ``a['b']`` on a JSON object read the key; a key that does not exist, or
  any path through ``null``, is ``none`` (never an error): CRM records omit fields.
* a string that is exactly one ``{expression}`` keeps the value's type (a number stays
  a number, ``none`` is JSON ``null``); in any other text the value is turned into text
  (``none`` → empty, ``true``/``false``, lists and objects as JSON).
* ``{{`` and ``}}`` outside an expression are a literal brace.
* ``{last:N}`` is short for ``{last(N)}`` (the last N digits of the caller's number).

The filters and tests are in :mod:`router.crm.filters`.

Each template is compiled when the config is loaded (:func:`compile_text`,
:func:`compile_json`; compiled sources are cached per process), never per call, and the
names it uses are checked against the names its place offers: a mistake is a
``ValueError`` naming the template, which the config turns into an error naming the
field. A whole request (URL, query, headers, body) or field map is one expression,
evaluated once per use (a few microseconds).
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, TypeVar

from jinja2 import ChainableUndefined, nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from router.crm.filters import (
    FILTERS,
    HIDDEN_FILTERS,
    LITERAL_CHECKS,
    TESTS,
    BoundExceeded,
    Runtime,
    bounded_binop,
    f_escape,
    f_join,
    f_replace,
    to_text,
    url_quote,
)
from router.crm.redact import mask_text
from router.errors import CrmMappingError

# --- the sandbox ---------------------------------------------------------------------------


class _Env(ImmutableSandboxedEnvironment):
    """The sandbox, with JSON semantics for paths: a missing key or a path through null is
    None, not an undefined value (and a JSON object's keys win over dict methods:
    ``record.items`` is the key ``items``). ``*``, ``**`` and ``%`` are bounded
    (:func:`router.crm.filters.bounded_binop`): ``"x" * 10**9`` is an error, not a
    gigabyte; being intercepted, they are never folded when a template is compiled."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return bounded_binop(operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict:
            return obj.get(attribute)
        if obj is None:
            return None
        value = super().getattr(obj, attribute)
        return None if isinstance(value, Undefined) else value

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(obj) is dict:
            try:
                return obj.get(argument)
            except TypeError:  # unhashable key
                return None
        if obj is None:
            return None
        if type(obj) is list and type(argument) is int:
            return obj[argument] if -len(obj) <= argument < len(obj) else None
        value = super().getitem(obj, argument)
        return None if isinstance(value, Undefined) else value


ENV: Final = _Env(undefined=ChainableUndefined, autoescape=False)
ENV.filters.clear()
ENV.filters.update(FILTERS)
ENV.filters.update(HIDDEN_FILTERS)
ENV.tests.clear()
ENV.tests.update(TESTS)
ENV.globals.clear()


class Omit:
    """``omit``: a value that removes its key from a JSON body (or item from a list)."""

    _instance: Omit | None = None

    def __new__(cls) -> Omit:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "omit"


OMIT: Final = Omit()


# --- scanning the brace syntax -----------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """One ``{expression}`` of a template (its Jinja source)."""

    source: str


_LAST = re.compile(r"^\s*last\s*:\s*(\d+)")


def scan(template: str) -> list[str | Expr]:
    """Split ``template`` into literal text and expressions; ValueError on bad braces."""
    parts: list[str | Expr] = []
    text: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch == "{":
            if template.startswith("{{", i):
                text.append("{")
                i += 2
                continue
            end = _expression_end(template, i + 1)
            source = template[i + 1:end].strip()
            if not source:
                raise ValueError(f"empty {{}} in {template!r}")
            if text:
                parts.append("".join(text))
                text = []
            parts.append(Expr(_LAST.sub(r"last(\1)", source, count=1)))
            i = end + 1
        elif ch == "}":
            if template.startswith("}}", i):
                text.append("}")
                i += 2
                continue
            raise ValueError(f"unbalanced brace in {template!r} (write {{{{ or }}}} for a literal)")
        else:
            text.append(ch)
            i += 1
    if text:
        parts.append("".join(text))
    return parts


def _expression_end(template: str, start: int) -> int:
    depth = 0
    quote_char: str | None = None
    i = start
    while i < len(template):
        ch = template[i]
        if quote_char is not None:
            if ch == "\\":
                i += 1
            elif ch == quote_char:
                quote_char = None
        elif ch in "'\"":
            quote_char = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                if ch == "}":
                    return i
                raise ValueError(f"unbalanced {ch!r} in {template!r}")
            depth -= 1
        i += 1
    raise ValueError(f"unbalanced brace in {template!r}: '{{' without '}}'")


def is_template(text: str) -> bool:
    """True when ``text`` has an expression (else it is plain text, or a dotted path)."""
    return any(isinstance(p, Expr) for p in scan(text))


# --- checking and compiling -----------------------------------------------------------------

_N = TypeVar("_N", bound=nodes.Node)


@dataclass(frozen=True)
class Uses:
    """What a template refers to: context names, ``ref`` tables and ``translate`` maps."""

    names: frozenset[str] = frozenset()
    refs: frozenset[str] = frozenset()
    maps: frozenset[str] = frozenset()

    def __or__(self, other: Uses) -> Uses:
        return Uses(self.names | other.names, self.refs | other.refs, self.maps | other.maps)


def _parse(source: str, where: str) -> nodes.Expr:
    try:
        parser = Parser(ENV, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            token = parser.stream.current
            raise ValueError(f"unexpected {token.value!r} after the expression in {where}")
    except TemplateSyntaxError as exc:
        raise ValueError(f"bad expression in {where}: {exc.message}") from None
    return expr


def _walk(expr: nodes.Node, kind: type[_N]) -> list[_N]:
    """``expr`` itself and every node under it of type ``kind``."""
    found = [expr] if isinstance(expr, kind) else []
    return found + list(expr.find_all(kind))


def check_expression(source: str, allowed: Iterable[str], where: str) -> Uses:
    """Parse one expression and check its names, filters and tests; return what it uses.

    ``where`` is the template text, for the message. Raises ValueError naming the first
    problem.
    """
    expr = _parse(source, where)
    allowed_set = set(allowed)
    names: set[str] = set()
    for node in _walk(expr, nodes.Name):
        if node.name.startswith("_") or node.name not in allowed_set:
            known = ", ".join(sorted(allowed_set))
            raise ValueError(f"unknown name {node.name!r} in {where} (known here: {known})")
        names.add(node.name)
    for call in _walk(expr, nodes.Call):
        if not isinstance(call.node, nodes.Name):
            raise ValueError(f"a method call is not part of the template language in {where}: "
                             "use a filter (upper, lower, trim, split, replace, join...)")
    _check_literal_bounds(expr, where)
    refs: set[str] = set()
    maps: set[str] = set()
    for flt in _walk(expr, nodes.Filter):
        if flt.name not in FILTERS:
            raise ValueError(
                f"unknown filter {flt.name!r} in {where} (known: {', '.join(sorted(FILTERS))})"
            )
        first = flt.args[0] if flt.args else None
        if flt.name in ("ref", "translate") and isinstance(first, nodes.Const) and isinstance(
                first.value, str):
            (refs if flt.name == "ref" else maps).add(first.value)
        elif flt.name == "ref":
            raise ValueError(f"ref needs the table's name as a literal in {where}")
        if flt.name == "regex" and first is not None and not (
                isinstance(first, nodes.Const) and isinstance(first.value, str)):
            # a pattern from an answer or a record could backtrack without end
            raise ValueError(f"regex needs its pattern as a literal in {where}")
        _check_call("filter", FILTERS[flt.name], flt, where)
    for test in _walk(expr, nodes.Test):
        if test.name not in TESTS:
            raise ValueError(
                f"unknown test {test.name!r} in {where} (known: {', '.join(sorted(TESTS))})"
            )
        _check_call("test", TESTS[test.name], test, where)
    return Uses(frozenset(names), frozenset(refs), frozenset(maps))


class _NotConstant(Exception):
    """An expression whose value depends on the context."""


_BINOPS: Final[dict[type[nodes.BinExpr], str]] = {
    nodes.Mul: "*", nodes.Pow: "**", nodes.Mod: "%"}
_OTHER_BINOPS: Final[dict[type[nodes.BinExpr], Callable[[Any, Any], Any]]] = {
    nodes.Add: lambda a, b: a + b, nodes.Sub: lambda a, b: a - b,
    nodes.Div: lambda a, b: a / b, nodes.FloorDiv: lambda a, b: a // b}


#: Filters a literal may make long with, run by :func:`_constant` (bounded).
_GROWING_FILTERS: Final[dict[str, Callable[..., Any]]] = {
    "replace": f_replace, "join": f_join, "escape": f_escape}


def _constant(node: nodes.Node) -> Any:
    """The value of a literal expression, with ``*``, ``**``, ``%``, ``replace`` and
    ``join`` bounded (:class:`BoundExceeded`); :class:`_NotConstant` otherwise."""
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, nodes.List | nodes.Tuple):
        return [_constant(item) for item in node.items]
    if isinstance(node, nodes.Dict):
        try:
            return {_constant(pair.key): _constant(pair.value) for pair in node.items}
        except TypeError:  # an unhashable key: reported when evaluated
            raise _NotConstant from None
    if isinstance(node, nodes.Neg):
        return -_constant(node.node)
    if isinstance(node, nodes.Pos):
        return +_constant(node.node)
    if isinstance(node, nodes.BinExpr):
        left, right = _constant(node.left), _constant(node.right)
        try:
            if type(node) in _BINOPS:
                return bounded_binop(_BINOPS[type(node)], left, right)
            if type(node) in _OTHER_BINOPS:
                return _OTHER_BINOPS[type(node)](left, right)
        except BoundExceeded:
            raise
        except (TypeError, ValueError, ArithmeticError):
            raise _NotConstant from None  # a plain mistake: reported when evaluated
    if isinstance(node, nodes.Filter) and node.name in _GROWING_FILTERS \
            and node.node is not None and not node.kwargs:
        args = [_constant(a) for a in node.args]
        try:
            return _GROWING_FILTERS[node.name](_constant(node.node), *args)
        except BoundExceeded:
            raise
        except (TypeError, ValueError):
            raise _NotConstant from None
    raise _NotConstant


def _check_literal_bounds(expr: nodes.Expr, where: str) -> None:
    """Literal operations over a bound (``{'x' * 10**9}``) fail the config check."""
    growing: list[nodes.Node] = [*_walk(expr, nodes.Mul), *_walk(expr, nodes.Pow),
                                 *_walk(expr, nodes.Mod), *_walk(expr, nodes.Filter)]
    for node in growing:
        try:
            _constant(node)
        except _NotConstant:
            continue
        except BoundExceeded as exc:
            raise ValueError(f"{exc} in {where}") from None


def _check_call(kind: str, func: Callable[..., Any], node: nodes.Filter | nodes.Test,
                where: str) -> None:
    """The arguments written after a filter or test fit it, and its literal ones that can
    be checked now are valid (a regex, a time zone): mistakes that would fail every
    evaluation fail the config instead."""
    if node.dyn_args is not None or node.dyn_kwargs is not None:
        return
    leading = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1  # ctx, value
    try:
        inspect.signature(func).bind(*[None] * (leading + len(node.args)),
                                     **{str(kw.key): None for kw in node.kwargs})
    except TypeError as exc:
        raise ValueError(f"{kind} {node.name!r} in {where}: {exc}") from None
    for index, arg in enumerate(node.args):
        check = LITERAL_CHECKS.get((node.name, index)) if kind == "filter" else None
        if check is not None and isinstance(arg, nodes.Const):
            try:
                check(arg.value)
            except ValueError as exc:
                raise ValueError(f"{kind} {node.name!r} in {where}: {exc}") from None


def _chain(node: nodes.Node) -> list[str] | None:
    """``a.b['c'].d`` as ``['a', 'b', 'c', 'd']`` (None when not a plain path)."""
    if isinstance(node, nodes.Name):
        return [node.name]
    if isinstance(node, nodes.Getattr):
        head = _chain(node.node)
        return None if head is None else [*head, node.attr]
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
            and isinstance(node.arg.value, str):
        head = _chain(node.node)
        return None if head is None else [*head, node.arg.value]
    return None


def paths_under(texts: Iterable[str], root: str) -> frozenset[str]:
    """The dotted paths read under the name ``root`` by the expressions of ``texts``,
    without ``root`` (``{item.item.id}`` under ``item`` is ``item.id``); a bare
    ``root``, or a path with a computed part, reads as ``""``. Only the longest paths
    are kept (``item.id`` hides ``item``)."""
    found: set[str] = set()
    for text in texts:
        for part in scan(text):
            if not isinstance(part, Expr):
                continue
            expr = _parse(part.source, repr(text))
            found.update("" for name in _walk(expr, nodes.Name) if name.name == root)
            paths: list[nodes.Expr] = [*_walk(expr, nodes.Getattr), *_walk(expr, nodes.Getitem)]
            for node in paths:
                chain = _chain(node)
                if chain is not None and chain[0] == root:
                    found.add(".".join(chain[1:]))
    return frozenset(p for p in found
                     if not any(o != p and (p == "" or o.startswith(p + ".")) for o in found))


def check_text(template: str, allowed: Iterable[str]) -> Uses:
    """Check every expression of a text template; return what it uses."""
    uses = Uses()
    allowed = frozenset(allowed)
    for part in scan(template):
        if isinstance(part, Expr):
            uses = uses | check_expression(part.source, allowed, repr(template))
    return uses


def check_json(template: Any, allowed: Iterable[str], where: str = "") -> Uses:
    """Check every string (keys and leaves) of a JSON template; ValueError names the path."""
    allowed = frozenset(allowed)
    uses = Uses()
    if isinstance(template, str):
        try:
            return check_text(template, allowed)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}" if where else str(exc)) from None
    if isinstance(template, Mapping):
        for key, value in template.items():
            path = f"{where}.{key}" if where else str(key)
            uses = uses | check_json(str(key), allowed, path) | check_json(value, allowed, path)
    elif isinstance(template, list):
        for index, value in enumerate(template):
            uses = uses | check_json(value, allowed, f"{where}[{index}]")
    elif isinstance(template, float) and not math.isfinite(template):
        raise ValueError(f"{where}: {template} is not a JSON number")
    return uses


def _text_source(template: str, *, native: bool, wrap: str = "_text") -> str:
    parts = scan(template)
    exprs = [p for p in parts if isinstance(p, Expr)]
    if native and len(parts) == 1 and exprs:
        return f"({exprs[0].source})"
    if not exprs:
        return json.dumps(_literal(template))
    pieces = [json.dumps(p) if isinstance(p, str) else f"(({p.source})|{wrap})" for p in parts]
    return "(" + " ~ ".join(pieces) + ")" if len(pieces) > 1 else pieces[0]


def _json_source(template: Any) -> str:
    if isinstance(template, str):
        return _text_source(template, native=True)
    if isinstance(template, Mapping):
        items = ", ".join(
            f"{_text_source(str(k), native=False)}: {_json_source(v)}" for k, v in template.items()
        )
        return "{" + items + "}"
    if isinstance(template, list | tuple):
        return "[" + ", ".join(_json_source(v) for v in template) + "]"
    if template is True:
        return "true"
    if template is False:
        return "false"
    if template is None:
        return "none"
    if isinstance(template, int | float):
        return repr(template)
    raise ValueError(f"not JSON: {type(template).__name__}")


def _has_expression(template: Any) -> bool:
    if isinstance(template, str):
        return is_template(template)
    if isinstance(template, Mapping):
        return any(_has_expression(str(k)) or _has_expression(v) for k, v in template.items())
    if isinstance(template, list | tuple):
        return any(_has_expression(v) for v in template)
    return False


@lru_cache(maxsize=4096)
def _compile(source: str) -> Any:
    expr = _parse(source, repr(source))
    expr.set_environment(ENV)
    body = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
    try:
        return ENV.from_string(nodes.Template(body, lineno=1))
    except TemplateError as exc:  # pragma: no cover - checked before compiling
        raise ValueError(f"cannot compile {source!r}: {exc}") from None


class Compiled:
    """A compiled template: call it with a context mapping to get its value.

    ``const`` is the value of a template without expressions (evaluated at no cost);
    ``label`` names it (the config field) when an evaluation fails.
    """

    __slots__ = ("_template", "const", "label", "omits", "source", "uses")

    def __init__(self, source: str | None, const: Any, uses: Uses, omits: bool = False,
                 label: str = "") -> None:
        self.source = source
        self.const = const
        self.uses = uses
        self.omits = omits
        self.label = label
        self._template = _compile(source) if source is not None else None

    @property
    def constant(self) -> bool:
        """True when the value does not depend on the context."""
        return self._template is None

    def __call__(self, context: Mapping[str, Any]) -> Any:
        """The value for ``context``; CrmMappingError naming the template when the values
        it was given do not fit it (text added to a number, a date that is not one...)."""
        template = self._template
        if template is None:
            return self.const
        ctx = template.new_context(context, shared=True)
        try:
            for _ in template.root_render_func(ctx):
                pass
        except Exception as exc:
            where = self.label or repr(_short(self.source or ""))
            raise CrmMappingError(f"template {where} failed: {type(exc).__name__}: "
                                  f"{mask_text(_short(str(exc)))}") from exc
        value = ctx.vars["result"]
        if isinstance(value, Undefined):
            return None
        return _drop_omitted(value) if self.omits else value

    def __repr__(self) -> str:
        return f"Compiled({self.source if self.source is not None else self.const!r})"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _drop_omitted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_omitted(v) for k, v in value.items() if v is not OMIT}
    if isinstance(value, list):
        return [_drop_omitted(v) for v in value if v is not OMIT]
    if isinstance(value, tuple):
        return tuple(_drop_omitted(v) for v in value)
    return None if value is OMIT else value


def compile_text(template: str, allowed: Iterable[str], *, native: bool = False,
                 url: bool = False, label: str = "") -> Compiled:
    """A text template compiled: its value is text (``native``: a lone expression keeps
    its type; ``url``: values are percent-encoded unless the URL is one lone expression).
    ``label`` (here and below) names it in the error of a failed evaluation."""
    uses = check_text(template, allowed)
    if not is_template(template):
        return Compiled(None, _literal(template), uses)
    lone = len(scan(template)) == 1
    wrap = "_url" if url and not lone else "_text"
    return Compiled(_text_source(template, native=native, wrap=wrap), None, uses,
                    label=label)


def compile_json(template: Any, allowed: Iterable[str], where: str = "", *,
                 label: str = "") -> Compiled:
    """A JSON template (objects, lists, strings with expressions) compiled as one value."""
    uses = check_json(template, allowed, where)
    if not _has_expression(template):
        return Compiled(None, _literal(template), uses)
    return Compiled(_json_source(template), None, uses, omits="omit" in uses.names,
                    label=label)


def compile_expression(source: str, allowed: Iterable[str], where: str, *,
                       label: str = "") -> Compiled:
    """A bare expression (``when:``), optionally written inside one pair of braces."""
    text = source.strip()
    parts = scan(text) if text.startswith("{") else None
    if parts is not None and len(parts) == 1 and isinstance(parts[0], Expr):
        text = parts[0].source
    uses = check_expression(text, allowed, where)
    return Compiled(f"({text})", None, uses, label=label)


def _literal(template: Any) -> Any:
    """A template without expressions, with ``{{``/``}}`` turned into braces."""
    if isinstance(template, str):
        return "".join(p for p in scan(template) if isinstance(p, str))
    if isinstance(template, Mapping):
        return {_literal(str(k)): _literal(v) for k, v in template.items()}
    if isinstance(template, list | tuple):
        return [_literal(v) for v in template]
    return template


def json_strings(template: Any) -> list[str]:
    """Every string (keys and leaves) of a JSON template."""
    if isinstance(template, str):
        return [template]
    if isinstance(template, Mapping):
        out: list[str] = []
        for key, value in template.items():
            out.append(str(key))
            out.extend(json_strings(value))
        return out
    if isinstance(template, list):
        return [s for v in template for s in json_strings(v)]
    return []



def compile_request(
    url: str, params: Mapping[str, str], headers: Mapping[str, str], body: Any,
    allowed: Iterable[str], *, label: str = "",
) -> Compiled:
    """A whole request as one compiled value: ``(url, params, headers, body)``.

    URL values are percent-encoded (unless the URL is one lone expression), params and
    headers are text (the caller leaves out those that render empty), the body is JSON.
    """
    allowed = frozenset(allowed)
    uses = check_text(url, allowed)
    for what, mapping in (("params", params), ("headers", headers)):
        for key, text in mapping.items():
            try:
                uses = uses | check_text(text, allowed)
            except ValueError as exc:
                raise ValueError(f"{what}.{key}: {exc}") from None
    if body is not None:
        uses = uses | check_json(body, allowed, "body")
    templated = (is_template(url) or any(is_template(v) for v in params.values())
                 or any(is_template(v) for v in headers.values()) or _has_expression(body))
    if not templated:
        const = (_literal(url), {k: _literal(v) for k, v in params.items()},
                 {k: _literal(v) for k, v in headers.items()}, _literal(body))
        return Compiled(None, const, uses)
    lone = len(scan(url)) == 1
    url_source = _text_source(url, native=False, wrap="_text" if lone else "_url")

    def text_map(mapping: Mapping[str, str]) -> str:
        items = ", ".join(f"{json.dumps(k)}: {_text_source(v, native=False)}"
                          for k, v in mapping.items())
        return "{" + items + "}"

    body_source = _json_source(body) if body is not None else "none"
    source = f"({url_source}, {text_map(params)}, {text_map(headers)}, {body_source})"
    return Compiled(source, None, uses, omits="omit" in uses.names, label=label)


def compile_tuple(templates: Mapping[str, str], allowed: Iterable[str], *,
                  label: str = "") -> Compiled:
    """Several native templates evaluated at once: a dict of name → value."""
    allowed = frozenset(allowed)
    uses = Uses()
    for key, text in templates.items():
        try:
            uses = uses | check_text(text, allowed)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if not any(is_template(t) for t in templates.values()):
        return Compiled(None, {k: _literal(v) for k, v in templates.items()}, uses)
    items = ", ".join(f"{json.dumps(k)}: {_text_source(v, native=True)}"
                      for k, v in templates.items())
    return Compiled("{" + items + "}", None, uses, label=label)

__all__ = [
    "ENV", "FILTERS", "OMIT", "TESTS", "Compiled", "Expr", "Runtime", "Uses", "check_expression",
    "check_json", "check_text", "compile_expression", "compile_json", "compile_request",
    "compile_text", "compile_tuple",
    "is_template", "json_strings", "paths_under", "scan", "to_text", "url_quote",
]
