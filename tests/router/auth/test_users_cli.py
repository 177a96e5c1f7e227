"""``callroute users ...`` run as an operator would, against real Redis and a users file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from router.auth.roles import Principal, Role
from router.auth.users import Directory, RedisUserStore
from router.cli import main
from router.keys import Keys
from tests.redis_server import RedisServer


def _config(tmp_path: Path, redis_url: str, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"redis: {{url: '{redis_url}', prefix: 'cli:'}}\n"
                    f"crm: {{base_url: 'http://127.0.0.1:1'}}\n{extra}")
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def _principal(redis_url: str, token: str) -> Principal | None:
    """Whom ``token`` authenticates as, with the users the CLI left in Redis."""

    async def check() -> Principal | None:
        redis = aioredis.Redis.from_url(redis_url)
        try:
            directory = Directory(await RedisUserStore(redis, Keys(prefix="cli:")).load())
            return await directory.authenticate(token)
        finally:
            await redis.aclose()

    return asyncio.run(check())


def test_add_list_rotate_disable_enable_role(tmp_path: Path, redis_server: RedisServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A user added by the CLI signs in with the printed token; `list` never shows a
    token; `rotate` replaces it; `disable` stops it; `role` changes the role; mistakes
    are one line and exit 1."""
    url = redis_server.url.replace("/0", "/3")
    import redis

    redis.Redis.from_url(url).flushdb()
    cfg = str(_config(tmp_path, url))
    code, out = _run(capsys, "users", "add", "alice", "--role", "agent", "--agent", "7001",
                     "--json", "-c", cfg)
    assert code == 0
    token = json.loads(out)["token"]
    assert _principal(url, token) == Principal("alice", Role.AGENT, "7001")

    code, out = _run(capsys, "users", "list", "-c", cfg)
    assert code == 0
    assert "alice" in out
    assert "7001" in out
    assert token not in out
    assert "crt_" not in out

    code, out = _run(capsys, "users", "rotate", "alice", "--json", "-c", cfg)
    new = json.loads(out)["token"]
    assert _principal(url, token) is None
    assert _principal(url, new) is not None

    assert _run(capsys, "users", "disable", "alice", "-c", cfg)[0] == 0
    assert _principal(url, new) is None
    assert "disabled" in _run(capsys, "users", "list", "-c", cfg)[1]
    assert _run(capsys, "users", "enable", "alice", "-c", cfg)[0] == 0

    assert _run(capsys, "users", "role", "alice", "supervisor", "-c", cfg)[0] == 0
    assert _principal(url, new) == Principal("alice", Role.SUPERVISOR)

    code, out = _run(capsys, "users", "add", "alice", "--role", "viewer", "-c", cfg)
    assert code == 1
    assert "exists" in out
    code, out = _run(capsys, "users", "rotate", "nobody", "-c", cfg)
    assert code == 1
    assert "no user 'nobody'" in out
    code, out = _run(capsys, "users", "add", "bob", "--role", "agent", "-c", cfg)
    assert code == 1
    assert "agent id" in out


def test_users_file_store_and_bad_role(tmp_path: Path, redis_server: RedisServer,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With `auth.users_file`, users go to that file; an unknown role is refused by the
    argument parser."""
    cfg = str(_config(tmp_path, redis_server.url, "auth: {users_file: users.json}\n"))
    assert _run(capsys, "users", "add", "root", "--role", "admin", "-c", cfg)[0] == 0
    doc = json.loads((tmp_path / "users.json").read_text())
    assert [u["name"] for u in doc["users"]] == ["root"]
    with pytest.raises(SystemExit):
        main(["users", "add", "x", "--role", "god", "-c", cfg])


def test_redis_down_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With Redis unreachable, `users list` says so in one line and exits 2."""
    cfg = str(_config(tmp_path, "redis://127.0.0.1:1/0"))
    code, out = _run(capsys, "users", "list", "-c", cfg)
    assert code == 2
    assert "unavailable" in out
