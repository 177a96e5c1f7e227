"""The ``callroute`` command line, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.cli import main
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "config.yaml"


def write_config(tmp_path: Path, crm_url: str, redis_url: str, rules: Path | None = None) -> Path:
    """A copy of the example config with the CRM/Redis addresses and rules path replaced."""
    text = EXAMPLE.read_text()
    text = text.replace("http://127.0.0.1:8088", crm_url)
    text = text.replace("redis://127.0.0.1:6379/0", redis_url)
    text = text.replace("rules: rules.yaml", f"rules: {rules or ROOT / 'examples' / 'rules.yaml'}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` configures the root logger as the console script would; undo it after."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def sample_crm(tmp_path: Path, redis_server: RedisServer) -> Iterator[Path]:
    """`callroute sample-crm` running in a subprocess; yields a config pointing at it."""
    port = free_port()
    config = write_config(tmp_path, f"http://127.0.0.1:{port}", redis_server.url)
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "sample-crm", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_health", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("sample CRM did not start")
        yield config
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def test_check_accepts_the_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """`callroute check` on the example config exits 0 and summarises the rules."""
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out
    assert "rules OK" in out


def test_check_names_the_broken_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A broken rules file makes `check` exit 1 with the rule and the field named."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: vip\n    when: {tier: gold}\n    queue: vip\n")
    config = write_config(tmp_path, "http://127.0.0.1:1", "redis://127.0.0.1:1/0", rules)
    assert main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "rule 'vip'" in err
    assert "when.tier" in err


def test_check_names_the_broken_setting(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid config value makes every command exit 1 naming the field."""
    config = tmp_path / "c.yaml"
    config.write_text("agi:\n  port: -1\n")
    assert main(["check", "--config", str(config)]) == 1
    assert "agi.port" in capsys.readouterr().err


def test_explain_json(sample_crm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`explain --json` prints one object with number, customer, rule and variables,
    looked up in the CRM served by `callroute sample-crm`."""
    code = main(["explain", "--config", str(sample_crm), "138 0013 8000", "--did", "4008001000",
                 "--at", "2026-11-23T10:30:00+08:00", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["number"]["e164"] == "+8613800138000"
    assert data["customer"]["id"] == "C-1001"
    assert data["rule"] == "vip-owner"
    assert data["variables"]["ROUTE_TARGET"] == "Local/7001@agents"
    assert data["lookup"]["source"] in {"crm", "redis", "lru"}


def test_explain_text_after_hours(sample_crm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The text trace shows every rule tried and why; at night the after-hours rule wins."""
    code = main(["explain", "--config", str(sample_crm), "13800138000",
                 "--at", "2026-11-23T22:00:00+08:00"])
    assert code == 0
    out = capsys.readouterr().out
    assert "MATCH after-hours" in out
    assert "vip-owner" in out
    assert "ROUTE_VOICEMAIL=8000@default" in out


def test_bad_time_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed --at is refused by the argument parser."""
    with pytest.raises(SystemExit) as info:
        main(["explain", "--config", str(EXAMPLE), "1", "--at", "noon"])
    assert info.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err


def test_demo_runs(tmp_path: Path, redis_server: RedisServer) -> None:
    """`callroute demo` plays its calls end to end and exits 0 with a table."""
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}", redis_server.url)
    text = config.read_text().replace("port: 4573", f"port: {free_port()}")
    config.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "router.cli", "demo", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "vip-owner" in proc.stdout
    assert "C-1001 Li Lei" in proc.stdout
    assert "deadline" in proc.stdout


def test_sync_prewarms_the_cache(sample_crm: Path, redis_server: RedisServer,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`callroute sync` pulls every changed customer into Redis and saves its cursor;
    with the CRM gone it exits 1 saying it will resume."""
    import redis as syncredis

    client = syncredis.Redis.from_url(redis_server.url)
    client.flushall()
    assert main(["sync", "--config", str(sample_crm), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "synced" in out
    keys = {k.decode() for k in client.scan_iter("callroute:*")}
    assert "callroute:sync:cursor" in keys
    assert sum(k.startswith("callroute:cust:") for k in keys) >= 8
    assert not any("138" in k for k in keys)  # numbers never in plaintext
    client.close()
    broken = sample_crm.parent / "broken.yaml"
    port = sample_crm.read_text().split("base_url: http://127.0.0.1:")[1].split("\n")[0]
    broken.write_text(sample_crm.read_text().replace(f"127.0.0.1:{port}",
                                                      f"127.0.0.1:{free_port()}"))
    assert main(["sync", "--config", str(broken), "--no-progress"]) == 1
    assert "resume" in capsys.readouterr().err
