"""The audit entries of the command line's changes, and ``callroute audit list|export``."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from router.cli import main
from tests.redis_server import RedisServer


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Iterator[str]:
    """A config on database 4 of the test Redis (flushed), with an audit mirror file."""
    url = redis_server.url.replace("/0", "/4")
    redis.Redis.from_url(url).flushdb()
    path = tmp_path / "config.yaml"
    path.write_text(f"redis: {{url: '{url}'}}\naudit: {{file: audit.jsonl}}\n"
                    "crm: {base_url: 'http://127.0.0.1:1'}\n")
    return str(path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_user_changes_are_audited_and_listed(config: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`users add` and `users rotate` each write an entry (the operating system user,
    as admin, from this host, with the user's state hashes before and after), which
    `audit list --json` shows, `--who`/`--action` filter, `audit export` writes as JSON
    lines, and the mirror file holds too."""
    assert _run(capsys, "users", "add", "alice", "--role", "viewer", "-c", config)[0] == 0
    assert _run(capsys, "users", "rotate", "alice", "-c", config)[0] == 0
    code, out = _run(capsys, "audit", "list", "--json", "-c", config)
    assert code == 0
    entries = json.loads(out)
    assert [e["action"] for e in entries] == ["user.add", "user.rotate"]
    add, rotate = entries
    assert add["who"] == f"cli:{getpass.getuser()}"
    assert add["role"] == "admin"
    assert add["source"].startswith("cli@")
    assert add["target"] == "user:alice"
    assert add["before"] == ""
    assert len(add["after"]) == 64
    assert rotate["before"] == add["after"]
    assert rotate["after"] not in ("", rotate["before"])
    assert "crt_" not in out
    code, out = _run(capsys, "audit", "list", "--action", "user.rot", "-c", config)
    assert "user.rotate" in out
    assert "user.add" not in out
    code, out = _run(capsys, "audit", "list", "--who", "nobody", "-c", config)
    assert "(no entries)" in out
    code, out = _run(capsys, "audit", "export", "--since", "2000-01-01T00:00:00", "-c", config)
    assert [json.loads(line)["action"] for line in out.splitlines()] == ["user.add",
                                                                         "user.rotate"]
    target = tmp_path / "export.jsonl"
    assert _run(capsys, "audit", "export", "-o", str(target), "-c", config)[0] == 0
    assert len(target.read_text().splitlines()) == 2
    mirror = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [m["action"] for m in mirror] == ["user.add", "user.rotate"]


def test_outbox_retry_from_the_command_line_is_audited(
        config: str, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    """`outbox retry --key K` writes an entry naming the record key moved."""
    client = redis.Redis.from_url(redis_server.url.replace("/0", "/4"))
    client.xadd("callroute:outbox:dead", {"key": "rk-9", "record": "{}", "attempt": "1",
                                          "enq": "1", "error": "e", "reason": "r"})
    assert _run(capsys, "outbox", "retry", "--key", "rk-9", "-c", config)[0] == 0
    _code, out = _run(capsys, "audit", "list", "--json", "--action", "outbox.", "-c", config)
    [entry] = json.loads(out)
    assert entry["action"] == "outbox.retry"
    assert entry["target"] == "rk-9"
    assert entry["who"] == f"cli:{getpass.getuser()}"


def test_audit_list_with_redis_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With Redis unreachable, `audit list` says so on stderr and exits 2."""
    path = tmp_path / "config.yaml"
    path.write_text("redis: {url: 'redis://127.0.0.1:1/0', connect_timeout_s: 0.2}\n"
                    "crm: {base_url: 'http://127.0.0.1:1'}\n")
    assert main(["audit", "list", "-c", str(path)]) == 2
    assert "Redis unavailable" in capsys.readouterr().err
