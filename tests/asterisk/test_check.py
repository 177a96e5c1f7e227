"""`callroute check --asterisk` against the real Asterisk 22, with asterisk-conf/ installed
the documented way (tests.asterisk.harness), logged in as the shipped least-privilege AMI
user: what the rules name is compared with the queues and devices Asterisk really has;
and `callroute serve`'s start-up warning about the same."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from router.cli import main
from tests.asterisk.harness import CALLROUTE_SECRET, ROOT, Asterisk
from tests.asterisk.lab import Lab, open_lab
from tests.redis_server import free_port


@pytest.fixture(scope="module")
def asterisk(tmp_path_factory: pytest.TempPathFactory, asterisk_kit: None) -> Iterator[Asterisk]:
    """A real Asterisk with callroute's asterisk-conf/ and the test dialplan's agents."""
    ast = Asterisk(tmp_path_factory.mktemp("check"), free_port(), free_port())
    ast.start()
    try:
        yield ast
    finally:
        ast.stop()


def config(tmp_path: Path, ast: Asterisk, rules: Path) -> Path:
    """The example config logging in to ``ast`` as the shipped callroute AMI user."""
    data = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())
    data["ami"].update({"host": "127.0.0.1", "port": ast.ami_port, "username": "callroute",
                        "secret": CALLROUTE_SECRET})
    data["routing"]["rules"] = str(rules)
    data["routing"]["queues"] = []  # Asterisk's own answer is what is checked here
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_example_rules_find_everything(tmp_path: Path, asterisk: Asterisk,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The example rules name the queues asterisk-conf/ defines and agents whose Local
    channels lead to extensions of the dialplan: `check --asterisk` exits 0, having read
    every queue and every agent's device state with the least-privilege user."""
    path = config(tmp_path, asterisk, ROOT / "examples" / "rules.yaml")
    code = main(["check", "--config", str(path), "--asterisk"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (f"asterisk: 127.0.0.1:{asterisk.ami_port} as 'callroute': 4 queue(s) and 5 "
            "agent(s) against Asterisk (4 queue(s) there)") in captured.out
    assert "warning" not in captured.out


def test_a_missing_queue_and_devices_are_named(tmp_path: Path, asterisk: Asterisk,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A queue Asterisk does not have, an agent on a SIP endpoint Asterisk does not know
    and an agent whose Local channel leads to no extension: one line each, exit 1."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        'agents:\n  "7001": Local/7001@agents\n  "6001": Local/6001@agents\n'
        '  "7999": PJSIP/7999\n'
        "rules:\n  - name: billing\n    when: {tags_any: [billing]}\n    queue: billing\n"
        "default: {queue: support}\n")
    code = main(["check", "--config", str(config(tmp_path, asterisk, rules)), "--asterisk"])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert errors[0].startswith("callroute check: queue 'billing' (rule 'billing') does not "
                                "exist in Asterisk (queues there: ")
    assert any("agent '6001' (Local/6001@agents): Asterisk has no such device" in e
               for e in errors)
    assert any("agent '7999' (PJSIP/7999): Asterisk has no such device" in e for e in errors)
    assert not any("'7001'" in e for e in errors)
    assert len(errors) == 3


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory, asterisk_kit: None
              ) -> AsyncIterator[Lab]:
    """The suite's lab: its rules have a rule sending calls to a queue that does not exist."""
    async with open_lab(tmp_path_factory.mktemp("serve-check"), tz=None) as lab:
        yield lab


@pytest.mark.asyncio(loop_scope="module")
async def test_serve_warns_about_what_asterisk_lacks(lab: Lab) -> None:
    """`callroute serve` against the real Asterisk logs, once AMI is up, a warning naming
    the rule's queue that Asterisk does not have, and keeps serving."""
    await lab.spawn()
    log = lab.proc_logs[-1]
    deadline = asyncio.get_running_loop().time() + 20
    wanted = ("asterisk: queue 'nosuchqueue' (rule 'misnamed-queue') does not exist in "
              "Asterisk (queues there: retention, sales, support, vip)")
    while wanted not in log.read_text():
        assert asyncio.get_running_loop().time() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    await lab.wait_ready()
    warned = [line for line in log.read_text().splitlines() if "asterisk: " in line]
    assert len(warned) == 1, warned  # every other queue and agent of the rules is there

    # A reload that brings another missing queue is compared again (SIGHUP, as an
    # engineer reloads after editing the rules).
    _replace_in(Path(lab.settings.routing.rules), "queue: nosuchqueue", "queue: billing")
    assert lab.send_signal(signal.SIGHUP)
    wanted = ("asterisk: queue 'billing' (rule 'misnamed-queue') does not exist in "
              "Asterisk (queues there: retention, sales, support, vip)")
    while wanted not in log.read_text():
        assert asyncio.get_running_loop().time() < deadline + 20, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    assert await lab.end_process() == 0
    _replace_in(Path(lab.settings.routing.rules), "queue: billing", "queue: nosuchqueue")


def _replace_in(path: Path, old: str, new: str) -> None:
    """Edit a file in place, as an engineer edits the rules."""
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
