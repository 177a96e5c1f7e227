"""Assembles the service from the settings: the call path, AMI tracking, delivery, admin.

``serve`` runs until SIGTERM/SIGINT and then shuts down in order: stop taking new AGI
sessions and finish those in flight, stop AMI (flushing finished calls into the
outbox; calls still up are *parked* in Redis, not posted, :mod:`ami.parking`), stop
delivery (unfinished records stay in the outbox for the next run). The next start picks
the parked calls up again from Asterisk's ``CoreShowChannels`` and posts their real
records when they end; one that ended meanwhile gets one record from its parked state,
flagged incomplete. Open calls are also checkpointed as they go, so a kill leaves the
same behind. When Redis cannot take them at shutdown, calls still up are posted as
incomplete. SIGHUP reloads the rules file.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from aiohttp import web

from ami.complete import CustomerFinder, RecordCompleter
from ami.recordings import RecordingLinks
from dialplan.explain import explain, outcome_to_dict
from dialplan.route import Router, make_route_handler
from dialplan.server import AgiServer
from router.admin import (
    AdminDeps,
    add_crm_webhook,
    add_recordings,
    auth_context,
    connect_actions,
    make_admin_app,
)
from router.crm.auth import TokenStore
from router.crm.http import CrmHttp
from router.crm.limits import RateGate
from router.crm.rest import RestConnector
from router.crypto import keyring_from_settings
from router.errors import AmiError, ListenError
from router.log import mask_record
from router.lookup.cache import TwoLevelCache
from router.lookup.cached_lookup import CachedLookup
from router.lookup.readonly import ReadOnlyLookup
from router.lookup.sync import SyncReport, periodic_sync, run_sync
from router.models import Customer
from router.phone import normalize
from router.rules import inventory
from router.rules.decide import RuleSet
from router.rules.presence import Presence, device_of
from router.rules.ruleswatch import RulesWatcher
from router.settings import Settings

if TYPE_CHECKING:
    from ami.client import AmiClient
    from router.records.delivery import DeliveryWorker
    from router.records.outbox import Outbox
    from router.web.assemble import WebParts

log = logging.getLogger(__name__)


class CrmLink:
    """What the connectors of one process share for the CRM: its rate gate (a 429 seen
    while posting pauses the lookups too) and, for OAuth2, the Redis client that shares
    the access token between instances (:mod:`router.crm.auth`)."""

    def __init__(self, settings: Settings) -> None:
        from router.records.outbox import connect_redis

        self.settings = settings
        self.gate = RateGate(settings.crm.limits, crm=settings.crm.name)
        oauth2 = settings.crm.auth.oauth2
        shared = settings.crm.auth.type == "oauth2" and oauth2 is not None and oauth2.shared
        self.redis = connect_redis(settings) if shared else None

    def connector(self) -> RestConnector:
        """A connector with a pool of its own, sharing the gate and the token store."""
        from router.records.outbox import keys_from_settings

        crm = self.settings.crm
        store = None if self.redis is None else TokenStore(
            self.redis, keys_from_settings(self.settings), crm.name,
            keyring_from_settings(self.settings))
        http = CrmHttp(crm, gate=self.gate, token_store=store)
        return RestConnector(crm, region=self.settings.phone.default_region, http=http)

    async def aclose(self) -> None:
        """Close the token store's Redis client."""
        if self.redis is not None:
            await self.redis.aclose()


@asynccontextmanager
async def build_router(
    settings: Settings, presence: Presence | None = None, link: CrmLink | None = None
) -> AsyncIterator[Router]:
    """A :class:`Router` with the configured CRM connector, cache and rules."""
    own_link = link is None
    link = link or CrmLink(settings)
    connector = link.connector()
    lookup = CachedLookup.from_settings(settings, connector)
    watcher = RulesWatcher(settings.path(settings.routing.rules),
                           default_queue=settings.routing.default_queue)
    router = Router(settings, lookup, watcher.current, presence)
    router.watcher = watcher
    try:
        yield router
    finally:
        await lookup.drain(1.0)
        await lookup.aclose()
        await connector.aclose()
        if own_link:
            await link.aclose()


