"""Users and tokens: scrypt hashes, the in-memory directory, the Redis and file stores."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.auth import users as users_module
from router.auth.roles import Principal, Role
from router.auth.users import (
    Directory,
    FileUserStore,
    RedisUserStore,
    hash_token,
    make_user,
    refresh_loop,
    rotated,
    token_id_of,
    verify_token,
)
from router.errors import AuthError
from router.keys import Keys


def test_tokens_are_stored_as_salted_scrypt_hashes() -> None:
    """A token hashes to an scrypt string with its parameters and a random salt: the same
    token hashes differently twice, and verifies against both; a near miss does not."""
    token = "crt_0123456789ab_secret-part"
    one, two = hash_token(token), hash_token(token)
    assert one.startswith("scrypt$14$8$1$")
    assert one != two
    assert token not in one
    assert verify_token(token, one)
    assert verify_token(token, two)
    assert not verify_token(token + "x", one)
    assert not verify_token(token, "bcrypt$whatever")
    assert not verify_token(token, "scrypt$x$8$1$AA==$AA==")


def test_a_new_user_gets_a_random_token_carrying_its_id() -> None:
    """`make_user` returns the token once; the stored user holds only its id and hash."""
    user, token = make_user("alice", Role.AGENT, "7001", now=100.0)
    assert token.startswith("crt_")
    assert token_id_of(token) == user.token_id
    assert token not in user.to_json()
    assert verify_token(token, user.token_hash)
    assert user.principal == Principal("alice", Role.AGENT, "7001")
    assert token_id_of("Bearer nonsense") is None
    assert token_id_of("crt_short_x") is None


@pytest.mark.parametrize(("name", "role", "agent", "message"), [
    ("bob smith", Role.VIEWER, None, "letters, digits"),
    ("al", Role.AGENT, None, "agent id"),
    ("sue", Role.SUPERVISOR, "7001", "only the agent role"),
])
def test_bad_users_are_refused(name: str, role: Role, agent: str | None, message: str) -> None:
    """A name with spaces, an agent without an agent id, an agent id on another role."""
    with pytest.raises(AuthError, match=message):
        make_user(name, role, agent)


async def test_directory_authenticates_tokens_and_remembers_them() -> None:
    """The right token gives the user's principal; a wrong secret, an unknown id, a
    disabled user or garbage give None; the second request of a token skips scrypt."""
    alice, token = make_user("alice", Role.AGENT, "7001")
    bob, bob_token = make_user("bob", Role.ENGINEER)
    directory = Directory({"alice": alice, "bob": bob})
    assert await directory.authenticate(token) == Principal("alice", Role.AGENT, "7001")
    assert directory.cached(token) == alice.principal
    assert await directory.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await directory.authenticate("crt_ffffffffffff_" + "x" * 43) is None
    assert await directory.authenticate("") is None
    assert await directory.authenticate("x" * 1000) is None
    assert await directory.authenticate(bob_token) == bob.principal
    from dataclasses import replace

    directory.replace({"alice": replace(alice, disabled=True), "bob": bob})
    assert directory.cached(token) is None
    assert await directory.authenticate(token) is None


async def test_a_rotated_token_stops_working_and_sessions_see_a_new_stamp() -> None:
    """After rotation the old token is refused (even though it was remembered) and the
    user's stamp, which sign-in sessions carry, changes."""
    alice, old = make_user("alice", Role.SUPERVISOR)
    directory = Directory({"alice": alice})
    assert await directory.authenticate(old) is not None
    stamp = directory.lookup("alice")
    new_user, new = rotated(alice)
    directory.replace({"alice": new_user})
    assert await directory.authenticate(old) is None
    assert await directory.authenticate(new) == Principal("alice", Role.SUPERVISOR)
    assert directory.lookup("alice") != stamp


async def test_static_config_token_and_emptiness() -> None:
    """`admin.token` is user admin; a directory with neither users nor tokens is empty,
    and one with only disabled users too."""
    directory = Directory(static=[(Principal("admin", Role.ADMIN), "t0k-long-enough")])
    assert not directory.empty
    assert await directory.authenticate("t0k-long-enough") == Principal("admin", Role.ADMIN)
    assert directory.lookup("admin") is not None
    assert Directory().empty
    alice, _ = make_user("alice", Role.VIEWER)
    from dataclasses import replace

    assert Directory({"alice": replace(alice, disabled=True)}).empty
    assert not Directory({"alice": alice}).empty


