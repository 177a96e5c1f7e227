"""The template language (router/crm/template.py, filters.py): syntax, evaluation rules,
filters, the sandbox, and the errors ``callroute check`` shows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from router.crm.filters import FILTERS, Runtime
from router.crm.template import (
    OMIT,
    compile_expression,
    compile_json,
    compile_request,
    compile_text,
    scan,
)
from router.errors import ConfigError, CrmMappingError
from router.settings import load_settings

NAMES = ["record", "customer", "vars", "omit", "e164", "last"]


def text(template: str, **context: Any) -> Any:
    """Evaluate a text template."""
    return compile_text(template, NAMES)({"omit": OMIT, **context})


def value(template: str, **context: Any) -> Any:
    """Evaluate a template that keeps the value's type."""
    return compile_text(template, NAMES, native=True)({"omit": OMIT, **context})


def test_plain_text_and_literal_braces() -> None:
    """Text without expressions is itself; {{ and }} are literal braces (SOSL's FIND {x})."""
    assert text("no placeholders") == "no placeholders"
    assert text("FIND {{{e164}}}", e164="+1") == "FIND {+1}"
    assert scan("a{{b}}c") == ["a{b}c"]


def test_paths_through_missing_keys_and_null_are_none() -> None:
    """A missing key, or any path through null, is none: empty in text, null as a value."""
    rec = {"owner": None, "items": [1, 2]}
    assert text("[{record.owner.id}]", record=rec) == "[]"
    assert value("{record.nothing.at.all}", record=rec) is None
    assert value("{record.items}", record=rec) == [1, 2]  # a key, not dict.items
    assert value("{record['items'][5]}", record=rec) is None


def test_lone_expression_keeps_its_type_text_does_not() -> None:
    """A string that is one expression keeps the value's type; in text, values are
    written as text (booleans lower-case, lists as JSON)."""
    rec = {"n": 42, "ok": True, "tags": ["a", "b"]}
    assert value("{record.n}", record=rec) == 42
    assert text("{record.n}", record=rec) == "42"
    assert text("{record.ok} {record.tags}", record=rec) == 'true ["a","b"]'


def test_conditionals_joins_defaults_and_value_maps() -> None:
    """Inline conditionals, join of parts (empty ones dropped), defaults and value maps."""
    rec = {"first": "Lei", "last": None, "outcome": "missed", "owner": ""}
    assert text("{[record.first, record.last] | join(' ')}", record=rec) == "Lei"
    assert text("{'yes' if record.outcome == 'missed' else 'no'}", record=rec) == "yes"
    assert text("{record.owner | default('nobody')}", record=rec) == "nobody"
    assert text("{record.outcome | translate({'missed': 'no_answer'})}", record=rec) == \
        "no_answer"
    assert text("{record.outcome | translate({'answered': 'ok'})}", record=rec) == "missed"
    assert text("{record.outcome | translate({'answered': 'ok'}, 'other')}", record=rec) == \
        "other"


def test_named_value_maps_come_from_the_runtime() -> None:
    """translate('name') reads crm.maps (case-insensitive keys as a fallback)."""
    rt = Runtime(maps={"outcome": {"Missed": "NO_ANSWER"}})
    template = compile_text("{record.outcome | translate('outcome')}", ["record"])
    assert template({"record": {"outcome": "missed"}, "_rt": rt}) == "NO_ANSWER"


def test_dates_in_utc_epochs_and_the_crms_time_zone() -> None:
    """Date filters: ISO UTC, epoch seconds and milliseconds, and the CRM's time zone for
    local ISO, dates and strftime (a call at 23:30 UTC is the next day in Shanghai)."""
    rec = {"start": "2025-01-10T23:30:00Z"}
    shanghai = Runtime(tz=ZoneInfo("Asia/Shanghai"))

    def at(template: str, rt: Runtime = shanghai) -> Any:
        return compile_text(template, NAMES, native=True)({"record": rec, "_rt": rt})

    assert at("{record.start | iso}") == "2025-01-10T23:30:00Z"
    assert at("{record.start | epoch}") == 1736551800
    assert at("{record.start | epoch_ms}") == 1736551800000
    assert at("{record.start | iso_local}") == "2025-01-11T07:30:00+08:00"
    assert at("{record.start | date}") == "2025-01-11"
    assert at("{record.start | date}", Runtime()) == "2025-01-10"
    assert at("{record.start | strftime('%d/%m %H:%M')}") == "11/01 07:30"
    assert at("{record.start | strftime('%H:%M', 'UTC')}") == "23:30"
    assert at("{1736551800 | iso}") == "2025-01-10T23:30:00Z"  # epoch seconds in


