"""The service with its pages, on loopback: real Redis, the sample CRM, a scripted AMI
peer that sends recorded Asterisk events when the test says so, and headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from ami.peer import AmiPeer, Recording
from dialplan.peer import AsteriskAgiPeer, build_environment
from router.app import serve
from router.auth.roles import Role
from router.auth.users import FileUserStore, make_user
from router.samplecrm import make_app, start_sample_crm, state_of
from router.settings import Settings, WebSettings, load_settings
from tests.redis_server import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).parents[3]
RECORDING = ROOT / "tests" / "fixtures" / "asterisk-22" / "ami-basic.raw"

#: The pages' users: (role, agent id). Their tokens are made per test (``service.tokens``).
USERS: dict[str, tuple[Role, str | None]] = {
    "li-na": (Role.AGENT, "7001"),
    "wang-wei": (Role.AGENT, "7002"),
    "chen-jie": (Role.AGENT, "7101"),
    "boss": (Role.SUPERVISOR, None),
    "looker": (Role.VIEWER, None),
}
ADMIN_TOKEN = "admin-token-abcdef"
CRM_URL = "https://crm.example.test/customers/{id}"
#: The example rules without business hours, so the route does not depend on the clock.
RULES = """
agents:
  "7001": {dial: Local/7001@agents, name: Li Na}
  "7002": {dial: Local/7002@agents, name: Wang Wei}
  "7009": {dial: Local/7009@agents, name: Chen Jie}
  "7101": {dial: Local/7101@agents, name: VIP desk}
rules:
  - name: vip-owner
    description: Gold and platinum customers ring their owner, then the VIP queue
    when: {tier: [gold, platinum]}
    owner: {ring_s: 15, fallback: {queue: {name: vip, priority: 10}}}
  - name: churn-risk
    description: Customers tagged churn-risk go to the retention team
    when: {tags_any: [churn-risk]}
    queue: {name: retention, priority: 5}
default:
  queue: {name: support}
"""


class ScriptedAmi(AmiPeer):
    """An AMI peer that answers actions and sends recorded events only when told."""

    def __init__(self) -> None:
        super().__init__(replay=False)
        self.recording_events = Recording.load(RECORDING)

    def events(self, first: int, last: int) -> list[bytes]:
        """The recording's events ``first``..``last`` (inclusive)."""
        return self.recording_events.events[first:last + 1]

    async def play(self, blocks: list[bytes]) -> None:
        """Send ``blocks`` to every connected client now."""
        data = b"".join(block + b"\r\n\r\n" for block in blocks)
        for writer in list(self._writers):
            writer.write(data)
            await writer.drain()


@dataclass
class WebService:
    """A running service and the peers around it."""

    settings: Settings
    crm: web.Application
    ami: ScriptedAmi
    base: str
    tokens: dict[str, str]

    def activities(self) -> list[dict[str, Any]]:
        """Activities the sample CRM has stored."""
        return list(state_of(self.crm).objects.get("activities", {}).values())

    async def route(self, caller: str, name: str, uniqueid: str) -> dict[str, str]:
        """Run the route AGI for a call as Asterisk would; the channel variables set."""
        port = self.settings.agi.port
        env = build_environment(caller, name, "4008001000", uniqueid, port=port)
        result = await AsteriskAgiPeer("127.0.0.1", port, env).run()
        return dict(result.variables)


@pytest.fixture(name="redis")
async def redis_fixture(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis (flushed), answering str."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def web_settings(**changes: Any) -> WebSettings:
    """The web section the tests run with."""
    values: dict[str, Any] = {"crm_url": CRM_URL, "wrapup_s": 30.0,
                              "language": "en", "timezone": "Asia/Shanghai"}
    values.update(changes)
    return WebSettings(**values)


@pytest.fixture
async def service(redis_url: str, tmp_path: Path,
                  request: pytest.FixtureRequest) -> AsyncIterator[WebService]:
    """`serve()` with the example config and the pages, pointed at loopback peers (the
    web section changed by an indirect parameter, e.g. ``{"wrapup_s": 1.0}``)."""
    app = make_app(token="demo-token")
    runner, crm_url = await start_sample_crm("127.0.0.1", 0, app)
    ami = ScriptedAmi()
    await ami.start()
    base = load_settings(ROOT / "examples" / "config.yaml")
    call = base.crm.record_step("call")
    assert call is not None
    body = dict(call.body) if isinstance(call.body, dict) else {}
    body.update({"disposition": "{record.disposition}", "note": "{record.disposition_note}"})
    records = [s.model_copy(update={"body": body}) if s.name == "call" else s
               for s in base.crm.records]
    store = FileUserStore(tmp_path / "users.json")
    tokens = {}
    for name, (role, agent) in USERS.items():
        user, tokens[name] = make_user(name, role, agent)
        await store.save(user)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    settings = base.model_copy(update={
        "routing": base.routing.model_copy(update={"rules": rules}),
        "agi": base.agi.model_copy(update={"port": free_port()}),
        "ami": base.ami.model_copy(update={"port": ami.port, "reconnect_min_s": 0.05,
                                           "cdr_grace_s": 0.2}),
        "admin": base.admin.model_copy(update={"port": free_port(), "token": ADMIN_TOKEN}),
        "auth": base.auth.model_copy(update={"users_file": store.path}),
        "crm": base.crm.model_copy(update={"base_url": crm_url, "records": records}),
        "redis": base.redis.model_copy(update={"url": redis_url}),
        "outbox": base.outbox.model_copy(update={"spool_dir": tmp_path / "spool",
                                                 "poll_interval_s": 0.05}),
        "web": web_settings(**getattr(request, "param", {})),
    })
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    admin = f"http://127.0.0.1:{settings.admin.port}"
    try:
        await wait_for(lambda: ami.logins >= 1 or task.done())
        assert not task.done(), task.exception()

        async def up() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{admin}/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up)
        yield WebService(settings, app, ami, admin, tokens)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await ami.stop()
        await runner.cleanup()


def chromium_path() -> str | None:
    """Debian's Chromium (./dev test installs it)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Debian Chromium driven by Playwright (no browser download of its own)."""
    from playwright.async_api import async_playwright

    path = chromium_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (./dev test installs Debian's package)")
        pytest.skip("chromium not installed: run ./dev test, or apt-get install chromium")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=path, headless=True,
                                    args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            await b.close()


def pages_app(svc_args: dict[str, Any], users: dict[str, tuple[Role, str | None]]
              ) -> tuple[web.Application, dict[str, str]]:
    """The pages' routes alone behind the access middleware, for a WebService made of
    ``svc_args`` (``live`` at least) and these users; their tokens by name."""
    from router.auth.access import AuthContext, access_middleware
    from router.auth.users import Directory, make_user
    from router.web.routes import WebService as Pages
    from router.web.routes import add_web_routes

    made = {name: make_user(name, role, agent) for name, (role, agent) in users.items()}
    auth = AuthContext(Directory({name: user for name, (user, _) in made.items()}),
                       local_open=False)
    app = web.Application(middlewares=[access_middleware(auth)])
    svc_args = {"settings": WebSettings(), **svc_args}
    add_web_routes(app, Pages(auth=auth, **svc_args))
    return app, {name: token for name, (_, token) in made.items()}