def test_a_config_token_s_session_stamp_is_no_fast_hash_of_it() -> None:
    """The sign-in cookie of `admin.token` shows its stamp: the same on every instance,
    new with a new token, and not a prefix of the token's SHA-256 (which would let a
    stolen cookie guess a weak token offline at hash speed)."""
    admin = Principal("admin", Role.ADMIN)
    found = Directory(static=[(admin, "weak-token")]).lookup("admin")
    assert found is not None
    stamp = found[1]
    assert stamp != hashlib.sha256(b"weak-token").hexdigest()[:16]
    assert Directory(static=[(admin, "weak-token")]).lookup("admin") == (admin, stamp)
    other = Directory(static=[(admin, "another-token")]).lookup("admin")
    assert other is not None
    assert other[1] != stamp


async def test_scrypt_runs_off_the_event_loop() -> None:
    """While a token is being verified (scrypt, tens of ms) the loop keeps running: a
    timer due in 1 ms fires long before the verification ends."""
    alice, token = make_user("alice", Role.VIEWER)
    directory = Directory({"alice": alice})
    fired: list[float] = []
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    loop.call_later(0.001, lambda: fired.append(time.monotonic() - start))
    assert await directory.authenticate(token) is not None
    took = time.monotonic() - start
    assert fired
    assert fired[0] < took


async def test_an_unknown_token_id_costs_a_scrypt_off_the_event_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A token naming no known id is checked against a dummy hash, so it costs what a wrong
    one does; that hash is made on first need, and that scrypt too runs in a worker
    thread, never on the event loop."""
    threads: list[str] = []

    def watched(token: str, **kwargs: Any) -> str:
        threads.append(threading.current_thread().name)
        return real(token, **kwargs)

    real = users_module.hash_token
    monkeypatch.setattr(users_module, "hash_token", watched)
    users_module._dummy_hash.cache_clear()
    try:
        directory = Directory({})
        assert await directory.authenticate("crt_0123456789ab_guessed") is None
    finally:
        users_module._dummy_hash.cache_clear()
    assert len(threads) == 2  # the dummy hash made, then the token checked against it
    assert threading.main_thread().name not in threads


async def test_redis_store_round_trip_and_version(redis_url: str) -> None:
    """Users saved in Redis come back equal; each save bumps the version; nothing in
    Redis holds the token."""
    redis = aioredis.Redis.from_url(redis_url)
    store = RedisUserStore(redis, Keys(prefix="t:"))
    try:
        assert await store.load() == {}
        v0 = await store.version()
        alice, token = make_user("alice", Role.AGENT, "7001")
        await store.save(alice)
        assert await store.version() != v0
        assert await store.load() == {"alice": alice}
        raw = await redis.hget("t:users", "alice")
        assert raw is not None
        assert token.encode() not in raw
        await redis.hset("t:users", "broken", b"{not json")
        assert list(await store.load()) == ["alice"]
    finally:
        await redis.aclose()


async def test_file_store_round_trip_mode_and_errors(tmp_path: Path) -> None:
    """The file store writes a 0600 JSON file, reads it back, and says clearly when the
    file is not a users file."""
    path = tmp_path / "etc" / "users.json"
    store = FileUserStore(path)
    assert await store.load() == {}
    assert await store.version() == "none"
    alice, _ = make_user("alice", Role.ADMIN)
    await store.save(alice)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert await store.load() == {"alice": alice}
    assert json.loads(path.read_text())["users"][0]["name"] == "alice"
    path.write_text("[1, 2]")
    with pytest.raises(AuthError, match="expected"):
        await store.load()
    path.write_text("{")
    with pytest.raises(AuthError, match="unreadable"):
        await store.load()


async def test_refresh_loop_follows_the_store(redis_url: str) -> None:
    """A user added to the store reaches a running directory within the refresh period;
    a disabled one leaves it."""
    redis = aioredis.Redis.from_url(redis_url)
    store = RedisUserStore(redis, Keys(prefix="t:"))
    directory = Directory()
    stop = asyncio.Event()
    task = asyncio.create_task(refresh_loop(store, directory, 0.02, stop))
    try:
        alice, token = make_user("alice", Role.VIEWER)
        await store.save(alice)
        for _ in range(100):
            if "alice" in directory.users:
                break
            await asyncio.sleep(0.01)
        assert await directory.authenticate(token) == alice.principal
        from dataclasses import replace

        await store.save(replace(alice, disabled=True))
        for _ in range(100):
            if directory.users["alice"].disabled:
                break
            await asyncio.sleep(0.01)
        assert await directory.authenticate(token) is None
    finally:
        stop.set()
        await task
        await redis.aclose()
