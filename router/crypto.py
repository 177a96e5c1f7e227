"""Encryption at rest: AES-256-GCM for the customer data callroute stores.

What is encrypted: cached customer records in Redis (``router.lookup.cache``), call
records in the outbox's streams and retry set (``router.records.outbox``, read back by
``router.records.delivery``) and the files of the disk spool (``router.records.spool``).
Redis keys are not: they already carry keyed hashes of numbers, never the numbers.

Keys come from the settings (``encryption.keys`` / ``encryption.keys_file``, usually
``${CALLROUTE_KEYS}`` or a mounted secret): a list of ``<id>:<base64 of 32 bytes>``
separated by commas or new lines. The first is the *current* key: every new value is
written with it. The others stay readable, so rotation is: put a new key first, restart
(or reload) the service, run ``callroute keys rotate`` (re-encrypts the outbox and the
spool; cached entries expire by themselves within ``positive_ttl_s + stale_max_age_s``),
and drop the old key once ``callroute keys status`` shows nothing under it.
``callroute keys generate`` prints a fresh key line.

Encryption is on when a key is configured and off otherwise (``callroute check`` and
``serve`` warn when it is off). A value is ``enc1:<key id>:<base64url(nonce | ciphertext |
tag)>`` (a 96-bit random nonce per value); the associated data binds it to where it is
stored (the cache key, the record key), so a value copied under another key does not
decrypt. Values written before encryption was turned on (plain JSON) are still read;
an encrypted value with an unknown key id, or altered, is a
:class:`~router.errors.CryptoError`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from router.errors import ConfigError, CryptoError

PREFIX = "enc1:"
BPREFIX = PREFIX.encode()
NONCE_BYTES = 12
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class KeyRing:
    """The keys in force: the current one encrypts, every one decrypts."""

    def __init__(self, keys: Mapping[str, bytes] | None = None, current: str | None = None
                 ) -> None:
        self._aead: dict[str, AESGCM] = {}
        for key_id, key in (keys or {}).items():
            if not KEY_ID.match(key_id):
                raise ConfigError(f"key id {key_id!r}: letters, digits and _.- only, at most "
                                  "32", location="encryption.keys")
            if len(key) != 32:
                raise ConfigError(f"key {key_id!r} is {len(key)} bytes; AES-256 needs 32",
                                  location="encryption.keys")
            self._aead[key_id] = AESGCM(key)
        if current is not None and current not in self._aead:
            raise ConfigError(f"current key {current!r} is not among the keys",
                              location="encryption.keys")
        self.current = current if current is not None else next(iter(self._aead), None)
        self._prefix = f"{PREFIX}{self.current}:" if self.current else ""

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """``id:base64, id:base64`` (or one per line; ``#`` comments); the first is current."""
        keys: dict[str, bytes] = {}
        for raw in re.split(r"[,\n]", text):
            item = raw.split("#", 1)[0].strip()
            if not item:
                continue
            key_id, sep, encoded = item.partition(":")
            if not sep:
                raise ConfigError("each key is <id>:<base64 of 32 bytes>",
                                  location="encryption.keys")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ConfigError(f"key {key_id.strip()!r} is not base64",
                                  location="encryption.keys") from exc
            if key_id.strip() in keys:
                raise ConfigError(f"key id {key_id.strip()!r} given twice",
                                  location="encryption.keys")
            keys[key_id.strip()] = key
        return cls(keys)

    @property
    def enabled(self) -> bool:
        """Whether new values are encrypted (a key is configured)."""
        return self.current is not None

    @property
    def key_ids(self) -> list[str]:
        """Every key id, the current one first."""
        return list(self._aead)

    # --- text values (outbox fields, spool files) -----------------------------------------
    def seal(self, plain: str, context: str) -> str:
        """``plain`` encrypted with the current key, bound to ``context`` (unchanged when
        encryption is off)."""
        if self.current is None:
            return plain
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[self.current].encrypt(nonce, plain.encode(), context.encode())
        return self._prefix + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, value: str, context: str) -> str:
        """The plaintext of a :meth:`seal` value (plain values pass through)."""
        if not value.startswith(PREFIX):
            return value
        key_id, _, body = value[len(PREFIX):].partition(":")
        try:
            blob = base64.urlsafe_b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise CryptoError("an encrypted value is not base64") from exc
        return self._decrypt(key_id, blob, context).decode()

    # --- byte values (the cache) -----------------------------------------------------------
    def seal_bytes(self, plain: bytes, context: bytes) -> bytes:
        """``plain`` encrypted with the current key, bound to ``context``."""
        if self.current is None:
            return plain
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead[self.current].encrypt(nonce, plain, context)
        return self._prefix.encode() + base64.urlsafe_b64encode(nonce + sealed)

    def open_bytes(self, value: bytes, context: bytes) -> bytes:
        """The plaintext of a :meth:`seal_bytes` value (plain values pass through)."""
        if not value.startswith(BPREFIX):
            return value
        key_id, _, body = value[len(BPREFIX):].partition(b":")
        try:
            blob = base64.urlsafe_b64decode(body)
        except (binascii.Error, ValueError) as exc:
            raise CryptoError("an encrypted value is not base64") from exc
        return self._decrypt(key_id.decode(errors="replace"), blob, context)

    def _decrypt(self, key_id: str, blob: bytes, context: str | bytes) -> bytes:
        aead = self._aead.get(key_id)
        if aead is None:
            raise CryptoError(f"value encrypted with key {key_id!r}, which is not configured")
        if len(blob) < NONCE_BYTES + 16:
            raise CryptoError("an encrypted value is too short")
        aad = context.encode() if isinstance(context, str) else context
        try:
            return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise CryptoError(f"a value under key {key_id!r} does not decrypt (altered, or "
                              "stored under another name)") from exc


