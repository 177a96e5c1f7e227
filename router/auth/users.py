"""Users, their tokens, and "whose token is this" answered without leaking anything.

A user has a name, a :class:`~router.auth.roles.Role`, an agent id (agents only) and one
token. Tokens are made here (``crt_<id>_<secret>``: 6 random bytes of id in hex, 32 of
secret) and shown once; what is stored is the id and an scrypt hash of the whole token
(:func:`hash_token`, ``hashlib.scrypt``: n=2**14, r=8, p=1, a 16-byte salt), compared
with :func:`hmac.compare_digest`. The id only says which stored hash to check: a token
with an unknown id costs the same scrypt as a wrong one.

Where users live (:class:`UserStore`): a Redis hash (``<prefix>users``, with a version
counter the instances poll) or, with ``auth.users_file``, a JSON file (mode 0600).
``callroute users add|list|disable|enable|role|rotate`` edits them (:mod:`router.auth.users_cli`).

The service keeps a :class:`Directory` in memory, refreshed from the store every
``auth.refresh_s`` (a disabled user or a rotated token stops working within that
time), so a request costs no Redis round trip. A token verified once is remembered
(keyed by an HMAC of it under a per-process key, along with the user's stamp), so only
the first request of a token pays the scrypt; scrypt runs in a worker thread, at most
two at once, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.auth.roles import Principal, Role
from router.errors import AuthError
from router.keys import Keys

log = logging.getLogger(__name__)

TOKEN_PREFIX = "crt"  # noqa: S105 - the tokens' visible prefix, not a secret
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
#: scrypt's memory is 128 * n * r bytes (16 MiB here); OpenSSL wants a little headroom.
SCRYPT_MAXMEM = 128 * SCRYPT_N * SCRYPT_R * 2
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: Tokens remembered as verified (per process).
MEMO_SIZE = 4096


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_token(token: str, *, salt: bytes | None = None,
               n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`` of ``token`` (slow on purpose)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                            maxmem=max(SCRYPT_MAXMEM, 128 * n * r * 2))
    return f"scrypt${n.bit_length() - 1}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_token(token: str, stored: str) -> bool:
    """Whether ``token`` matches the :func:`hash_token` string ``stored`` (constant time
    in the token; False for a malformed ``stored``)."""
    try:
        scheme, log_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        again = hash_token(token, salt=base64.b64decode(salt), n=2 ** int(log_n),
                           r=int(r), p=int(p))
    except ValueError:
        return False
    return hmac.compare_digest(base64.b64decode(again.rsplit("$", 1)[1]), expected)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when a token names no known id, so that costs what a wrong one
    does (made on first need: an import costs no scrypt)."""
    return hash_token("crt_000000000000_not-a-token", salt=b"\0" * 16)


