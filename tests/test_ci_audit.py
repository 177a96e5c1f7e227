"""The dependency audit's fallback (``.ci/audit.py``): when pip-audit's sources cannot be
reached, PyPI's project endpoint audits every pin that is the project's latest release.

A loopback aiohttp server answers with the shape of PyPI's JSON API
(``/pypi/<name>/json``: ``info.version`` and the latest release's ``vulnerabilities``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

AUDIT = Path(__file__).resolve().parents[1] / ".ci" / "audit.py"


def load_audit() -> ModuleType:
    """``.ci/audit.py`` as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("ci_audit", AUDIT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


audit = load_audit()

PROJECTS: dict[str, dict[str, Any]] = {
    "aiohttp": {"info": {"version": "3.14.5"}, "vulnerabilities": []},
    "ecdsa": {"info": {"version": "0.19.2"}, "vulnerabilities": [
        {"id": "GHSA-wj6h-64fc-37mp", "fixed_in": [], "withdrawn": None},
        {"id": "PYSEC-0000-1", "fixed_in": ["0.19.3"], "withdrawn": "2026-01-01T00:00:00"},
    ]},
    "redis": {"info": {"version": "8.1.0"}, "vulnerabilities": []},
    # a mirror's or proxy's copy of the project endpoint without the advisories
    "mirrored": {"info": {"version": "1.0"}},
    "nulled": {"info": {"version": "1.0"}, "vulnerabilities": None},
    "odd": {"info": None},
}


@pytest.fixture(name="pypi")
async def pypi_fixture() -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback PyPI JSON API; yields its base URL and the paths it was asked for."""
    asked: list[str] = []

    async def project(request: web.Request) -> web.Response:
        asked.append(request.path)
        name = request.match_info["name"]
        if name == "broken":
            return web.Response(status=500)
        if name not in PROJECTS:
            return web.Response(status=404)
        return web.json_response(PROJECTS[name])

    app = web.Application()
    app.router.add_get("/pypi/{name}/json", project)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/pypi", asked
    await runner.cleanup()


async def run_fallback(base: str, pins: list[tuple[str, str]]) -> tuple[int, Any]:
    """Audit ``pins`` against ``base`` (in a thread: the fallback uses blocking urllib)."""
    found = await asyncio.to_thread(audit.audit_latest, pins, base)
    return audit.verdict(found, len(pins)), found


async def test_latest_pins_without_advisories_pass(
        pypi: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """Pins that are their project's latest release, with no advisory: every pin audited,
    exit 0, one line saying how (and one request per project)."""
    base, asked = pypi
    status, found = await run_fallback(base, [("aiohttp", "3.14.5"), ("redis", "8.1.0")])
    assert status == audit.OK
    assert found.audited == 2
    assert sorted(asked) == ["/pypi/aiohttp/json", "/pypi/redis/json"]
    assert "audited all 2 pinned dependencies" in capsys.readouterr().out


async def test_an_advisory_of_the_latest_release_fails(
        pypi: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """A pin whose (latest) release has an advisory fails the audit with a line naming it;
    a withdrawn advisory is not reported."""
    base, _ = pypi
    status, found = await run_fallback(base, [("ecdsa", "0.19.2"), ("redis", "8.1.0")])
    assert status == audit.VULNERABLE
    assert found.vulnerable == [
        "VULNERABLE ecdsa 0.19.2: GHSA-wj6h-64fc-37mp (fixed in no fix yet)"]
    assert "PYSEC-0000-1" not in capsys.readouterr().out


async def test_an_older_pin_is_named_not_audited(
        pypi: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """A pin older than the project's latest release cannot be judged from the project
    endpoint: it is named as not audited (exit 4), never counted as clean; an unknown
    project and a failing answer are named the same way."""
    base, _ = pypi
    pins = [("aiohttp", "3.9.0"), ("redis", "8.1.0"), ("nosuch", "1.0"), ("broken", "2.0")]
    status, found = await run_fallback(base, pins)
    assert status == audit.PARTLY_AUDITED
    assert found.audited == 1
    out = capsys.readouterr().out
    assert ("not audited: aiohttp 3.9.0: PyPI's advisories are for its latest release "
            "(3.14.5)") in out
    assert "not audited: nosuch 1.0: PyPI did not answer" in out
    assert "not audited: broken 2.0: PyPI did not answer" in out
    assert "audited 1 of 4 pinned dependencies" in out


async def test_an_answer_without_the_advisories_is_not_audited(
        pypi: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    """A project answer that does not carry PyPI's ``vulnerabilities`` list (a mirror or
    a proxy serving its own copy of the endpoint, or null) says nothing about
    advisories: the pin is named as not audited, never counted as clean; an answer of
    another shape is named too, not a traceback."""
    base, _ = pypi
    pins = [("mirrored", "1.0"), ("nulled", "1.0"), ("odd", "1.0"), ("redis", "8.1.0")]
    status, found = await run_fallback(base, pins)
    assert status == audit.PARTLY_AUDITED
    assert found.audited == 1
    out = capsys.readouterr().out
    assert "not audited: mirrored 1.0: PyPI's answer carries no advisories list" in out
    assert "not audited: nulled 1.0: PyPI's answer carries no advisories list" in out
    assert "not audited: odd 1.0: PyPI's advisories are for its latest release (unknown)" \
        in out


async def test_nothing_answers_is_not_clean(capsys: pytest.CaptureFixture[str]) -> None:
    """No PyPI reachable at all (a closed port): exit 3 and 'NOT audited', never 'clean'."""
    status, found = await run_fallback("http://127.0.0.1:9/pypi", [("redis", "8.1.0")])
    assert status == audit.NONE_AUDITED
    assert found.audited == 0
    assert "NOT audited" in capsys.readouterr().out


def test_only_https_or_loopback_is_fetched() -> None:
    """The fallback fetches PyPI over HTTPS (or a loopback test server), nothing else."""
    with pytest.raises(ValueError, match="refusing"):
        audit.project_json("redis", base="file:///etc")


def test_a_pin_pip_audit_does_not_mention_is_not_clean(
        capsys: pytest.CaptureFixture[str]) -> None:
    """pip-audit's own report (its sources reachable): an advisory fails; a pin the report
    does not mention, or an empty report, is named as not audited and fails too (exit 1);
    names compare as PyPI compares them (PyYAML is pyyaml)."""
    pins = [("PyYAML", "6.0.4"), ("typing_extensions", "4.16.0")]
    clean = {"dependencies": [{"name": "pyyaml", "version": "6.0.4", "vulns": []},
                              {"name": "typing-extensions", "version": "4.16.0", "vulns": []}]}
    assert audit.judge(clean, pins) == audit.OK
    assert "2 pinned dependencies, no known vulnerability" in capsys.readouterr().out
    assert audit.judge({"dependencies": []}, pins) == audit.VULNERABLE
    out = capsys.readouterr().out
    assert "not audited: PyYAML 6.0.4: pip-audit's report does not mention it" in out
    assert "no known vulnerability" not in out
    one = {"dependencies": [{"name": "pyyaml", "version": "6.0.4", "vulns": [
        {"id": "GHSA-x", "fix_versions": ["6.0.5"]}]}]}
    assert audit.judge(one, pins) == audit.VULNERABLE
    out = capsys.readouterr().out
    assert "VULNERABLE pyyaml 6.0.4: GHSA-x (fixed in 6.0.5)" in out
    assert "not audited: typing_extensions 4.16.0" in out


def test_freeze_names_what_is_not_a_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock holds the exact releases pip freeze lists; a requirement installed from a
    URL or a path (no release PyPI has advisories for) is returned apart, to be named."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nprintf '%s\\n' 'redis==8.1.0' 'Jinja2==3.1.6' "
                      "'# a comment' 'mylib @ file:///src/mylib' ''\n")
    python.chmod(0o755)
    monkeypatch.setattr(audit, "LOCK", tmp_path / "requirements.lock")
    pins, unpinned = audit.freeze(tmp_path / "venv")
    assert pins == [("Jinja2", "3.1.6"), ("redis", "8.1.0")]
    assert unpinned == ["mylib @ file:///src/mylib"]
    assert (tmp_path / "requirements.lock").read_text().splitlines()[1:] == [
        "Jinja2==3.1.6", "redis==8.1.0"]
