"""`callroute check`: the rules' queues against routing.queues, and with --asterisk the
queues and agents the rules name against an Asterisk over AMI (the recorded peer, and a
scripted AMI server for the answers the recordings do not hold)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from ami.peer import AmiPeer
from router.cli import main
from tests.ami_server import ScriptedAmi, scripted_ami
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "config.yaml"
AGENTS = ("7001", "7002", "7008", "7009", "7101")
QUEUES = ("support", "vip", "retention", "sales")


def config(tmp_path: Path, *, ami_port: int = 1, username: str = "callroute",
           secret: str = "s3cret", **routing: Any) -> Path:
    """The example config with its AMI pointed at a test server and the example rules."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data["ami"].update({"host": "127.0.0.1", "port": ami_port, "username": username,
                        "secret": secret, "connect_timeout_s": 1.0, "action_timeout_s": 1.0})
    data["routing"].update({"rules": str(ROOT / "examples" / "rules.yaml"), **routing})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def all_there() -> ScriptedAmi:
    """An Asterisk with every queue (all agents as members) and every agent's device."""
    members = [f"Local/{a}@agents/n" for a in AGENTS]
    return ScriptedAmi(queues={q: members for q in QUEUES},
                       devices={f"Local/{a}@agents": "NOT_INUSE" for a in AGENTS})


def test_check_fails_on_a_queue_missing_from_routing_queues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With routing.queues listed, a rule naming another queue fails `check`, naming the
    queue and the rule."""
    path = config(tmp_path, queues=["support", "vip", "sales"])
    assert main(["check", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert "rules OK" in captured.out
    assert captured.err.strip() == (
        "callroute check: queue 'retention' (rule 'churn-risk') is not in routing.queues "
        "(support, vip, sales): a call sent there finds no queue")


def test_check_says_when_queues_are_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without routing.queues, `check` passes and lists the queues the rules name, saying
    how to have them checked."""
    path = config(tmp_path, queues=[])
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "queues named by the rules: vip, retention, sales, support (not checked" in out


def test_the_example_config_lists_its_queues(capsys: pytest.CaptureFixture[str]) -> None:
    """examples/config.yaml lists the queues of asterisk-conf/queues.conf, so `check` on the
    examples checks the rules' queues."""
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    assert "(checked against routing.queues)" in capsys.readouterr().out


def test_check_asterisk_all_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against an Asterisk that has every queue and agent, `check --asterisk` exits 0 and
    says what it compared; it logged in with the config's user and asked QueueStatus and
    each agent's DEVICE_STATE, then logged off."""
    script = all_there()
    with scripted_ami(script) as port:
        code = main(["check", "--config", str(config(tmp_path, ami_port=port)), "--asterisk"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (f"asterisk: 127.0.0.1:{port} as 'callroute': 4 queue(s) and 5 agent(s) against "
            "Asterisk (4 queue(s) there)") in captured.out
    asked = [a.get("Action") for a in script.actions]
    assert asked[0] == "Login"
    assert "QueueStatus" in asked
    assert sorted(a["Variable"] for a in script.actions if a.get("Action") == "Getvar") == \
        sorted(f"DEVICE_STATE(Local/{a}@agents)" for a in AGENTS)
    assert asked[-1] == "Logoff"


def test_check_asterisk_names_missing_queue_and_invalid_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A queue Asterisk does not have and an agent whose device Asterisk calls INVALID
    fail `check --asterisk`, each on a line of its own naming it."""
    script = all_there()
    del script.queues["sales"]
    script.devices.pop("Local/7008@agents")
    with scripted_ami(script) as port:
        code = main(["check", "--config", str(config(tmp_path, ami_port=port)), "--asterisk"])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert errors == [
        "callroute check: queue 'sales' (rule 'unknown-sales-line') does not exist in "
        "Asterisk (queues there: retention, support, vip)",
        "callroute check: agent '7008' (Local/7008@agents): Asterisk has no such device "
        "(DEVICE_STATE is INVALID: an unknown endpoint, or a Local channel into a missing "
        "extension); dialling it fails",
    ]
    assert "member(s) Local/7008@agents are INVALID" in captured.out


def test_check_asterisk_login_refused(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong AMI secret is one line naming the address and the user, exit 1."""
    with scripted_ami(all_there()) as port:
        path = config(tmp_path, ami_port=port, secret="wrong")
        assert main(["check", "--config", str(path), "--asterisk"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"callroute check: cannot log in to Asterisk at 127.0.0.1:{port} as "
                   "'callroute': AMI login as 'callroute' rejected: Authentication failed")


def test_check_asterisk_nothing_listening(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """No Asterisk at the address: one line, exit 1, as soon as the connection is refused
    (not after the connect and action timeouts, 2 s here)."""
    port = free_port()
    started = time.monotonic()
    assert main(["check", "--config", str(config(tmp_path, ami_port=port)), "--asterisk"]) == 1
    assert time.monotonic() - started < 1.0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"callroute check: cannot log in to Asterisk at 127.0.0.1:{port}")
    assert "connection failed" in err
    assert len(err.splitlines()) == 1


def test_check_asterisk_without_queue_status_privilege(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An AMI user Asterisk refuses QueueStatus to: one line saying so, exit 1."""
    script = all_there()
    script.allowed.discard("queuestatus")
    with scripted_ami(script) as port:
        code = main(["check", "--config", str(config(tmp_path, ami_port=port)), "--asterisk"])
    assert code == 1
    assert "Asterisk refused QueueStatus: Permission denied" in capsys.readouterr().err


@contextmanager
def recorded_peer(recording: Path, username: str, secret: str) -> Iterator[AmiPeer]:
    """The recorded-AMI peer (answers actions only) on a loop of its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    peer = AmiPeer(recording, username=username, secret=secret, replay=False)
    asyncio.run_coroutine_threadsafe(peer.start(), loop).result(5)
    try:
        yield peer
    finally:
        asyncio.run_coroutine_threadsafe(peer.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_check_asterisk_against_the_recorded_asterisk(
    tmp_path: Path, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recorded Asterisk 22 answers QueueStatus with its queues support and vip (and
    refuses Getvar, being a recording): the example rules' retention and sales queues are
    reported missing, and the states of the agents in no queue as unread."""
    with recorded_peer(fixtures_dir / "ami-basic.raw", "router", "routersecret") as peer:
        path = config(tmp_path, ami_port=peer.port, username="router", secret="routersecret")
        code = main(["check", "--config", str(path), "--asterisk"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip().splitlines() == [
        "callroute check: queue 'retention' (rule 'churn-risk') does not exist in Asterisk "
        "(queues there: support, vip)",
        "callroute check: queue 'sales' (rule 'unknown-sales-line') does not exist in "
        "Asterisk (queues there: support, vip)",
    ]
    # 7001's state is the one QueueStatus gave for it as a member of support; 7009 is in
    # no recorded queue, and the recording has no answer to Getvar
    assert "agent '7001'" not in captured.out
    assert ("warning: agent '7009' (Local/7009@agents): its device state could not be read "
            "(Invalid/unknown command); member of no queue") in captured.out
    assert [a.action for a in peer.actions][:2] == ["Login", "QueueStatus"]