async def run_sync_once(settings: Settings, *, progress: bool) -> SyncReport:
    """``callroute sync``: one pre-warm pass from the CRM's changed-customers feed,
    resuming from the cursor saved in Redis."""
    link = CrmLink(settings)
    connector = link.connector()
    lookup = CachedLookup.from_settings(settings, connector)
    cache = lookup.cache
    try:
        return await run_sync(connector, cache, cache.redis, cache.keys, progress=progress)
    finally:
        await lookup.aclose()
        await connector.aclose()
        await link.aclose()


class Delivery:
    """What delivers the outbox's call records: the outbox's Redis client, the outbox (its
    spool drainer), a connector of its own posting the records (an HTTP pool of its own,
    so slow posts never queue in front of the call path's lookups) and the delivery
    worker. :func:`open_delivery` builds it, for ``serve`` and ``callroute deliver``."""

    def __init__(self, redis: Any, outbox: Outbox, worker: DeliveryWorker) -> None:
        self.redis = redis
        self.outbox = outbox
        self.worker = worker

    def runs(self, stop: asyncio.Event) -> list[Coroutine[Any, Any, None]]:
        """The delivery worker and the spool drainer, each running until ``stop``."""
        return [self.worker.run(stop), self.outbox.run_drainer(stop)]


@asynccontextmanager
async def open_delivery(settings: Settings, link: CrmLink) -> AsyncIterator[Delivery]:
    """The outbox's delivery as configured (:class:`Delivery`); its connector and Redis
    client are closed on the way out, in that order."""
    from router.records.delivery import DeliveryWorker
    from router.records.outbox import Outbox, connect_redis

    redis = connect_redis(settings)
    try:
        sink = link.connector()
        try:
            outbox = Outbox.from_settings(settings, redis)
            yield Delivery(redis, outbox, DeliveryWorker.from_settings(settings, redis, sink))
        finally:
            await sink.aclose()
    finally:
        await redis.aclose()


