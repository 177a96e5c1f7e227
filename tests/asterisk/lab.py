"""callroute's real service against a real Asterisk, a real Redis and the sample CRM.

:func:`open_lab` starts, in order: a redis-server, the sample CRM (an aiohttp server on
loopback, seeded with :data:`CUSTOMERS`), an Asterisk from the kit with callroute's
asterisk-conf/ installed (:mod:`tests.asterisk.harness`), the test's AMI connection, and
callroute itself (``router.app.serve`` in this process, or ``callroute serve`` as a child
process when a test must kill it). Everything is stopped on the way out, also when a
test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import yaml
from aiohttp import web

from router.app import serve
from router.crm.config import sample_crm_section
from router.samplecrm import make_app, start_sample_crm, state_of
from router.settings import Settings, load_settings
from tests.asterisk.harness import (
    CALLROUTE_SECRET,
    ROOT,
    Asterisk,
    CallView,
    Observer,
    kit_required,
    zone_problem,
)
from tests.redis_server import RedisServer, free_port


def _customer(cid: str, name: str, phone: str, tier: str | None, owner: str | None,
              tags: list[str], kind: str | None = None) -> dict[str, Any]:
    customer = {"id": cid, "name": name, "phones": [phone], "tier": tier, "value": 1000,
                "owner": {"id": owner, "name": f"Agent {owner}"} if owner else None,
                "tags": tags, "open_tickets": 0, "language": "zh",
                "updated_at": "2025-01-10T09:00:00Z"}
    if kind is not None:
        customer["kind"] = kind  # the CRM object it is (the lab's lookup maps it)
    return customer


#: The CRM's customers in these tests (owners 7003 answers, 7019 is busy, 7018 never answers).
CUSTOMERS = [
    _customer("C-2001", "Li Lei", "+8613800138000", "gold", "7003", []),
    _customer("C-2002", "Han Meimei", "+8613900139000", "platinum", "7019", []),
    _customer("C-2003", "Zhou Jie", "+8613700137001", "silver", "7018", [], kind="lead"),
    _customer("C-2004", "Impatient", "+8613600136000", "bronze", None, ["churn-risk"]),
    _customer("C-2005", "Patient", "+8613600136001", "bronze", None, ["churn-risk"]),
    _customer("C-2006", "Blocked Caller", "+8613300133000", "bronze", None, ["blocked"]),
    _customer("C-2007", "Slow Case", "+8613700137000", "silver", None, [], kind="lead"),
]
#: Lookup delays (s): the slow CRM record answers after the routing deadline (300 ms).
DELAYS = {"C-2007": 1.0}

#: The routing rules of these tests (no schedules: the same route at any hour).
RULES = """\
agents:
  "7001": {dial: Local/7001@agents, name: Li Na}
  "7002": {dial: Local/7002@agents, name: Wang Wei}
  "7003": {dial: Local/7003@agents, name: Sun Li}
  "7018": {dial: Local/7018@agents, name: Zhao Min}
  "7019": {dial: Local/7019@agents, name: Chen Jie}
  "7101": {dial: Local/7101@agents, name: VIP desk}
rules:
  - name: blocked
    when: {known: true, tags_any: [blocked]}
    reject: {cause: busy}
  - name: mailbox-line
    when: {did: ["4008003000"]}
    voicemail: {mailbox: "8000@default"}
  - name: misnamed-queue
    when: {did: ["4008009000"]}
    queue: nosuchqueue
  - name: vip-owner
    when: {tier: [gold, platinum]}
    owner: {ring_s: 4, fallback: {queue: {name: vip, priority: 10}}}
  - name: churn-risk
    when: {tags_any: [churn-risk]}
    queue: {name: retention, priority: 5}
  - name: unknown-sales-line
    when: {known: false, did: ["4008002000"]}
    queue: sales
  - name: key-account-owner
    when: {has_owner: true}
    owner: {ring_s: 4, fallback: {queue: support}}
default:
  queue: support