def seal_json(crypto: KeyRing, data: Mapping[str, Any], context: str) -> str:
    """``data`` as compact JSON, sealed for ``context`` (the Redis key, or key and field,
    it is stored under): the one way the pages' rows, held records and dispositions and
    the saved states of calls in progress are written."""
    return crypto.seal(json.dumps(data, ensure_ascii=False, separators=(",", ":")), context)


def open_json(crypto: KeyRing, raw: str | bytes, context: str) -> dict[str, Any]:
    """The JSON object :func:`seal_json` sealed as ``raw`` for ``context``; ValueError
    saying why when it is no UTF-8 text, does not decrypt, is not JSON (or is nested too
    deeply to read) or is not an object. The reason does not repeat ``context``: the
    caller's log line names what was read."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as exc:
        raise ValueError("is not UTF-8 text") from exc
    try:
        text = crypto.open(text, context)
    except CryptoError as exc:
        raise ValueError(f"does not decrypt: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("is not JSON") from None
    except RecursionError:
        raise ValueError("is JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    return data


def key_id_of(value: str | bytes) -> str | None:
    """The key id an encrypted value names (None: not encrypted)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if not text.startswith(PREFIX):
        return None
    return text[len(PREFIX):].partition(":")[0]


def generate_key_line(key_id: str | None = None) -> str:
    """A fresh ``<id>:<base64>`` line (id: ``k`` and 8 random hex digits by default)."""
    key_id = key_id or f"k{secrets.token_hex(4)}"
    if not KEY_ID.match(key_id):
        raise ConfigError(f"key id {key_id!r}: letters, digits and _.- only, at most 32")
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def keyring_from_settings(settings: Any) -> KeyRing:
    """The key ring of ``settings.encryption`` (empty, so off, when no key is set)."""
    section = getattr(settings, "encryption", None)
    if section is None:
        return KeyRing()
    text = section.keys.get_secret_value()
    return KeyRing.parse(text) if text.strip() else KeyRing()
