"""JSON objects the pages keep in Redis, sealed for the key (or key and field) they are
stored under (:mod:`router.crypto`; plain JSON when no key is configured).

The one way held records, dispositions, kept copies, the calls awaiting a disposition
and the history rows are written and read: compact JSON, encrypted and bound to where
it is stored, so a value moved under another key does not open.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from router.crypto import KeyRing
from router.errors import CryptoError


def seal_json(crypto: KeyRing, data: Mapping[str, Any], context: str) -> str:
    """``data`` as compact JSON, sealed for ``context``."""
    return crypto.seal(json.dumps(data, ensure_ascii=False, separators=(",", ":")), context)


def open_json(crypto: KeyRing, raw: str | bytes, context: str) -> dict[str, Any]:
    """The JSON object sealed as ``raw`` for ``context``; ValueError, saying why, when it
    does not decrypt or is not a JSON object."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        text = crypto.open(text, context)
    except CryptoError as exc:
        raise ValueError(f"{context} does not decrypt: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{context} is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{context} is not a JSON object")
    return data