def test_durations_and_numbers() -> None:
    """Durations (ms, mm:ss, hh:mm rounded up to the minute) and number filters; none in,
    none out."""
    assert value("{record.s | ms}", record={"s": 42.5}) == 42500
    assert value("{record.s | mmss}", record={"s": 125}) == "02:05"
    assert value("{record.s | hhmm}", record={"s": 61}) == "00:02"
    assert value("{record.s | int}", record={"s": "7.6"}) == 8
    assert value("{record.s | ms}", record={"s": None}) is None
    assert value("{record.s | int | default(0)}", record={}) == 0


def test_text_filters_regex_escape_soql_pluck_where() -> None:
    """Text and list filters used by the presets (html escapes an agent's note)."""
    rec = {"msg": "Contact already exists. Existing ID: 12345",
           "phones": [{"value": "+1 415", "primary": True}, {"value": "+1 212"}]}
    assert value("{record.msg | regex('Existing ID: (\\\\d+)')}", record=rec) == "12345"
    assert value("{'(415) 555-0100' | escape('(),')}") == "\\(415\\) 555-0100"
    assert value("{\"O'Brien\" | soql}") == "O\\'Brien"
    assert value("{record.note | html}", record={"note": "<b>Tom & \"Jo\"</b>"}) == \
        "&lt;b&gt;Tom &amp; &quot;Jo&quot;&lt;/b&gt;"
    assert value("{record.note | html}", record={}) is None
    assert value("{record.phones | pluck('value')}", record=rec) == ["+1 415", "+1 212"]
    assert value("{record.phones | where('primary') | pluck('value')}", record=rec) == ["+1 415"]
    assert value("{'+86 138 0013 8000' | digits}") == "8613800138000"
    assert value("{'138 0013 8000' | e164}") == "+8613800138000"


def test_last_n_digits_shorthand() -> None:
    """{last:N} is last(N), the caller's last N digits."""
    assert text("*{last:7}", last=lambda n: "8613800138000"[-n:]) == "*0138000"


def test_omit_drops_keys_and_items_from_json() -> None:
    """A value that is omit removes its key (or list item) from the JSON body."""
    body = compile_json({"a": "{record.x or omit}", "b": ["{omit}", 1], "c": {"d": "{omit}"}},
                        NAMES)
    assert body({"record": {"x": None}, "omit": OMIT}) == {"b": [1], "c": {}}
    assert body({"record": {"x": 5}, "omit": OMIT}) == {"a": 5, "b": [1], "c": {}}


def test_requests_encode_url_values_and_drop_empty_params() -> None:
    """URL values are percent-encoded (a whole-URL expression is not); params and headers
    are text; the request is one compiled value."""
    request = compile_request("/c/{e164}", {"q": "{e164}", "empty": "{record.none}"},
                              {"X-Id": "{e164}"}, {"n": "{e164}"}, NAMES)
    url, params, headers, body = request({"e164": "+8613800138000", "record": {}})
    assert url == "/c/%2B8613800138000"
    assert params == {"q": "+8613800138000", "empty": ""}
    assert headers == {"X-Id": "+8613800138000"}
    assert body == {"n": "+8613800138000"}
    whole = compile_request("{record.next}", {}, {}, None, NAMES)
    assert whole({"record": {"next": "https://x/y?z=1"}})[0] == "https://x/y?z=1"
    constant = compile_request("/c", {"a": "b"}, {}, None, NAMES)
    assert constant.constant
    assert constant({}) == ("/c", {"a": "b"}, {}, None)