"""

#: The activity the tests have callroute post: every field a record can carry.
ACTIVITY = {
    "call_id": "{record.linkedid}", "record_key": "{record.record_key}",
    "customer_id": "{record.customer_id}", "customer_tier": "{record.customer_tier}",
    "customer_kind": "{record.customer_kind}", "customer_owner": "{record.customer_owner}",
    "caller": "{record.caller}", "caller_raw": "{record.caller_raw}",
    "caller_name": "{record.caller_name}", "anonymous": "{record.anonymous}",
    "did": "{record.did}", "outcome": "{record.outcome}", "queue": "{record.queue}",
    "route_queue": "{record.route_queue}", "route_target": "{record.route_target}",
    "rule": "{record.routing_rule}", "reason": "{record.route_reason}",
    "degraded": "{record.degraded}", "agents_rung": "{record.agents_rung}",
    "answered_by": "{record.answered_by}", "agent": "{record.answered_by_agent}",
    "started_at": "{record.start}", "answered_at": "{record.answer}",
    "ended_at": "{record.end}", "wait_s": "{record.wait_s}", "talk_s": "{record.talk_s}",
    "queue_wait_s": "{record.queue_wait_s}", "voicemail": "{record.voicemail}",
    "voicemail_s": "{record.voicemail_s}", "recording": "{record.recording}",
    "recording_url": "{record.recording_url}", "incomplete": "{record.incomplete}",
}


def callroute_config(tmp: Path, *, agi_port: int, ami_port: int, admin_port: int,
                     redis_url: str, crm_url: str, monitor: Path) -> Path:
    """Write callroute's config for the lab (examples/config.yaml with the lab's
    addresses and rules) and return its path."""
    data = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    crm = sample_crm_section(crm_url)
    crm["activity"]["body"] = ACTIVITY
    crm["lookup"]["fields"]["kind"] = "kind"
    crm.pop("recordings", None)
    data.update({
        "agi": {**data["agi"], "host": "127.0.0.1", "port": agi_port},
        "ami": {**data["ami"], "host": "127.0.0.1", "port": ami_port, "username": "callroute",
                "secret": CALLROUTE_SECRET, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "redis": {**data["redis"], "url": redis_url},
        "routing": {**data["routing"], "rules": str(rules)},
        "outbox": {**data["outbox"], "spool_dir": str(tmp / "spool")},
        "admin": {**data["admin"], "port": admin_port},
        "recordings": {"dir": str(monitor),
                       "url": f"http://127.0.0.1:{admin_port}/recordings",
                       "key": "lab-recordings-key"},
        "crm": crm,
        "log_level": "INFO",
    })
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Lab:
    """Everything one test module runs against."""

    tmp: Path
    asterisk: Asterisk
    observer: Observer
    crm: web.Application
    crm_url: str
    redis: RedisServer
    config: Path
    zone: tzinfo
    zone_problem: str | None = None
    _task: asyncio.Task[int] | None = None
    _stop: asyncio.Event | None = None
    _proc: asyncio.subprocess.Process | None = None
    proc_logs: list[Path] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    # --- callroute in this process ------------------------------------------------------
    async def start(self) -> None:
        """Run ``router.app.serve`` in this event loop until :meth:`stop`."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(serve(self.settings, self._stop))
        await self.wait_ready()

    async def stop(self) -> None:
        if self._task is None or self._stop is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, 30)
        finally:
            self._task = None

    # --- callroute as a child process ---------------------------------------------------
    async def spawn(self) -> None:
        """Start ``callroute serve`` as a child process (stderr to a log file)."""
        log = self.tmp / f"serve-{len(self.proc_logs) + 1}.log"
        self.proc_logs.append(log)
        with log.open("wb") as out:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router.cli", "serve", "--config", str(self.config),
                stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        await self.wait_ready()

    async def end_process(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to the child and wait for it to exit; returns its exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return 0
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            return await proc.wait()

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the running child (True when there is one)."""
        if self._proc is None or self._proc.returncode is not None:
            return False
        self._proc.send_signal(sig)
        return True

    async def wait_ready(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Until the admin API says ready (AMI logged in, Redis up, FastAGI listening)."""
        url = f"http://127.0.0.1:{self.settings.admin.port}/readyz"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self._task is not None and self._task.done():
                    raise RuntimeError(f"serve() ended: {self._task.result()}")
                if self._proc is not None and self._proc.returncode is not None:
                    raise RuntimeError(f"callroute serve exited {self._proc.returncode}: "
                                       f"{self.proc_logs[-1].read_text()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise TimeoutError("callroute did not become ready")
                await asyncio.sleep(0.05)

    # --- what the CRM received ----------------------------------------------------------
    def objects(self, collection: str, linkedid: str) -> list[dict[str, Any]]:
        """Objects of a CRM collection (activities, leads, tasks) made for this call."""
        return [o for o in state_of(self.crm).objects[collection].values()
                if o.get("call_id") == linkedid]

    def objects_all(self, collection: str) -> list[dict[str, Any]]:
        """Every object of a CRM collection."""
        return list(state_of(self.crm).objects[collection].values())

    async def record(self, view: CallView, timeout: float = 20.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The activity posted for the call (waits for it); fails if there is not one."""
        deadline = time.monotonic() + timeout
        while not self.objects("activities", view.linkedid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no call record posted for {view.linkedid}")
            await asyncio.sleep(0.02)
        (activity,) = self.objects("activities", view.linkedid)
        return activity


@asynccontextmanager
async def open_lab(tmp: Path, *, tz: str | None = "Asia/Shanghai",
                   globals_: Mapping[str, str] | None = None) -> AsyncIterator[Lab]:
    """Redis, sample CRM, Asterisk (its clock in zone ``tz``; None: this host's) and the
    test's AMI connection; callroute is started by the test (:meth:`Lab.start` or
    :meth:`Lab.spawn`). Where Asterisk cannot get a zone of its own (no root), it runs in
    the host's zone and ``zone_problem`` says why (an error when the kit is required)."""
    problem = zone_problem(tz) if tz else None
    if problem and kit_required():
        raise RuntimeError(f"Asterisk cannot run in {tz}: {problem}")
    if problem:
        tz = None
    zone: tzinfo = ZoneInfo(tz) if tz else datetime.now().astimezone().tzinfo or ZoneInfo("UTC")
    async with contextlib.AsyncExitStack() as stack:
        redis = RedisServer()
        redis.start()
        stack.callback(redis.close)
        app = make_app(CUSTOMERS, token="demo-token", delays=DELAYS)
        runner, crm_url = await start_sample_crm("127.0.0.1", 0, app)
        stack.push_async_callback(runner.cleanup)
        ami_port, agi_port = free_port(), free_port()
        asterisk = Asterisk(tmp / "asterisk", ami_port, agi_port, tz=tz, globals_=globals_)
        stack.callback(asterisk.stop)
        asterisk.start()
        observer = Observer(ami_port)
        await observer.connect()
        stack.push_async_callback(observer.close)
        config = callroute_config(tmp, agi_port=agi_port, ami_port=ami_port,
                                  admin_port=free_port(), redis_url=redis.url, crm_url=crm_url,
                                  monitor=asterisk.monitor)
        lab = Lab(tmp, asterisk, observer, app, crm_url, redis, config, zone, problem)
        stack.push_async_callback(lab.end_process)
        stack.push_async_callback(lab.stop)
        yield lab