async def deliver(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """``callroute deliver``: one delivery worker and the spool drainer alone, posting the
    outbox's call records with the configured connector until ``stop`` (or SIGTERM)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    link = CrmLink(settings)
    try:
        async with open_delivery(settings, link) as delivery:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await asyncio.gather(*delivery.runs(stop))
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
    finally:
        await link.aclose()
    return 0


def _explainer(router: Router) -> Callable[[str, str | None, datetime | None],
                                           Awaitable[dict[str, Any]]]:
    """``/api/explain``: decisions of a read-only view of the service's router (its cache
    is read, never written; nothing is counted)."""
    lookup = router.lookup
    assert isinstance(lookup, CachedLookup)  # build_router makes one
    explaining = router.explaining(ReadOnlyLookup(lookup))

    async def explain_one(number: str, did: str | None, at: datetime | None) -> dict[str, Any]:
        return outcome_to_dict(await explain(explaining, number, did, at))

    return explain_one


def assemble_admin(settings: Settings, deps: AdminDeps, cache: TwoLevelCache,
                   extra: Callable[[web.Application], None] | None = None,
                   connector: RestConnector | None = None) -> web.Application:
    """The admin HTTP application as ``serve`` runs it: the API, the CRM webhooks and what
    ``extra`` adds (every route with its access rule; tests enumerate them all)."""
    app = make_admin_app(deps)
    add_crm_webhook(app, cache, settings, deps.audit, connector)
    links = recording_links(settings)
    if links is not None:
        add_recordings(app, links.handle)
    if extra is not None:
        extra(app)
    return app


async def _start_admin(settings: Settings, app: web.Application) -> web.AppRunner:
    from router.auth.setup import server_ssl

    context = server_ssl(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.admin.host, settings.admin.port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError.from_os_error(
            exc, "admin.port", settings.admin.host, settings.admin.port) from exc
    log.info("admin API on %s://%s:%d", "https" if context else "http", settings.admin.host,
             settings.admin.port)
    return runner


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run the whole service until ``stop`` is set (or SIGTERM/SIGINT)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    presence = Presence()
    # a port that is taken fails the start before anything runs (and logs)
    check_free("agi.port", settings.agi.host, settings.agi.port)
    if settings.admin.enabled:
        check_free("admin.port", settings.admin.host, settings.admin.port)
    async with AsyncExitStack() as stack:
        from router.auth.setup import start_auth

        # first: an admin API that would be exposed unprotected stops the start here
        auth = await start_auth(settings, stack) if settings.admin.enabled else None
        if not keyring_from_settings(settings).enabled:
            log.warning("encryption at rest is off (no encryption.keys): customers and call "
                        "records are stored in clear in Redis and the spool")
        link = CrmLink(settings)
        stack.push_async_callback(link.aclose)
        router = await stack.enter_async_context(build_router(settings, presence, link))
        watcher = router.watcher
        assert watcher is not None  # build_router always sets it
        watcher.start()
        stack.push_async_callback(watcher.stop)

        web_parts = _web_parts(settings, presence, router) if settings.web.enabled else None

        def agents() -> dict[str, str]:
            return {device_of(a.dial): agent for agent, a in watcher.current().agents.items()}

        background = await _start_records(settings, presence, stack, agents, link, web_parts,
                                          _customer_finder(settings, router),
                                          recording_links(settings))
        # after the records: on the way out the calls in flight finish their routing
        # while AMI still follows them and delivery still runs
        agi = AgiServer(settings.agi)
        agi.route("route", make_route_handler(
            router, web_parts.decisions.put if web_parts is not None else None))
        await agi.start()
        log.info("FastAGI on %s:%d", settings.agi.host, agi.port)
        stack.push_async_callback(agi.stop, settings.agi.shutdown_grace_s)
        checks = RulesChecks(settings, watcher.current, background.ami)
        checks.run()
        watcher.listeners.append(checks.on_reload)
        stack.push_async_callback(checks.stop)

        if settings.admin.enabled:
            from router.auth.setup import start_audit

            deps = AdminDeps(explain=_explainer(router), presence=presence,
                             auth=auth, checks=background.checks,
                             audit=await start_audit(settings, stack))
            deps.checks["agi"] = _true
            deps.outbox_status = background.outbox_status
            lookup = router.lookup
            assert isinstance(lookup, CachedLookup)
            connect_actions(deps, settings, watcher=watcher, cache=lookup.cache,
                            outbox_redis=background.redis)

            web_service = None
            if web_parts is not None:
                from ami.records import record_key_for
                from router.web.assemble import make_service

                web_service = make_service(web_parts, settings, auth_context(deps),
                                           record_key_for=record_key_for,
                                           outbox_status=background.outbox_status,
                                           ami_connected=background.ami_connected,
                                           audit=deps.audit, number_target=deps.number_target)
                await web_service.start()
                stack.push_async_callback(web_service.stop)

            def add_pages(app: web.Application) -> None:
                if web_service is not None:
                    from router.web.routes import add_web_routes

                    add_web_routes(app, web_service)

            connector = lookup.directory if isinstance(lookup.directory, RestConnector) else None
            runner = await _start_admin(settings, assemble_admin(
                settings, deps, lookup.cache, add_pages, connector=connector))
            stack.push_async_callback(runner.cleanup)

        lookup_ = router.lookup
        if settings.cache.sync_interval_s > 0 and isinstance(lookup_, CachedLookup):
            c = lookup_.cache
            sync_task = asyncio.create_task(periodic_sync(
                lookup_.directory, c, c.redis, c.keys, settings.cache.sync_interval_s,
                stop=stop), name="cache-sync")
            sync_task.add_done_callback(_report_failure)
            stack.push_async_callback(_cancel, sync_task)

        # Everything built so far lives as long as the process: move it out of the
        # collector's reach, so a full collection cannot pause the call path for tens
        # of milliseconds (measured: 40-90 ms on a loaded heap).
        gc.collect()
        gc.freeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, watcher.reload, "signal")
        log.info("callroute is running")
        await stop.wait()
        checks.cancel()  # a comparison still under way says nothing more now
        log.info("shutting down")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


def _web_parts(settings: Settings, presence: Presence, router: Router) -> WebParts:
    """The screen pop's live view and decision store (``router.web``)."""
    from router.web.assemble import build_parts

    watcher = router.watcher
    assert watcher is not None

    def describe(rule: str) -> str | None:
        return next((r.description for r in watcher.current().rules if r.name == rule), None)

    from router.web.assemble import CardCustomers

    lookup = router.lookup
    customers = CardCustomers(lookup.cache) if isinstance(lookup, CachedLookup) else None
    return build_parts(settings, presence, lambda: watcher.current().agents, describe,
                       customers)


