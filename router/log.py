"""Logging with per-call context, and personal data masked in every line.

Every log line written while a call is being handled carries that call's id
(the AGI ``uniqueid`` or the AMI ``Linkedid``) through a context variable, the way
structlog's contextvars integration does, without requiring callers to pass it.

A task or callback inherits the context it is created in: work started from inside a
call that serves every call afterwards (a shared Redis batch, the invalidation feed, a
queued cache write) must be started in :func:`detached` context, or all its log lines
carry the id of whichever call happened to start it.

Masking works at two depths, on by default:

1. Where callroute itself puts personal data into a message, it masks it there:
   :func:`mask_number` (``+8613800138000`` -> ``+86138****8000``), :func:`mask_name`
   (``Li Lei`` -> ``L.L.``), :func:`mask_url` (credentials and secret query
   parameters -> ``***``), :func:`mask_record` (a call record or customer: the known
   fields of numbers, names and URLs); :func:`mask_stored` for error text kept in
   Redis (a dead letter's): a record's own numbers and names wherever they appear;
   within :func:`bind_personal` (a record being delivered) every log line masks them too.
2. Every log record, whoever logs it (aiohttp, redis, a traceback), is masked when it
   is created (a log record factory, so every handler gets the masked text):
   :func:`mask_text` replaces phone-shaped digit runs (``+`` or ``%2B`` and 7-15
   digits; Chinese mobiles ``1[3-9]`` + 9 digits; trunk-prefixed ``0`` + 9-11 digits;
   any run of 11-15 digits) and URL credentials, in the message and in the traceback.

``log_personal_data: true`` (a debugging switch) turns both off and says so with a
WARNING at start-up.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, TextIO

call_id: ContextVar[str] = ContextVar("call_id", default="-")

FORMAT = "%(asctime)s %(levelname)-7s %(name)s [call=%(call_id)s] %(message)s"


class CallContextFilter(logging.Filter):
    """Adds ``record.call_id`` from the current context to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.call_id = call_id.get()
        return True


@contextlib.contextmanager
def bind_call(value: str) -> Iterator[None]:
    """Within the block, every log line carries ``call=<value>``."""
    token = call_id.set(value)
    try:
        yield
    finally:
        call_id.reset(token)


def detached() -> contextvars.Context:
    """A copy of the current context with no call bound, to start shared background work
    in: ``loop.create_task(coro, context=detached())``."""
    context = contextvars.copy_context()
    context.run(call_id.set, "-")
    return context


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of each record (so a replaced or
    captured stderr never leaves the handler writing to a closed file)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


# --- masking of personal data -----------------------------------------------------------
_show_personal_data = False

#: Phone-shaped digit runs (see the module docstring); group 1: a ``+``/``%2B`` prefix.
_PHONE = re.compile(
    r"(\+|%2[Bb])(\d{7,15})(?!\d)"
    r"|(?<![\d.])(0\d{9,11}|1[3-9]\d{9}|\d{11,15})(?!\d)")
_URL_CREDENTIALS = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@:]*(?::[^/\s@]*)?@")
_SECRET_PARAMS = re.compile(
    r"([?&;](?:access_token|token|api_?key|key|password|passwd|secret|signature|sig|"
    r"auth|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&;#\s]+", re.IGNORECASE)
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_WORD = re.compile(r"\w+")
#: A caller id string: ``"Li Lei" <13800138000>``.
_CALLERID = re.compile(r'"([^"]*)"(\s*<)')

#: Fields of records and customers that hold numbers, names or URLs.
NUMBER_FIELDS = frozenset({"caller", "caller_raw", "number", "e164", "phone", "phones",
                           "callerid", "callerid_num", "src", "source", "calleridnum",
                           "connectedlinenum", "dst"})
NAME_FIELDS = frozenset({"caller_name", "name", "customer_name", "calleridname",
                         "connectedlinename", "clid"})
URL_FIELDS = frozenset({"recording", "recording_url", "url"})


def personal_data_shown() -> bool:
    """Whether the debugging switch (``log_personal_data``) turned masking off."""
    return _show_personal_data


def _mask_digits(digits: str) -> str:
    n = len(digits)
    if n < 7:
        return digits
    return digits[:max(0, n - 8)] + "****" + digits[-4:]


#: A number as typed: digits with spaces, brackets, dashes, dots or slashes between.
_TYPED_NUMBER = re.compile(r"\+?[\d\s().\-/]+")


def _mask_typed(value: str) -> str:
    """A number as typed with the same digits hidden as :func:`_mask_digits` hides, its
    separators kept: ``+1 (415) 555-0199`` -> ``+1 (41*) ***-0199``."""
    n = sum(c.isdigit() for c in value)
    if n < 7:
        return value
    first, last = max(0, n - 8), n - 4
    out, seen = [], 0
    for c in value:
        if c.isdigit():
            out.append("*" if first <= seen < last else c)
            seen += 1
        else:
            out.append(c)
    return "".join(out)


