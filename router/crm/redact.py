"""What a CRM said in an error answer, made safe to keep: compact, short, masked (no I/O).

A 4xx from a CRM usually explains itself in its body: HubSpot's ``errors[].message``,
Salesforce's ``[{"errorCode": ..., "fields": [...]}]``, Zoho's ``data[].details``.
:func:`summarize_body` keeps that text for the log line, the dead letter and ``outbox
list``, after:

- masking secrets: the configured credentials wherever they appear, ``Bearer ...``
  values, and the values of keys named like secrets (``token``, ``password``,
  ``client_secret``, ``authorization``, ...);
- masking personal data: values of keys named like contact data (``phone``, ``email``,
  ``name``, ...), e-mail addresses (``***@domain``) and phone numbers in free text
  (``+`` numbers, numbers written with separators, runs of 10+ digits: ``***99``,
  the last two digits kept to tell records apart); record ids (keys ending in ``id``)
  stay, they are what an engineer needs;
- compacting JSON (no spaces) or whitespace, and truncating to ``limit`` characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any, Final

MASK: Final = "***"
DEFAULT_LIMIT: Final = 400

_SECRET_KEY = re.compile(
    r"(pass(word)?|secret|token|authorization|api[_-]?key|apikey|session|cookie|signature)",
    re.IGNORECASE,
)
_PII_KEY = re.compile(r"(phone|mobile|fax|e-?mail|address|street|birth)", re.IGNORECASE)
#: Keys holding a person's name (``api_name``, ``propertyName``: a field's name, kept).
_NAME_KEYS = frozenset({"name", "fullname", "firstname", "lastname", "middlename",
                        "displayname", "contactname", "callername", "salutation"})
_ID_KEY = re.compile(r"id$", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer|Basic|Zoho-oauthtoken)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")
# a + number, a number written with separators (7+ digits), or a bare run of 10+ digits
_PHONE = re.compile(
    r"(?<![\w.])(\+\d[\d ()./-]{5,}\d|\(?\d{2,5}\)?(?:[ .-]\(?\d{2,5}\)?){1,5}|\d{10,})(?![\w])"
)
_SPACES = re.compile(r"\s+")
_TAGS = re.compile(r"<[^>]{0,200}>")


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = [c for c in text if c.isdigit()]
    if len(digits) < 7:
        return text
    return MASK + "".join(digits[-2:])


def _secrets(text: str, secrets: Collection[str]) -> str:
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def mask_text(text: str, secrets: Collection[str] = ()) -> str:
    """``text`` with secrets, ``Bearer`` values, e-mail addresses and phone numbers masked."""
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", _secrets(text, secrets))
    text = _EMAIL.sub(lambda m: f"{MASK}@{m.group(1)}", text)
    return _PHONE.sub(_phone, text)


def mask_json(value: Any, secrets: Collection[str] = (), key: str = "") -> Any:
    """A copy of a JSON document with secret and personal values masked (see the module)."""
    if isinstance(value, dict):
        return {k: mask_json(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_json(v, secrets, key) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if key and not _ID_KEY.search(key) and (
            _SECRET_KEY.search(key) or _PII_KEY.search(key)
            or key.lower().replace("_", "").replace("-", "") in _NAME_KEYS):
        return MASK
    if isinstance(value, str):
        return value if key and _ID_KEY.search(key) else mask_text(value, secrets)
    return value


def summarize_body(
    raw: bytes | str | None, secrets: Collection[str] = (), limit: int = DEFAULT_LIMIT
) -> str:
    """The CRM's error body as one safe line (empty when there is none)."""
    if not raw:
        return ""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip()
    if not text:
        return ""
    try:
        doc = json.loads(text)
        line = json.dumps(mask_json(doc, secrets), separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to walk
        if text.startswith("<"):  # an HTML error page or a SOAP fault: its words only
            text = _TAGS.sub(" ", text)
        line = mask_text(_SPACES.sub(" ", text).strip(), secrets)
    else:
        # a configured secret may also sit inside an id or a number
        line = _secrets(line, secrets)
    return line if len(line) <= limit else line[: max(0, limit - 1)] + "…"


__all__ = ["MASK", "mask_json", "mask_text", "summarize_body"]