def test_when_expressions_with_or_without_braces() -> None:
    """A when is an expression; one pair of braces around it is allowed."""
    for source in ("customer.id is empty", "{customer.id is empty}"):
        when = compile_expression(source, NAMES, "when")
        assert when({"customer": {"id": ""}}) is True
        assert when({"customer": {"id": "C1"}}) is False


def test_the_sandbox_hides_python_internals() -> None:
    """Attributes of Python objects that could reach the interpreter read as none."""
    assert value("{record.__class__}", record={}) is None
    assert value("{''.__class__.__mro__}") is None
    assert text("{record.x.__globals__}", record={"x": text}) == ""


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{nothing}", "unknown name 'nothing'"),
        ("{_rt}", "unknown name '_rt'"),
        ("{record.x | bogus}", "unknown filter 'bogus'"),
        ("{record.x is weird}", "unknown test 'weird'"),
        ("{record.x +}", "bad expression"),
        ("{record.x", "'{' without '}'"),
        ("a } b", "unbalanced brace"),
        ("{}", "empty {}"),
        ("{record.x | ref(vars.name)}", "ref needs the table's name as a literal"),
        ("{record.x | regex(record.pattern)}", "regex needs its pattern as a literal"),
        ("{record.x | truncate}", "filter 'truncate' in .*missing a required argument"),
        ("{record.x | upper(2)}", "filter 'upper' in .*too many positional arguments"),
        ("{record.x is empty(1)}", "test 'empty' in .*too many positional arguments"),
        ("{record.x | regex('(a')}", "filter 'regex' in .*bad regex.*unterminated subpattern"),
        ("{record.x | date('Mars/Olympus')}", "filter 'date' in .*unknown time zone"),
        ("{record.x | strftime('%H', 'Europe')}", "unknown time zone 'Europe'"),
    ],
)
def test_mistakes_are_named(template: str, message: str) -> None:
    """Each kind of template mistake is a ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{")):
        compile_text(template, NAMES)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{'x' * 10**9}", "'*' would make 1.0e+09 characters or items (at most 1000000)"),
        ("{10**9 * 'x'}", "'*' would make 1.0e+09 characters"),
        ("{[1, 2] * 10**6}", "'*' would make 2000000 characters or items"),
        ("{10 ** 100000}", "'**' would make an integer over 4096 bits"),
        ("{(9 ** 999) * (9 ** 999)}", "'*' would make an integer over 4096 bits"),
        ("{'%0999999999d' % 1}", "'%' format asks for a width of 1.0e+09 (at most 1000)"),
        ("{'%.5000f' % 1}", "'%' format asks for a width of 5000"),
        ("{'%*d' % (5, 1)}", "'%' with a width or precision '*'"),
        ("{'a' | replace('', 'y' * 1000000)}", "replace would make 2000001 characters"),
        ("{[1, 2, 3] | join('-' * 600000)}", "join's separators would make 1200000"),
        ("{(['y' * 1000] * 50000) | join}", "'*' would make 5.0e+07 characters or items"),
        ("{[['y' * 100] * 1000] * 100}", "'*' would make 100"),
        ("{('%(a)s' * 100000) % {'a': 'y' * 1000}}", "'%' would make 1.6e+07 characters"),
        ("{('%s' * 1000) % (('y' * 1000,) * 1000)}", "'*' would make 100"),
        ("{('%1000s' * 1100) % ((1,) * 1100)}", "'%' would make "),
        ("{('a' * 1000) | escape('a', 'b' * 2000)}", "escape would make 2001000 characters"),
        ("{record.s.center(10**9)}", "a method call is not part of the template language"),
        ("{'{:>999999999}'.format(1)}", "a method call is not part of the template language"),
    ],
)
def test_a_literal_operation_over_a_bound_fails_the_check(template: str, message: str
                                                           ) -> None:
    """Repetition, powers, '%' formats, replace and join whose result would exhaust
    memory or CPU are refused when the template is compiled (``callroute check``), in
    an instant and without making the value; so are method calls (str.center,
    str.format), which the filters replace."""
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_text(template, NAMES, native=True)


@pytest.mark.parametrize(
    ("template", "record", "message"),
    [
        ("{record.s * record.n}", {"s": "x", "n": 10**9},
         "'*' would make 1.0e+09 characters or items"),
        ("{record.n ** record.n}", {"n": 10**6}, "'**' would make an integer over 4096 bits"),
        ("{record.fmt % 1}", {"fmt": "%0999999999d"}, "'%' format asks for a width"),
        ("{'%*d' % (record.n, 1)}", {"n": 10**9}, "'%' with a width or precision '*'"),
        ("{record.s | replace('', record.t)}", {"s": "a" * 1000, "t": "b" * 1000},
         "replace would make 1002000 characters"),
        ("{record.items | join(record.sep)}", {"items": list(range(1002)), "sep": "-" * 1000},
         "join's separators would make 1001000"),
        ("{record.fmt % record}", {"fmt": "%(a)s" * 2000, "a": "y" * 1000},
         "'%' would make "),
        ("{record.items | translate({'a': 'y' * 1000}) | join}", {"items": ["a"] * 2000},
         "translate would make "),
        ("{record.s | escape(record.c, record.e)}", {"s": "a" * 1000, "c": "a",
                                                    "e": "b" * 2000},
         "escape would make 2001000 characters"),
        ("{[record.items] * 100}", {"items": ["y" * 100] * 1000},
         "'*' would make 100"),
    ],
)
def test_an_operation_over_a_bound_at_run_time_is_an_error_naming_the_field(
        template: str, record: dict[str, Any], message: str) -> None:
    """The same operations on values from a record or an answer fail when evaluated, as
    a mapping error naming the template's field, before the value is made."""
    compiled = compile_text(template, NAMES, native=True, label="crm.records.0.body")
    with pytest.raises(CrmMappingError) as failed:
        compiled({"record": record})
    assert str(failed.value).startswith(
        "template crm.records.0.body failed: BoundExceeded: ")
    assert message in str(failed.value)


