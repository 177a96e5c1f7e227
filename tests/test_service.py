"""The whole service as `callroute serve` runs it: FastAGI routing, AMI call tracking
from a replayed Asterisk recording, durable delivery of call records to the CRM, and
the admin API, all on loopback against a real Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ami.peer import AmiPeer
from ami.records import CallRecord, record_key_for
from dialplan.peer import AsteriskAgiPeer, build_environment
from router.app import serve
from router.samplecrm import make_app, start_sample_crm, state_of
from router.settings import Settings, load_settings
from tests.redis_server import RedisServer, free_port
from tests.waiting import wait_for

ROOT = Path(__file__).parents[1]


@dataclass
class Service:
    """A running service and the peers around it."""

    settings: Settings
    crm: web.Application
    ami: AmiPeer
    stop: asyncio.Event
    task: asyncio.Task[int]


def activities(app: web.Application) -> list[dict[str, object]]:
    """Activities the sample CRM has stored."""
    state = state_of(app)
    return [o for o in state.objects.get("activities", {}).values()]


@pytest.fixture
async def service(redis_url: str, tmp_path: Path, fixtures_dir: Path) -> AsyncIterator[Service]:
    """`serve()` with the example config, pointed at loopback peers."""
    app = make_app(token="demo-token")
    runner, crm_url = await start_sample_crm("127.0.0.1", 0, app)
    base = load_settings(ROOT / "examples" / "config.yaml")
    ami = AmiPeer(fixtures_dir / "ami-basic.raw", pace_s=0.0, username=base.ami.username,
                  secret=base.ami.secret.get_secret_value())
    await ami.start()
    settings = base.model_copy(update={
        "agi": base.agi.model_copy(update={"port": free_port()}),
        "ami": base.ami.model_copy(update={"port": ami.port, "reconnect_min_s": 0.05,
                                           "cdr_grace_s": 0.2}),
        "admin": base.admin.model_copy(update={"port": free_port()}),
        "crm": base.crm.model_copy(update={"base_url": crm_url}),
        "redis": base.redis.model_copy(update={"url": redis_url}),
        "outbox": base.outbox.model_copy(update={"spool_dir": tmp_path / "spool"}),
    })
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        await wait_for(lambda: ami.logins >= 1 or task.done())
        assert not task.done(), task.exception()
        yield Service(settings, app, ami, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await ami.stop()
        await runner.cleanup()


async def test_every_recorded_call_reaches_the_crm_once(service: Service) -> None:
    """The four calls of ami-basic.raw become exactly four activities, keyed by Linkedid,
    with the outcome the recording shows."""
    await wait_for(lambda: len(activities(service.crm)) >= 4)
    await asyncio.sleep(0.5)  # nothing more should arrive
    acts = activities(service.crm)
    assert len(acts) == 4
    posts = [r for r in state_of(service.crm).requests if r.path == "/api/activities"]
    keys = {r.idempotency_key for r in posts}
    assert keys == {"call:1795338333.0", "call:1795338363.4", "call:1795338393.10",
                    "call:1795338423.18"}
    by_call = {a["call_id"]: a for a in acts}  # type: ignore[index]
    first = by_call["1795338333.0"]
    assert first["caller"] == "+8613800138000"
    assert first["customer_id"] == "C-1001"
    assert first["outcome"] == "answered"


async def test_routes_calls_and_reports_ready(service: Service) -> None:
    """While running, FastAGI answers calls and the admin API reports readiness."""
    port = service.settings.agi.port
    env = build_environment("+8613800138000", "Li Lei", "4008001000", port=port)
    result = await AsteriskAgiPeer("127.0.0.1", port, env).run()
    assert result.variables["CRM_CUSTOMER_ID"] == "C-1001"
    admin = f"http://127.0.0.1:{service.settings.admin.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin}/readyz") as r:
            body = await r.json()
            assert body["checks"]["ami"] is True
            assert body["checks"]["outbox"] is True
        async with http.get(f"{admin}/api/outbox") as r:
            assert r.status == 200
        async with http.get(f"{admin}/metrics") as r:
            assert "callroute_decisions_total" in await r.text()


async def test_orderly_stop_finishes_routing_before_ami_goes(service: Service) -> None:
    """Stopping while a call is being routed: the FastAGI session in flight is finished
    first (its commands are answered), and only then does callroute log off AMI, so the
    calls routed last are still followed."""
    env = build_environment("+8613800138000", "Li Lei", "4008001000",
                            port=service.settings.agi.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", service.settings.agi.port)
    try:
        writer.write(env)
        first = await asyncio.wait_for(reader.readline(), 5)
        assert first.startswith(b"SET VARIABLE")
        service.stop.set()
        await asyncio.sleep(0.3)
        assert not service.task.done()
        assert [a for a in service.ami.actions if a.get("Action") == "Logoff"] == []
        while True:  # answer every command until the server closes the session
            writer.write(b"200 result=1\n")
            if not await asyncio.wait_for(reader.readline(), 5):
                break
    finally:
        writer.close()
    assert await asyncio.wait_for(service.task, 20) == 0
    assert [a.get("Action") for a in service.ami.actions][-1] == "Logoff"


async def test_rules_checks_start_nothing_once_stopped() -> None:
    """A rules reload that lands while serve shuts down, after the comparison with Asterisk
    was stopped (the rules watcher stops later), starts no new comparison: it would wait
    for an AMI connection that never comes back, left running past the stop."""
    from ami.client import AmiClient
    from router.app import RulesChecks
    from router.rules.decide import load_rules

    settings = load_settings(ROOT / "examples" / "config.yaml")
    rules = load_rules(settings.path(settings.routing.rules),
                       default_queue=settings.routing.default_queue)
    checks = RulesChecks(settings, lambda: rules, AmiClient(settings.ami))

    def comparing() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "asterisk-check"
                and not t.done()]

    checks.run()
    assert len(comparing()) == 1
    await checks.stop()
    assert comparing() == []
    checks.on_reload("file-watch", "before", "after", True)
    assert comparing() == []


async def test_a_delivery_worker_that_fails_says_so(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """If the delivery worker stops on an error nothing caught (a bug, here one planted in
    its loop), serve logs it at once with the traceback, instead of leaving the outbox
    undelivered without a word until the next start."""
    from router.records.delivery import DeliveryWorker

    async def broken(self: DeliveryWorker, state: dict[str, float]) -> None:
        raise RuntimeError("planted bug")

    monkeypatch.setattr(DeliveryWorker, "_iteration", broken)
    base = load_settings(ROOT / "examples" / "config.yaml")
    settings = base.model_copy(update={
        "agi": base.agi.model_copy(update={"port": 0}),
        "ami": base.ami.model_copy(update={"enabled": False}),
        "admin": base.admin.model_copy(update={"enabled": False}),
        "crm": base.crm.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}"}),
        "redis": base.redis.model_copy(update={"url": redis_url}),
        "outbox": base.outbox.model_copy(update={"spool_dir": tmp_path / "spool"}),
    })
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))

    def reported() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.ERROR
                and "delivery stopped on an error" in r.getMessage()]

    try:
        await wait_for(lambda: reported() or task.done())
        assert not task.done()
        (record,) = reported()
        assert record.exc_info is not None
        assert "planted bug" in str(record.exc_info[1])
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0


async def test_deliver_alone_posts_what_waits_in_the_outbox(
        redis_url: str, tmp_path: Path) -> None:
    """``callroute deliver`` (no FastAGI, no AMI) posts a record that waits in the outbox
    to the CRM, once, and stops cleanly when told to."""
    from router.app import deliver
    from router.records.outbox import Outbox, connect_redis

    app = make_app(token="demo-token")
    runner, crm_url = await start_sample_crm("127.0.0.1", 0, app)
    base = load_settings(ROOT / "examples" / "config.yaml")
    settings = base.model_copy(update={
        "crm": base.crm.model_copy(update={"base_url": crm_url}),
        "redis": base.redis.model_copy(update={"url": redis_url}),
        "outbox": base.outbox.model_copy(update={"spool_dir": tmp_path / "spool"}),
    })
    redis = connect_redis(settings)
    record = CallRecord(record_key=record_key_for("1700000000.1"), linkedid="1700000000.1",
                        caller="+8613800138000", customer_id="C-1001", outcome="answered")
    await Outbox.from_settings(settings, redis).enqueue(record)
    stop = asyncio.Event()
    task = asyncio.create_task(deliver(settings, stop))
    try:
        await wait_for(lambda: len(activities(app)) >= 1 or task.done())
        assert not task.done(), task.exception()
        await asyncio.sleep(0.3)
        assert [a["call_id"] for a in activities(app)] == ["1700000000.1"]
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
        await redis.aclose()
        await runner.cleanup()


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one metric sample (0 when absent)."""
    from router.metrics import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def total(name: str) -> float:
    """The sum of a counter over all its label values."""
    from router.metrics import REGISTRY

    return sum(s.value for m in REGISTRY.collect() for s in m.samples if s.name == name)