def mask_number(value: str | None) -> str:
    """``+8613800138000`` -> ``+86138****8000``, ``13800138000`` -> ``138****8000``: the
    four digits before the last four hidden (numbers of fewer than 7 digits, such as
    extensions, stay); a number as typed keeps its separators (``+1 (415) 555-0199`` ->
    ``+1 (41*) ***-0199``). Anything else is masked as text."""
    if not value:
        return value or ""
    if _show_personal_data:
        return value
    plus = value.startswith("+")
    digits = value[1:] if plus else value
    if digits.isdigit():
        return ("+" if plus else "") + _mask_digits(digits)
    if _TYPED_NUMBER.fullmatch(value):
        return _mask_typed(value)
    return mask_text(value)


def mask_name(value: str | None) -> str:
    """A person's name shortened to initials: ``Li Lei`` -> ``L.L.``, ``王伟`` -> ``王*``."""
    if not value:
        return value or ""
    if _show_personal_data:
        return value
    return _initials(value)


def _initials(value: str) -> str:
    parts = []
    for word in _WORD.findall(value):
        if _CJK.match(word):
            parts.append(word[0] + "*" * min(len(word) - 1, 3))
        else:
            parts.append(word[0] + ".")
    return "".join(parts) or "*"


def mask_url(value: str | None) -> str:
    """A URL with its credentials (``user:password@``) and secret query parameters
    (``token=``, ``key=``, ``signature=``, ...) replaced by ``***``. Never switched off:
    credentials are not personal data to debug with."""
    if not value:
        return value or ""
    value = _URL_CREDENTIALS.sub(r"\1***@", value)
    return _SECRET_PARAMS.sub(r"\1***", value)


#: Cheap first look: a line without 7 digits in a row holds no phone number.
_SEVEN_DIGITS = re.compile(r"\d{7}")


def _may_hold_url(text: str) -> bool:
    return "://" in text or ("=" in text and ("?" in text or "&" in text or ";" in text))


def mask_text(text: str) -> str:
    """Free text with phone-shaped numbers masked (see the module docstring) and URL
    credentials removed. A line with neither costs two substring tests and one short
    scan (it runs on every log record)."""
    if _may_hold_url(text):
        text = mask_url(text)
    if _show_personal_data or _SEVEN_DIGITS.search(text) is None:
        return text
    return _PHONE.sub(_phone_sub, text)


#: A number as written in free text: digits with separators between them.
_WRITTEN_NUMBER = re.compile(r"\d[\d\s().\-/]*\d")
#: A number's digits without separators.
_DIGIT_RUN = re.compile(r"\d{7,}")
#: How many last digits of a record's number identify it in a text (its national form).
_MIN_TAIL = 7


class KnownValues:
    """Masks one record's own numbers and names wherever they appear in a text: a
    number in any spelling (E.164, national, spaced, bracketed: digits ending with the
    same 7 digits as the record's), a name in any case (as a whole word, but for CJK
    written without spaces). For what a CRM echoes back of what it was sent. Free to
    make: the record is read, and its names' pattern compiled, on first use."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self._record: Mapping[str, Any] | None = record
        self._tails: set[str] = set()
        self._names: list[str] = []
        self._pattern: re.Pattern[str] | None = None

    def __call__(self, text: str) -> str:
        """``text`` with the record's numbers and names masked."""
        if self._record is not None:
            numbers, names = _personal_values(self._record)
            self._record = None
            self._tails = {"".join(c for c in n if c.isdigit())[-_MIN_TAIL:]
                           for n in numbers}
            self._names = sorted(names, key=len, reverse=True)
        if self._tails:
            text = _WRITTEN_NUMBER.sub(self._number, text)
            text = _DIGIT_RUN.sub(self._number, text)  # one ending a longer written run
        if self._names:
            if self._pattern is None:
                words = []
                for name in self._names:
                    before = "" if _CJK.match(name[0]) else r"(?<!\w)"
                    after = "" if _CJK.match(name[-1]) else r"(?!\w)"
                    words.append(before + re.escape(name) + after)
                self._pattern = re.compile("|".join(words), re.IGNORECASE)
            text = self._pattern.sub(lambda m: _initials(m.group(0)), text)
        return text

    def _number(self, match: re.Match[str]) -> str:
        """A written run of digits with the record's numbers in it masked: each part of
        it that ends (at the end of a group of digits) with one's last digits, so one
        followed by another number ('415 555 0100 2 matches') is masked too."""
        written = match.group(0)
        out: list[str] = []
        start, digits = 0, ""
        for i, c in enumerate(written):
            if not c.isdigit():
                continue
            digits += c
            ends_group = i + 1 == len(written) or not written[i + 1].isdigit()
            if ends_group and len(digits) >= _MIN_TAIL and digits[-_MIN_TAIL:] in self._tails:
                out.append(_mask_typed(written[start:i + 1]))
                start, digits = i + 1, ""
        out.append(written[start:])
        return "".join(out)