def new_token() -> tuple[str, str]:
    """``(token_id, token)``: a fresh random token and the id it carries."""
    token_id = secrets.token_hex(6)
    return token_id, f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def token_id_of(token: str) -> str | None:
    """The id part of a ``crt_<id>_<secret>`` token (None for anything else)."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or len(token_id) != 12 or not secret:
        return None
    return token_id


@dataclass(frozen=True, slots=True)
class User:
    """One stored user (never holds the token itself)."""

    name: str
    role: Role
    token_id: str
    token_hash: str
    agent: str | None = None
    disabled: bool = False
    created: float = 0.0
    changed: float = 0.0

    @property
    def principal(self) -> Principal:
        """Who requests with this user's token are."""
        return Principal(self.name, self.role, self.agent if self.role is Role.AGENT else None)

    @property
    def stamp(self) -> str:
        """Changes whenever the token, role, agent id or state change: sign-in sessions
        carry it, so any such change ends them."""
        text = f"{self.token_hash}|{self.role}|{self.agent}|{self.disabled}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> User:
        """Read the stored form (AuthError when it is not one)."""
        try:
            doc = json.loads(text)
            return cls(name=str(doc["name"]), role=Role(doc["role"]),
                       token_id=str(doc["token_id"]), token_hash=str(doc["token_hash"]),
                       agent=doc.get("agent"), disabled=bool(doc.get("disabled", False)),
                       created=float(doc.get("created", 0)), changed=float(doc.get("changed", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"unreadable stored user: {exc}") from exc

    def public(self) -> dict[str, Any]:
        """What ``users list`` shows (no hash, no token id)."""
        return {"name": self.name, "role": str(self.role), "agent": self.agent,
                "disabled": self.disabled, "created": self.created, "changed": self.changed}


def check_user(name: str, role: Role, agent: str | None) -> None:
    """Raise AuthError for a bad name, or an agent without an agent id (and vice versa)."""
    if not NAME.match(name):
        raise AuthError(f"user name {name!r}: letters, digits and _.@- only, at most 64")
    if role is Role.AGENT and not agent:
        raise AuthError(f"user {name!r} has the agent role: give its agent id (--agent)")
    if role is not Role.AGENT and agent:
        raise AuthError(f"user {name!r}: only the agent role is bound to an agent id")


def make_user(name: str, role: Role, agent: str | None = None,
              now: float | None = None) -> tuple[User, str]:
    """A new user with a fresh token: ``(user, token)`` (the token is shown once)."""
    check_user(name, role, agent)
    token_id, token = new_token()
    stamp = time.time() if now is None else now
    return User(name, role, token_id, hash_token(token), agent, False, stamp, stamp), token


def rotated(user: User, now: float | None = None) -> tuple[User, str]:
    """The user with a fresh token (the old one stops working)."""
    token_id, token = new_token()
    return replace(user, token_id=token_id, token_hash=hash_token(token),
                   changed=time.time() if now is None else now), token


# --- stores ----------------------------------------------------------------------------
class UserStore(Protocol):
    """Where users are kept."""

    async def load(self) -> dict[str, User]:
        """Every user, by name."""

    async def save(self, user: User) -> None:
        """Add or replace one user."""

    async def version(self) -> str:
        """Changes whenever a user changes (cheap to ask)."""


class RedisUserStore:
    """Users in a Redis hash, with a version counter."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def load(self) -> dict[str, User]:
        raw: Mapping[Any, Any] = await self.redis.hgetall(self.keys.users)
        users = {}
        for value in raw.values():
            try:
                user = User.from_json(value)
            except AuthError as exc:
                log.error("skipping a stored user: %s", exc)
                continue
            users[user.name] = user
        return users

    async def save(self, user: User) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.users, user.name, user.to_json())
            pipe.incr(self.keys.users_version)
            await pipe.execute()

    async def version(self) -> str:
        value = await self.redis.get(self.keys.users_version)
        return value.decode() if isinstance(value, bytes) else str(value or "0")


class FileUserStore:
    """Users in one JSON file (``{"users": [...]}``), rewritten atomically, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, User]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AuthError(f"users file {self.path} unreadable: {exc}") from exc
        entries = doc.get("users", []) if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise AuthError(f"users file {self.path}: expected {{\"users\": [...]}}")
        users = [User.from_json(json.dumps(e)) for e in entries]
        return {u.name: u for u in users}

    def _write(self, users: Mapping[str, User]) -> None:
        doc = {"users": [asdict(u) for u in sorted(users.values(), key=lambda u: u.name)]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    async def load(self) -> dict[str, User]:
        return await asyncio.to_thread(self._read)

    async def save(self, user: User) -> None:
        def update() -> None:
            users = self._read()
            users[user.name] = user
            self._write(users)

        await asyncio.to_thread(update)

    async def version(self) -> str:
        try:
            st = await asyncio.to_thread(self.path.stat)
        except FileNotFoundError:
            return "none"
        return f"{st.st_mtime_ns}:{st.st_size}"


# --- the in-memory directory the service asks ------------------------------------------
#: The fixed salt of :func:`static_stamp` (the same on every instance, as the stamp).
STATIC_STAMP_SALT = hashlib.sha256(b"callroute static token session stamp").digest()[:16]


def static_stamp(token: str) -> str:
    """The session stamp of a token from the config (``admin.token``): it changes with the
    token and is the same on every instance, like a user's; made with scrypt, so a
    sign-in cookie, which shows it, is no fast hash to guess a weak token from."""
    derived = hash_token(token, salt=STATIC_STAMP_SALT)
    return hashlib.sha256(derived.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class _Static:
    principal: Principal
    digest: bytes
    stamp: str


class Directory:
    """The users in force, in memory: answers :meth:`authenticate` (bearer tokens) and
    :meth:`lookup` (sign-in sessions) with no I/O on the event loop.

    ``static`` are tokens from the config (``admin.token``: user ``admin``, role admin),
    compared as SHA-256 digests in constant time against every entry.
    """

    def __init__(self, users: Mapping[str, User] | None = None,
                 static: Iterable[tuple[Principal, str]] = (), *,
                 verify_concurrency: int = 2) -> None:
        self._static = [_Static(p, hashlib.sha256(t.encode()).digest(), static_stamp(t))
                        for p, t in static if t]
        self._memo_key = secrets.token_bytes(32)
        self._memo: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        self._verify = asyncio.Semaphore(verify_concurrency)
        self.users: dict[str, User] = {}
        self._by_token_id: dict[str, User] = {}
        self.replace(users or {})

    def replace(self, users: Mapping[str, User]) -> None:
        """Put a fresh copy of the users in force (remembered tokens of changed users
        stop matching: each carries the user's stamp)."""
        self.users = dict(users)
        self._by_token_id = {u.token_id: u for u in self.users.values()}

    @property
    def empty(self) -> bool:
        """No user and no static token: nobody could sign in."""
        return not self._static and not any(not u.disabled for u in self.users.values())

    def _memo_of(self, token: str) -> bytes:
        return hmac.new(self._memo_key, token.encode(), hashlib.sha256).digest()

    def cached(self, token: str) -> Principal | None:
        """The principal of a token already verified by this process (no scrypt)."""
        key = self._memo_of(token)
        hit = self._memo.get(key)
        if hit is None:
            return None
        name, stamp = hit
        user = self.users.get(name)
        if user is None or user.disabled or user.stamp != stamp:
            del self._memo[key]
            return None
        return user.principal

    def _check_static(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self._static:  # every entry compared: no early exit
            if hmac.compare_digest(digest, entry.digest):
                found = entry.principal
        return found

    async def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to, or None (unknown, wrong, disabled)."""
        if not token or len(token) > 512:
            return None
        static = self._check_static(token)
        if static is not None:
            return static
        hit = self.cached(token)
        if hit is not None:
            return hit
        token_id = token_id_of(token)
        user = self._by_token_id.get(token_id) if token_id else None
        stored = user.token_hash if user is not None else None
        async with self._verify:  # the dummy hash too: its first making is a scrypt
            ok = await asyncio.to_thread(
                lambda: verify_token(token, stored if stored is not None else _dummy_hash()))
        if user is None or not ok or user.disabled:
            return None
        current = self.users.get(user.name)
        if current is None or current.stamp != user.stamp:
            return None  # replaced while we verified
        self._memo[self._memo_of(token)] = (user.name, user.stamp)
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return user.principal

    def lookup(self, user: str) -> tuple[Principal, str] | None:
        """A user's principal and stamp (None when unknown or disabled): what a sign-in
        session is checked against on every request."""
        found = self.users.get(user)
        if found is not None and not found.disabled:
            return found.principal, found.stamp
        for entry in self._static:
            if entry.principal.user == user:
                return entry.principal, entry.stamp
        return None


async def refresh_loop(store: UserStore, directory: Directory, interval_s: float,
                       stop: asyncio.Event) -> None:
    """Reload the users into ``directory`` whenever the store's version changes, until
    ``stop``. A store that cannot be read keeps the users in force (logged once)."""
    seen: str | None = None
    failing = False
    while not stop.is_set():
        try:
            version = await store.version()
            if version != seen:
                directory.replace(await store.load())
                seen = version
            if failing:
                log.info("users store readable again")
            failing = False
        except (RedisError, OSError, AuthError) as exc:
            if not failing:
                log.warning("users store unreadable, keeping the users in force: %s", exc)
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