async def test_serve_warns_about_what_asterisk_lacks(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Once logged in to AMI, `serve` compares the queues and agents the rules name with
    the running Asterisk (the recording has support and vip only) and logs a warning for
    each one missing, and keeps running."""
    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.get_records("setup") + caplog.records
                if r.name == "router.app" and r.getMessage().startswith("asterisk: ")]

    await wait_for(lambda: len(warnings()) >= 2)
    lines = warnings()
    assert ("asterisk: queue 'retention' (rule 'churn-risk') does not exist in Asterisk "
            "(queues there: support, vip)") in lines
    assert any(line.startswith("asterisk: queue 'sales'") for line in lines)
    port = service.settings.agi.port
    env = build_environment("+8613800138000", "Li Lei", "4008001000", port=port)
    assert (await AsteriskAgiPeer("127.0.0.1", port, env).run()).variables


async def test_api_explain_counts_nothing_and_stores_nothing(service: Service) -> None:
    """/api/explain decides as a call would, but no decision or lookup is counted, nothing
    is written to the shared cache, and the service's own cache stays as it was: the
    next real call for that number still asks the CRM. A time without an offset is read
    in the rules' time zone (Asia/Shanghai): 10:30 there is business hours."""
    import redis.asyncio as aioredis

    admin = f"http://127.0.0.1:{service.settings.admin.port}"
    redis = aioredis.Redis.from_url(service.settings.redis.url)
    prefix = service.settings.redis.prefix
    try:
        cached = len(await redis.keys(f"{prefix}cust:*"))
        decisions, lookups = total("callroute_decisions_total"), total("callroute_lookups_total")
        async with aiohttp.ClientSession() as http:
            url = f"{admin}/api/explain?number=13900139000&did=4008001000&at=2026-11-23T10:30:00"
            async with http.get(url) as r:
                assert r.status == 200
                body = await r.json()
        assert body["rule"] == "vip-owner"
        assert body["customer"]["id"] == "C-1002"
        assert body["at"] == "2026-11-23T10:30:00+08:00"
        await asyncio.sleep(0.2)  # a write behind would have gone out by now
        assert total("callroute_decisions_total") == decisions
        assert total("callroute_lookups_total") == lookups
        assert len(await redis.keys(f"{prefix}cust:*")) == cached
        crm_lookups = sample("callroute_lookups_total", {"source": "crm"})
        port = service.settings.agi.port
        env = build_environment("13900139000", "Han Meimei", "4008001000", port=port)
        result = await AsteriskAgiPeer("127.0.0.1", port, env).run()
        assert result.variables["CRM_CUSTOMER_ID"] == "C-1002"
        assert sample("callroute_lookups_total", {"source": "crm"}) == crm_lookups + 1
        assert total("callroute_decisions_total") == decisions + 1
    finally:
        await redis.aclose()


async def test_api_outbox_while_redis_is_down(own_redis: RedisServer, tmp_path: Path) -> None:
    """GET /api/outbox while the redis-server is killed answers 503 with what is known
    (Redis down, the records waiting in the disk spool), not a 500; with Redis back it
    answers 200, and killing Redis again mid-run gives the 503 again."""
    from router.records.outbox import Outbox, connect_redis

    base = load_settings(ROOT / "examples" / "config.yaml")
    settings = base.model_copy(update={
        "agi": base.agi.model_copy(update={"port": 0}),
        "ami": base.ami.model_copy(update={"enabled": False}),
        "admin": base.admin.model_copy(update={"port": free_port()}),
        "crm": base.crm.model_copy(update={"base_url": f"http://127.0.0.1:{free_port()}"}),
        "redis": base.redis.model_copy(update={"url": own_redis.url}),
        "outbox": base.outbox.model_copy(update={"spool_dir": tmp_path / "spool"}),
    })
    own_redis.stop()
    redis = connect_redis(settings)
    record = CallRecord(record_key=record_key_for("1700000000.9"), linkedid="1700000000.9",
                        caller="+8613800138000", outcome="answered")
    await Outbox.from_settings(settings, redis).enqueue(record)  # Redis down: spooled
    await redis.aclose()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    url = f"http://127.0.0.1:{settings.admin.port}/api/outbox"
    try:
        async with aiohttp.ClientSession() as http:
            async def outbox() -> tuple[int, dict[str, object]]:
                async with http.get(url) as r:
                    return r.status, await r.json()

            async def answers(status: int) -> bool:
                try:
                    return (await outbox())[0] == status
                except aiohttp.ClientError:
                    return False

            async def until(status: int) -> dict[str, object]:
                deadline = asyncio.get_running_loop().time() + 15
                while not await answers(status):
                    assert not task.done(), task.exception()
                    assert asyncio.get_running_loop().time() < deadline, f"no {status}"
                    await asyncio.sleep(0.05)
                return (await outbox())[1]

            body = await until(503)
            assert body["redis"] == "down"
            assert body["depth"] is None
            assert body["spool_records"] == 1
            assert "Error" in str(body["error"])
            own_redis.start()
            body = await until(200)
            assert body["redis"] == "up"
            assert isinstance(body["depth"], int)
            own_redis.stop()
            body = await until(503)
            assert body["redis"] == "down"
            assert isinstance(body["spool_records"], int)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_the_record_queue_tells_a_stored_record_not_a_lost_one() -> None:
    """The record queue tells ``done`` a record's Linkedid once it is stored (its call's
    parked state may go), never when storing failed (the state stays for the next start,
    which posts the call from it)."""
    from router.app import RecordQueue

    stored: list[str] = []
    told: list[str] = []

    async def enqueue(record: CallRecord) -> str:
        if record.linkedid == "2.2":
            raise RuntimeError("outbox and spool down")
        stored.append(record.linkedid)
        return "enqueued"

    queue = RecordQueue(enqueue, done=told.append)
    for lid in ("1.1", "2.2"):
        queue.put(CallRecord(record_key=record_key_for(lid), linkedid=lid, outcome="answered"))
    await queue.drain()
    assert (stored, told) == (["1.1"], ["1.1"])