#: The record whose own numbers and names every log line masks too (bind_personal).
_known: ContextVar[KnownValues | None] = ContextVar("known_values", default=None)


@contextlib.contextmanager
def bind_personal(record: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, every log line also masks ``record``'s own numbers and names
    (:class:`KnownValues`), whoever logs it: a CRM connector logging an error body that
    echoes the caller back, say, while the record is delivered."""
    token = _known.set(KnownValues(record))
    try:
        yield
    finally:
        _known.reset(token)


def mask_stored(text: str, record: Mapping[str, Any] | None = None) -> str:
    """Text kept in Redis that others read later (a dead letter's or a retry's last
    error, as ``outbox list`` shows it): ``record``'s own numbers and names masked
    wherever they appear in it (:class:`KnownValues`), then every other phone-shaped
    number and URL credentials, as in log lines. Always masked: ``log_personal_data``
    is about logs, not stored data."""
    if record is not None:
        text = KnownValues(record)(text)
    return _PHONE.sub(_phone_sub, mask_url(text))


def _personal_values(data: Any, key: str = "") -> tuple[set[str], set[str]]:
    """The numbers and names among the known fields of a record (nested ones too)."""
    numbers: set[str] = set()
    names: set[str] = set()
    if isinstance(data, Mapping):
        for k, v in data.items():
            more_numbers, more_names = _personal_values(v, str(k).lower())
            numbers |= more_numbers
            names |= more_names
    elif isinstance(data, list | tuple):
        for v in data:
            more_numbers, more_names = _personal_values(v, key)
            numbers |= more_numbers
            names |= more_names
    elif isinstance(data, str):
        quoted = _CALLERID.search(data)  # "Li Lei" <13800138000>
        if quoted is not None and quoted.group(1).strip():
            names.add(quoted.group(1).strip())
            numbers.add(data[quoted.end():])
        elif key in NAME_FIELDS and len(data.strip()) >= 2:
            names.add(data.strip())
        elif key in NUMBER_FIELDS:
            numbers.add(data)
    return ({n for n in numbers if sum(c.isdigit() for c in n) >= _MIN_TAIL}, names)


def _phone_sub(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return match.group(1) + _mask_digits(match.group(2))
    return _mask_digits(match.group(3))


def mask_record(data: Any, key: str = "") -> Any:
    """A copy of a record, customer or any JSON-like tree with the known fields of
    numbers, names and URLs masked, and every other string masked as text."""
    if isinstance(data, Mapping):
        return {k: mask_record(v, str(k).lower()) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [mask_record(v, key) for v in data]
    if not isinstance(data, str):
        return data
    if key in URL_FIELDS:
        return mask_url(data)
    if _show_personal_data:
        return data
    if '"' in data:
        data = _CALLERID.sub(lambda m: f'"{mask_name(m.group(1))}"{m.group(2)}', data)
    if key in NAME_FIELDS and "<" not in data:
        return mask_name(data)
    if key in NUMBER_FIELDS:
        return mask_number(data)
    return mask_text(data)


_base_factory = logging.getLogRecordFactory()
_formatter = logging.Formatter()


def _masking_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    if _show_personal_data:
        return record
    try:
        message = record.getMessage()
    except Exception:
        return record  # logging reports the bad format string itself, unmasked args aside
    masked = mask_text(message)
    known = _known.get()
    if known is not None:
        masked = known(masked)
    if masked is not message:
        record.msg, record.args = masked, None
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = mask_text(_formatter.formatException(record.exc_info))
        if known is not None:
            record.exc_text = known(record.exc_text)
    if record.stack_info:
        record.stack_info = mask_text(record.stack_info)
    return record


def install_masking(show_personal_data: bool = False) -> None:
    """Mask every log record from now on (or, with ``show_personal_data``, none)."""
    global _show_personal_data
    _show_personal_data = show_personal_data
    if logging.getLogRecordFactory() is not _masking_factory:
        logging.setLogRecordFactory(_masking_factory)


def make_handler(stream: TextIO | None = None) -> logging.Handler:
    """The handler callroute logs with: one line per event, with the call id (to
    ``stream``, or to whatever ``sys.stderr`` is at each record)."""
    handler: logging.Handler = StderrHandler() if stream is None else \
        logging.StreamHandler(stream)
    handler.addFilter(CallContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def setup(level: str = "INFO", *, show_personal_data: bool = False) -> None:
    """Configure the root logger once: one line per event, with the call id.

    The record fields our format does not print (caller's file and line, thread and
    process names) are not collected: finding the caller walks the stack on every line,
    and a call logs one line (the logging HOWTO's "Optimization" section)."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.setLevel(level.upper())
    install_masking(show_personal_data)
    if not any(isinstance(f, CallContextFilter) for h in root.handlers for f in h.filters):
        root.addHandler(make_handler())
    if show_personal_data:
        logging.getLogger("router").warning(
            "log_personal_data is on: phone numbers and names are NOT masked in this log; "
            "turn it off once done debugging")