def test_arithmetic_and_formats_within_the_bounds_still_work() -> None:
    """Ordinary arithmetic, repetition and formats are unchanged: the bounds are far
    above what a request or a field map needs."""
    assert value("{record.talk_s * 1000}", record={"talk_s": 4.5}) == 4500.0
    assert value("{2 ** 10}") == 1024
    assert value("{'-' * 3}") == "---"
    assert value("{record.n % 7}", record={"n": 23}) == 2
    assert value("{'%05.1f s' % record.x}", record={"x": 3.14159}) == "003.1 s"
    assert value("{'%(a)s-%(b)s' % record}", record={"a": 1, "b": 2}) == "1-2"
    assert value("{record.s | replace('a', 'bb')}", record={"s": "aXa"}) == "bbXbb"
    assert value("{last(3)}", last=lambda n: "123"[-n:]) == "123"
    assert value("{'%(name)s' % record}", record={"name": "Ann", "notes": "x" * 2_000_000}
                 ) == "Ann"
    assert value("{'%s' % record.s}", record={"s": "x" * 2_000_000}) == "x" * 2_000_000
    assert value("{record.tags | translate({'a': 'A'}) | join(',')}",
                 record={"tags": ["a", "b"]}) == "A,b"
    assert value("{record.s | escape('(),')}", record={"s": "(0)20 7183, 8751"}
                 ) == "\\(0\\)20 7183\\, 8751"


def test_escape_puts_the_escape_once_before_each_character() -> None:
    """escape escapes each character of the text once, however often ``chars`` repeats
    it or the escape holds it: a repeated or self-escaping list used to compound, each
    pass escaping the last one's escapes (3**12 times the text for twelve 'a's and 'aa'),
    and a literal one hung ``callroute check`` in Jinja's constant folding."""
    assert value("{record.s | escape('aaaaaaaaaaaa', 'aa')}", record={"s": "a"}) == "aaa"
    assert value("{record.s | escape('((', '#')}", record={"s": "(#"}) == "#(##"