def check_free(setting: str, host: str, port: int) -> None:
    """Raise :class:`ListenError` when ``host:port`` cannot be bound right now (bound and
    released at once, with the SO_REUSEADDR the servers use)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError:
        return  # the server's own bind reports an address it cannot resolve
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ListenError.from_os_error(exc, setting, host, port) from exc


def _report_failure(task: asyncio.Task[Any]) -> None:
    """A background task of the service ended on an error nobody caught (a bug): say so
    at once, with the traceback. Its work stops until the next start (records wait in
    the outbox), which must not go unnoticed until then."""
    if task.cancelled() or task.exception() is None:
        return
    log.error("%s stopped on an error; its work waits until callroute is restarted",
              task.get_name(), exc_info=task.exception())


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _true() -> bool:
    return True


class _Background:
    """Readiness checks and status of the AMI/outbox/delivery side."""

    def __init__(self) -> None:
        self.checks: dict[str, Callable[[], Awaitable[bool]]] = {}
        self.outbox_status: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.ami_connected: Callable[[], bool] | None = None
        #: the outbox's Redis client (None: the outbox is off)
        self.redis: Any | None = None
        self.ami: AmiClient | None = None


def recording_links(settings: Settings) -> RecordingLinks | None:
    """Signed links to recordings (``recordings.dir`` set), served by the admin API."""
    rec = settings.recordings
    if rec.dir is None:
        return None
    base = rec.url or f"http://{settings.admin.host}:{settings.admin.port}/recordings"
    key = rec.key.get_secret_value() or settings.redis.key_secret.get_secret_value()
    return RecordingLinks(settings.path(rec.dir), base, key)


def _customer_finder(settings: Settings, router: Router) -> CustomerFinder:
    """Looks a number up after its call (cache first, then the CRM within its timeout)."""
    region, timeout = settings.phone.default_region, settings.crm.timeout_s

    async def find(e164: str) -> Customer | None:
        return (await router.lookup.find(normalize(e164, region), timeout_s=timeout)).customer

    return find


async def _start_records(settings: Settings, presence: Presence, stack: AsyncExitStack,
                         agents: Callable[[], Mapping[str, str]], link: CrmLink,
                         web_parts: WebParts | None = None,
                         find: CustomerFinder | None = None,
                         links: RecordingLinks | None = None) -> _Background:
    """AMI tracking → outbox → delivery, each stopped in that order on exit.

    Posting uses a connector (HTTP pool) of its own (:func:`open_delivery`), so slow
    posts never queue in front of the lookups of the call path.
    """
    from ami.client import AmiClient
    from ami.parking import CallParking
    from ami.tracker import CallTracker

    bg = _Background()
    if not settings.outbox.enabled:
        return bg
    delivery = await stack.enter_async_context(open_delivery(settings, link))
    redis = bg.redis = delivery.redis
    outbox = delivery.outbox
    delivery_stop = asyncio.Event()
    tasks = [asyncio.create_task(run, name=name)
             for run, name in zip(delivery.runs(delivery_stop), ("delivery", "spool-drainer"),
                                  strict=True)]
    for task in tasks:
        task.add_done_callback(_report_failure)

    async def stop_delivery() -> None:
        delivery_stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    stack.push_async_callback(stop_delivery)

    async def outbox_ready() -> bool:
        return bool(await redis.ping())

    bg.checks["outbox"] = outbox_ready

    async def outbox_status() -> dict[str, Any]:
        from router.records.outbox_cli import status

        return await status(redis, outbox.keys, settings.outbox.group, outbox.spool)

    bg.outbox_status = outbox_status

    if settings.ami.enabled:
        consumer: Callable[[Any], Awaitable[object]] = outbox.enqueue
        if web_parts is not None:
            from router.web.assemble import attach_records

            consumer = attach_records(web_parts, settings, redis, outbox.keys, outbox.enqueue)
            if web_parts.history is not None:  # records spooled while Redis was down
                outbox.drained.append(web_parts.history.add)
        # crm.recordings (an upload, or a link of its own) wins over callroute's link
        linker = links.link if links is not None and settings.crm.recordings is None else None
        completer = RecordCompleter(find, linker)
        pending = RecordQueue(consumer, completer.complete)
        zone = settings.ami.cdr_timezone
        tracker = CallTracker(
            pending.put, settings.phone.default_region, presence,
            agent_for_device=lambda device: agents().get(device_of(device)),
            cdr_grace_s=settings.ami.cdr_grace_s, max_open_calls=settings.ami.max_open_calls,
            cdr_tz=ZoneInfo(zone) if zone else None,
        )
        # the calls an earlier run left up: read before AMI connects, decided after its
        # resync (picked up again, or posted if they ended meanwhile); checkpoints after
        parking = CallParking(
            redis, outbox.keys, CallParking.scope_of(settings.ami.host, settings.ami.port),
            tracker, keyring_from_settings(settings), settle_s=settings.ami.cdr_grace_s + 3.0,
            ttl_s=settings.outbox.dedupe_ttl_s, timeout_s=settings.outbox.redis_timeout_s)
        pending.done = parking.released
        await parking.load()
        ami = AmiClient(settings.ami, tracker=tracker)
        ami.resync_listeners.append(parking.on_resync)
        if web_parts is not None:
            ami.listeners.append(web_parts.live.handle)
            ami.resync_listeners.append(web_parts.live.resync)
        await ami.start()
        bg.ami = ami
        parking_stop = asyncio.Event()
        parking_task = asyncio.create_task(parking.run(parking_stop), name="call-parking")
        parking_task.add_done_callback(_report_failure)

        async def stop_ami() -> None:
            await ami.stop()
            parking_stop.set()
            await asyncio.gather(parking_task, return_exceptions=True)
            # calls still up are parked for the next start, not posted as guesses (whose
            # real record would then be dropped as a duplicate); if Redis cannot take
            # them they are posted as incomplete: none lost
            tracker.close(await parking.park())
            await pending.drain()
            await parking.flush()

        stack.push_async_callback(stop_ami)

        async def ami_ready() -> bool:
            return ami.connected

        bg.checks["ami"] = ami_ready
        bg.ami_connected = lambda: ami.connected
    return bg


class RecordQueue:
    """Hands call records from the (synchronous) tracker to the (async) outbox, after
    ``complete`` (customer, recording link), keeping every task referenced until it is
    done; shutdown waits for them all. ``done`` is told each record's Linkedid once it
    is stored (the call's parked state goes, :mod:`ami.parking`)."""

    def __init__(self, enqueue: Callable[[Any], Awaitable[object]],
                 complete: Callable[[Any], Awaitable[Any]] | None = None,
                 done: Callable[[str], None] | None = None) -> None:
        self.enqueue = enqueue
        self.complete = complete
        self.done = done
        self._tasks: set[asyncio.Task[None]] = set()

    def put(self, record: Any) -> None:
        """Schedule one record for the outbox (called by the tracker)."""
        task = asyncio.get_running_loop().create_task(self._enqueue(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue(self, record: Any) -> None:
        if self.complete is not None:
            try:
                record = await self.complete(record)
            except Exception:
                log.exception("call record %s could not be completed: stored as it is",
                              getattr(record, "record_key", "?"))
        try:
            await self.enqueue(record)
        except Exception:
            # Outbox.enqueue already fell back to the spool; this is the last line.
            dump = record.model_dump(mode="json") if hasattr(record, "model_dump") else record
            log.critical("call record %s could not be stored: %s",
                         getattr(record, "record_key", "?"), mask_record(dump), exc_info=True)
            return
        linkedid = getattr(record, "linkedid", None)
        if self.done is not None and isinstance(linkedid, str):
            self.done(linkedid)

    async def drain(self) -> None:
        """Wait for every scheduled enqueue."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)




class RulesChecks:
    """The rules' queues and agents compared with ``routing.queues`` and the running
    Asterisk: at start-up, and again after every reload that replaced the rules (one
    comparison at a time; a newer reload cancels the one under way)."""

    def __init__(self, settings: Settings, rules: Callable[[], RuleSet],
                 ami: AmiClient | None) -> None:
        self.settings = settings
        self.rules = rules
        self.ami = ami
        self._task: asyncio.Task[Any] | None = None
        self._stopped = False

    def run(self) -> None:
        """Warn about queues missing from ``routing.queues`` now, and compare with
        Asterisk in the background (once AMI is up); nothing once stopped."""
        if self._stopped:
            return
        _warn_unknown_queues(self.settings, self.rules())
        if self.ami is None:
            return
        if self._task is not None:
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(
            warn_about_asterisk(self.ami, self.rules, self.settings), name="asterisk-check")

    def on_reload(self, trigger: str, before: str, after: str, replaced: bool) -> None:
        """A :class:`RulesWatcher` listener: check the new rules."""
        if replaced:
            self.run()

    def cancel(self) -> None:
        """Cancel a comparison under way (it logs nothing more)."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        """Cancel a comparison under way and wait for it to end; a reload after this (the
        rules watcher stops later) starts none, which would wait for AMI forever."""
        self._stopped = True
        if self._task is not None:
            await _cancel(self._task)


def _warn_unknown_queues(settings: Settings, ruleset: RuleSet) -> None:
    """Start-up: a queue the rules name that ``routing.queues`` does not list."""
    names = inventory.named(ruleset, settings.routing.default_queue)
    for line in inventory.against_list(names, settings.routing.queues).errors:
        log.warning("rules: %s", line)


async def warn_about_asterisk(ami: AmiClient, rules: Callable[[], RuleSet],
                              settings: Settings) -> inventory.Report | None:
    """Once the AMI connection is first up: compare the queues and agents the rules name
    with the running Asterisk and log a warning for each one missing (``callroute check
    --asterisk`` prints the same). Nothing is refused: calls still run."""
    while True:
        try:
            await ami.wait_connected(3600.0)
            break
        except TimeoutError:
            continue
    names = inventory.named(rules(), settings.routing.default_queue)
    try:
        view = await inventory.ask_asterisk(ami, names, settings.ami.action_timeout_s)
    except (AmiError, PermissionError) as exc:
        log.warning("could not compare the rules with Asterisk: %s", exc)
        return None
    report = inventory.against_asterisk(names, view)
    for line in report.errors + report.warnings:
        log.warning("asterisk: %s", line)
    if not report.errors and not report.warnings:
        log.info("asterisk: %s: all there", "; ".join(report.checked))
    return report
