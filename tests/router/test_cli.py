"""The ``callroute`` command line, run as a user would."""

from __future__ import annotations

import json
import os
import socket
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


@pytest.fixture(scope="module")
def sample_crm_url(tmp_path_factory: pytest.TempPathFactory,
                   redis_server: RedisServer) -> Iterator[str]:
    """`callroute sample-crm` running in a subprocess, for the module's tests (they only
    read from it); yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = write_config(tmp_path_factory.mktemp("sample-crm"), url, redis_server.url)
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
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture
def sample_crm(tmp_path: Path, sample_crm_url: str, redis_server: RedisServer) -> Path:
    """A config in the test's own folder pointing at the running sample CRM."""
    return write_config(tmp_path, sample_crm_url, redis_server.url)


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


def test_explain_stores_nothing(sample_crm: Path, redis_server: RedisServer,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """`explain` asks the CRM but writes nothing to the shared cache (a call would)."""
    import redis as syncredis

    client = syncredis.Redis.from_url(redis_server.url)
    client.flushall()
    try:
        assert main(["explain", "--config", str(sample_crm), "13800138000", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["lookup"]["source"] == "crm"
        assert list(client.scan_iter("callroute:*")) == []
    finally:
        client.close()


def test_explain_reads_a_time_without_offset_in_the_rules_zone(
    sample_crm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--at 2026-11-23T10:30` (no offset) is 10:30 in the schedules' zone (Asia/Shanghai),
    inside business hours, not 10:30 UTC (18:30 there, closed)."""
    code = main(["explain", "--config", str(sample_crm), "13800138000", "--did", "4008001000",
                 "--at", "2026-11-23T10:30", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["at"] == "2026-11-23T10:30:00+08:00"
    assert data["rule"] == "vip-owner"


def test_explain_time_without_offset_and_several_zones(
    sample_crm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With schedules in two zones, a time without an offset is refused in one line saying
    what to do; routing.timezone settles it."""
    rules = sample_crm.parent / "rules.yaml"
    text = (ROOT / "examples" / "rules.yaml").read_text()
    rules.write_text(text.replace("schedules:\n", "schedules:\n  london:\n    timezone: "
                                  "Europe/London\n    hours: {mon-fri: '09:00-17:00'}\n", 1))
    config = sample_crm.parent / "two-zones.yaml"
    config.write_text(sample_crm.read_text().replace(
        f"rules: {ROOT / 'examples' / 'rules.yaml'}", f"rules: {rules}"))
    argv = ["explain", "--config", str(config), "13800138000", "--at", "2026-11-23T10:30"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("callroute explain: the time 2026-11-23T10:30:00 has no UTC offset and the "
                   "rules' schedules use several time zones (Asia/Shanghai, Europe/London): add "
                   "an offset (e.g. 2026-11-23T10:30:00+08:00) or set routing.timezone")
    config.write_text(config.read_text().replace("routing:\n", "routing:\n  timezone: "
                                                 "Asia/Shanghai\n", 1))
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["at"] == "2026-11-23T10:30:00+08:00"


def test_unset_variable_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A config whose ${VAR} is not set: every command exits 1 naming the variable."""
    monkeypatch.delenv("CALLROUTE_TEST_UNSET", raising=False)
    config = write_config(tmp_path, "http://127.0.0.1:1", "redis://127.0.0.1:1/0")
    config.write_text(config.read_text().replace("admin:\n", "admin:\n  token: "
                                                 "${CALLROUTE_TEST_UNSET}\n", 1))
    assert main(["check", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "admin.token: ${CALLROUTE_TEST_UNSET} is not set in the environment" in err


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """`callroute --help` and every command's help read as plain text (no reST markup)."""
    from router.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    for command in ("init", "serve", "deliver", "check", "explain", "demo", "sample-crm",
                    "sync", "outbox"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert "``" not in text
        assert "===" not in text
        assert ":class:" not in text
    assert "init" in texts[0]
    assert "commands:" in texts[0]


def test_dev_help_prints_a_usage_text() -> None:
    """`./dev help` prints what each entry point does (not the script's source) and,
    once the virtualenv exists, callroute's commands."""
    env = {**os.environ, "CALLROUTE_VENV": sys.prefix}
    proc = subprocess.run([str(ROOT / "dev"), "help"], capture_output=True, text=True,
                          timeout=60, env=env, check=True)
    assert proc.stdout.startswith("Usage: ./dev COMMAND")
    assert "set -euo" not in proc.stdout
    assert "explain" in proc.stdout.split("callroute's commands")[1]


def test_dev_audit_with_arguments_is_callroutes_audit_trail() -> None:
    """`./dev audit` alone audits the dependencies; with arguments it is callroute's own
    `audit` command, as every other command ./dev does not know (it used to run the
    dependency audit and drop them)."""
    env = {**os.environ, "CALLROUTE_VENV": sys.prefix}
    proc = subprocess.run([str(ROOT / "dev"), "audit", "list", "--help"], capture_output=True,
                          text=True, timeout=60, env=env, check=True)
    assert proc.stdout.startswith("usage: callroute audit list")


def test_init_writes_the_starting_files(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`init DIR` writes a commented config, the example rules, the CRM examples and the
    Asterisk snippets (the same as asterisk-conf/); the config passes `check` as written,
    with the rules beside it."""
    target = tmp_path / "site"
    assert main(["init", str(target)]) == 0
    assert "wrote" in capsys.readouterr().out
    config = (target / "config.yaml").read_text()
    assert config.startswith("# callroute configuration, written by `callroute init`")
    assert f"callroute check --config {target / 'config.yaml'} --asterisk" in config
    assert "spool_dir: var/spool" in config
    assert (target / "rules.yaml").read_text() == (ROOT / "examples" / "rules.yaml").read_text()
    for crm in ("crm-hubspot.yaml", "crm-zoho.yaml", "crm-salesforce.yaml", "crm-sample.yaml"):
        assert (target / "crm-examples" / crm).is_file()
    snippets = sorted(p.name for p in (ROOT / "asterisk-conf").iterdir())
    assert sorted(p.name for p in (target / "asterisk").iterdir()) == snippets
    for name in snippets:
        assert (target / "asterisk" / name).read_bytes() == \
            (ROOT / "asterisk-conf" / name).read_bytes()
    assert main(["check", "--config", str(target / "config.yaml")]) == 0
    assert f"config OK: {target}" in capsys.readouterr().out


def test_init_leaves_existing_files_alone(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A second `init` into the same folder changes nothing and exits 1 naming the files;
    with --force it writes them again."""
    target = tmp_path / "site"
    assert main(["init", str(target)]) == 0
    (target / "rules.yaml").write_text("# mine\n")
    capsys.readouterr()
    assert main(["init", str(target)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("callroute init: ")
    assert str(target / "rules.yaml") in err
    assert "--force" in err
    assert (target / "rules.yaml").read_text() == "# mine\n"
    assert main(["init", str(target), "--force"]) == 0
    assert (target / "rules.yaml").read_text() != "# mine\n"


def test_init_reads_the_snippets_at_run_time(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The Asterisk snippets init writes are read from the packaged files when it runs
    (not a copy of their text kept in the code)."""
    import router.cli

    real = router.cli.data_dir
    fake = tmp_path / "asterisk-conf"
    fake.mkdir()
    (fake / "extensions_callroute.conf").write_text("; edited since\n")

    def data_dir(name: str) -> Path:
        return fake if name == "asterisk-conf" else real("examples")

    monkeypatch.setattr(router.cli, "data_dir", data_dir)
    assert main(["init", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "asterisk" / "extensions_callroute.conf").read_text() == \
        "; edited since\n"


def test_without_config_local_file_then_packaged_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config, `check` reads ./config.yaml; with none there, the example config
    that comes with callroute, saying so on stderr."""
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 0
    captured = capsys.readouterr()
    assert "using the example config" in captured.err
    assert f"config OK: {ROOT / 'examples'}" in captured.out
    write_config(tmp_path, "http://127.0.0.1:1", "redis://127.0.0.1:1/0")
    assert main(["check"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"config OK: {tmp_path}" in captured.out


@pytest.fixture
def squatter() -> Iterator[tuple[socket.socket, int]]:
    """A program holding a port: it listens and never accepts nor answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def light_config(tmp_path: Path, **ports: int) -> Path:
    """The example config on free ports (or those given), without AMI and outbox."""
    config = write_config(tmp_path, f"http://127.0.0.1:{ports.get('crm', free_port())}",
                          "redis://127.0.0.1:1/0")
    text = config.read_text()
    text = text.replace("port: 4573", f"port: {ports.get('agi', free_port())}")
    text = text.replace("port: 8074", f"port: {ports.get('admin', free_port())}")
    text = text.replace("ami:\n  enabled: true", "ami:\n  enabled: false")
    text = text.replace("outbox:\n", "outbox:\n  enabled: false\n")
    config.write_text(text)
    return config


@pytest.mark.parametrize("setting", ["agi", "admin"])
def test_serve_on_a_port_in_use_is_one_line(
    tmp_path: Path, squatter: tuple[socket.socket, int], setting: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`serve` with its FastAGI or admin port taken exits 1 with one line naming the
    address and the setting to change, not a traceback."""
    port = squatter[1]
    config = light_config(tmp_path, **{setting: port})
    assert main(["serve", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"callroute serve: cannot listen on 127.0.0.1:{port} ({setting}.port): the "
                   "port is already in use (another callroute? `ss -ltnp` shows which "
                   f"program): change {setting}.port in the config, or stop that program")


def test_sample_crm_on_a_port_in_use_is_one_line(
    tmp_path: Path, squatter: tuple[socket.socket, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """`sample-crm` on a taken port exits 1 with one line saying what to change."""
    port = squatter[1]
    config = light_config(tmp_path, crm=port)
    assert main(["sample-crm", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"callroute sample-crm: cannot listen on 127.0.0.1:{port} "
                          "(crm.base_url): the port is already in use")
    assert err.endswith("change crm.base_url in the config, or pass --port, or stop that "
                        "program")


def test_demo_never_talks_to_what_holds_its_ports(
    tmp_path: Path, squatter: tuple[socket.socket, int], redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With its CRM port and its FastAGI port held by another program, the demo says so,
    runs its own sample CRM and FastAGI server on free ports, and plays its calls against
    them; the other program never gets a connection."""
    sock, port = squatter
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    other.listen(16)
    other.setblocking(False)
    try:
        agi_port = other.getsockname()[1]
        config = light_config(tmp_path, crm=port, agi=agi_port)
        config.write_text(config.read_text().replace("redis://127.0.0.1:1/0", redis_server.url))
        assert main(["demo", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert (f"sample CRM: 127.0.0.1:{port} (crm.base_url) is taken by another program; "
                "the demo runs its own on http://127.0.0.1:") in out
        assert f"FastAGI: 127.0.0.1:{agi_port} (agi.port) is taken by another program" in out
        assert "C-1001 Li Lei" in out
        for held in (sock, other):
            with pytest.raises(BlockingIOError):
                held.accept()
    finally:
        other.close()