def test_check_refuses_a_literal_over_a_bound_naming_the_field(tmp_path: Path) -> None:
    """``callroute check`` (load_settings) of a record step whose body repeats a text a
    billion times fails at once with the field named, instead of building a gigabyte."""
    config = tmp_path / "config.yaml"
    config.write_text("crm:\n  records: [{name: call, url: /c, body: {n: \"{'x' * 10**9}\"}}]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "crm.records.0.body" in str(info.value)
    assert "'*' would make 1.0e+09 characters" in str(info.value)


def test_a_failed_evaluation_names_the_template_and_masks_the_values() -> None:
    """Values a template cannot work with (text where it needs a number) fail as a
    CrmMappingError naming the template's field, personal data in the reason masked."""
    template = compile_text("{record.name | truncate(record.phone)}", NAMES, label="crm.x.y")
    with pytest.raises(CrmMappingError) as failed:
        template({"record": {"name": "Ada", "phone": "+1 415 555 0199"}})
    assert str(failed.value).startswith("template crm.x.y failed: ValueError: ")
    assert "555" not in str(failed.value)
    assert "***99" in str(failed.value)
    assert template({"record": {"name": "Ada", "phone": "2"}}) == "Ad"
    unlabelled = compile_text("{record.a + 1}", NAMES)
    with pytest.raises(CrmMappingError, match=r"template '\(\(record.a \+ 1\)\|_text\)' "
                                              "failed: TypeError"):
        unlabelled({"record": {"a": "x"}})


def test_every_filter_takes_none_calmly() -> None:
    """No filter raises on none (a field the CRM left out)."""
    needs = {"translate": "({})", "pluck": "('x')", "where": "('x')", "regex": "('x')",
             "escape": "('x')", "replace": "('a', 'b')", "truncate": "(3)",
             "strftime": "('%Y')", "ref": "('t')"}
    for name in FILTERS:
        template = compile_text(f"{{record.none | {name}{needs.get(name, '')}}}", NAMES,
                                native=True)
        template({"record": {}})


@pytest.mark.parametrize(
    ("crm_yaml", "field", "message"),
    [
        ("records: [{name: call, url: /c, body: {s: '{record.start | epoch_mss}'}}]",
         "crm.records.0.body", "s: unknown filter 'epoch_mss'"),
        ("records: [{name: call, url: /c, when: 'customer.id is emptyy'}]",
         "crm.records.0.when", "unknown test 'emptyy'"),
        ("records: [{name: call, url: /c, fields: {properties.x: '{record.caller'}}]",
         "crm.records.0.fields", "properties.x"),
        ("records: [{name: call, url: /c, outputs: {x: '{responce.id}'}}]",
         "crm.records.0.outputs", "unknown name 'responce'"),
        ("records: [{name: call, url: /c, customer: {boss: '{id}'}}]",
         "crm.records.0.customer", "unknown customer field 'boss'"),
        ("lookups: [{steps: [{url: /c, params: {q: '{e164 | lower}'}}, {url: '/c/{item.id}',"
         " numbers: ['{record.phone | nope}']}]}]",
         "crm.lookups.0.steps.1.numbers", "unknown filter 'nope'"),
        ("lookups: [{fields: {name: '{record.first} {record.lats | upper'}}]",
         "crm.lookups.0.fields", "name: unbalanced brace"),
        ("lookups: [{fields: {tags: '{record.tag_ids | ref(\"tags\")}'}}]",
         "crm", "ref('tags') is not in crm.refs"),
        ("records: [{name: call, url: /c, body: {o: \"{record.outcome | translate('x')}\"}}]",
         "crm", "translate('x') is not in crm.maps"),
        ("refs: {t: {url: '/t/{key}', value: '{respons.name}'}}",
         "crm.refs.t.value", "unknown name 'respons'"),
        ("timezone: Mars/Olympus", "crm.timezone", "unknown time zone"),
        ("preset: nosuchcrm", "crm", "no such preset"),
        ("lookups: [{name: a, steps: [{url: /a}]}, {name: a, steps: [{url: /b}]}]",
         "crm", "names must be unique"),
    ],
)
def test_check_names_the_field_of_a_template_mistake(
        tmp_path: Path, crm_yaml: str, field: str, message: str) -> None:
    """``callroute check`` (load_settings) fails with the field and the problem named."""
    config = tmp_path / "config.yaml"
    config.write_text("crm:\n  " + crm_yaml + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert field in str(info.value)
    assert message in str(info.value)
