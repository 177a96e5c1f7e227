"""Every route of the admin HTTP application as ``serve`` assembles it, for every role:
a table built from ``app.router.routes()``, so a route added without an access rule (or
opened to anyone without review) fails here. And the audit entry of each action
through the API, field by field."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.admin import AdminDeps, connect_actions
from router.app import assemble_admin
from router.audit import AuditEntry, AuditLog, state_hash
from router.auth.access import AuthContext, route_table
from router.auth.roles import Principal, Role
from router.auth.users import Directory, make_user
from router.crm.webhooks import sign
from router.keys import Keys
from router.lookup.cache import CacheEntry, TwoLevelCache, redis_client
from router.models import Customer
from router.rules.presence import Presence
from router.rules.ruleswatch import RulesWatcher
from router.settings import AdminSettings, RedisSettings, Settings

ROOT = Path(__file__).parents[2]
SECRET = "webhook-secret-for-tests"
KEYS = Keys(prefix="callroute:", secret=b"change-me")
ALICE = "+8613800138000"

#: Routes anyone may reach without signing in, each reviewed: probes carry no data; the
#: webhook carries its own HMAC signature. Adding to this set is a security decision.
REVIEWED_OPEN = {
    ("GET", "/healthz"): "liveness probe",
    ("GET", "/readyz"): "readiness probe",
    ("POST", "/webhooks/crm"): "signed by the CRM",
}

#: The admin API's own routes and the permission each needs (the API's contract).
EXPECTED = {
    ("GET", "/metrics"): "status",
    ("GET", "/api/explain"): "customers",
    ("GET", "/api/presence"): "status",
    ("GET", "/api/outbox"): "status",
    ("GET", "/api/whoami"): "signed in",
    ("GET", "/api/audit"): "audit",
    ("POST", "/api/rules/reload"): "rules",
    ("POST", "/api/cache/invalidate"): "cache",
    ("POST", "/api/outbox/retry"): "outbox",
    ("POST", "/api/outbox/replay"): "outbox",
}


@dataclass
class Assembled:
    """The running app, a token per role, and what the test looks at."""

    url: str
    app: web.Application
    tokens: dict[Role, str]
    audit: AuditLog
    redis: aioredis.Redis
    cache: TwoLevelCache
    watcher: RulesWatcher

    def headers(self, role: Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@pytest.fixture
async def assembled(redis_url: str, tmp_path: Path) -> AsyncIterator[Assembled]:
    """``assemble_admin`` with real Redis (cache, outbox, audit), a rules watcher on a
    copy of the example rules, and one user per role."""
    settings = Settings(admin=AdminSettings(webhook_secret=SECRET),
                        redis=RedisSettings(url=redis_url))
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "examples" / "rules.yaml", rules)
    watcher = RulesWatcher(rules)
    cache_redis = redis_client(settings.redis)
    cache = TwoLevelCache(cache_redis, KEYS, settings.cache)
    plain = aioredis.Redis.from_url(redis_url, decode_responses=True)
    audit = AuditLog(aioredis.Redis.from_url(redis_url), KEYS)
    users, tokens = {}, {}
    for role in Role:
        user, token = make_user(f"u-{role}", role, "7001" if role is Role.AGENT else None)
        users[user.name] = user
        tokens[role] = token

    async def ok() -> bool:
        return True

    async def explain(number: str, did: str | None, at: datetime | None) -> Mapping[str, Any]:
        return {"number": {"raw": number}, "customer": {"id": "C42", "name": "Alice"}}

    async def outbox() -> Mapping[str, Any]:
        return {"depth": 0}

    deps = AdminDeps(checks={"redis": ok}, explain=explain, presence=Presence(),
                     outbox_status=outbox, auth=AuthContext(Directory(users)), audit=audit)
    connect_actions(deps, settings, watcher=watcher, cache=cache, outbox_redis=plain)
    app = assemble_admin(settings, deps, cache)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield Assembled(str(server.make_url("")).rstrip("/"), app, tokens, audit, plain, cache,
                        watcher)
    finally:
        await server.close()
        await cache.aclose()
        await audit.redis.aclose()  # type: ignore[union-attr]
        await plain.aclose()


def _path(canonical: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", canonical)


async def _status(http: aiohttp.ClientSession, method: str, url: str,
                  headers: dict[str, str] | None = None) -> int:
    body = {} if method == "POST" else None
    async with http.request(method, url, headers=headers, json=body,
                            allow_redirects=False) as r:
        await r.read()
        return r.status


async def test_every_route_declares_a_rule_and_only_reviewed_ones_are_open(
        assembled: Assembled) -> None:
    """Each route of the assembled app declares an access rule; the only routes open
    without a principal are the reviewed ones."""
    table = route_table(assembled.app)
    assert len(table) >= 13
    for method, path, rule in table:
        assert rule is not None, f"{method} {path} declares no access rule"
        if rule.kind in ("public", "signed"):
            assert (method, path) in REVIEWED_OPEN, \
                f"{method} {path} is open to anyone ({rule.describe()}): review it"
    assert {(m, p) for m, p, r in table if r and r.kind in ("public", "signed")} \
        == set(REVIEWED_OPEN)


async def test_the_admin_api_routes_need_the_permissions_they_promise(
        assembled: Assembled) -> None:
    """Each route of the admin API itself needs exactly the permission of its contract
    (a route given a weaker one fails here)."""
    rules = {(m, p): r.describe() for m, p, r in route_table(assembled.app) if r}
    assert {k: rules.get(k) for k in EXPECTED} == EXPECTED


async def test_each_role_on_each_route_gets_what_its_rule_says(assembled: Assembled) -> None:
    """For every route and every role, a real request with that role's token is refused
    with 403 exactly when the role lacks the route's permission, and served otherwise;
    without credentials every protected route answers 401 and the webhook (unsigned)
    401 too."""
    checked = 0
    async with aiohttp.ClientSession() as http:
        for method, canonical, rule in route_table(assembled.app):
            assert rule is not None
            url = assembled.url + _path(canonical)
            anonymous = await _status(http, method, url)
            if rule.kind == "public":
                assert anonymous not in (401, 403), (method, canonical)
            else:
                assert anonymous == 401, (method, canonical, anonymous)
            for role in Role:
                status = await _status(http, method, url, assembled.headers(role))
                principal = Principal("u", role, "7001" if role is Role.AGENT else None)
                if rule.kind == "signed":
                    assert status == 401, (method, canonical, role)
                elif rule.allows(principal):
                    assert status not in (401, 403), (method, canonical, role, status)
                else:
                    assert status == 403, (method, canonical, role, status)
                checked += 1
    assert checked >= 13 * 5


async def _entries(a: Assembled, action: str) -> list[AuditEntry]:
    return await a.audit.entries(action=action)


def _check(entry: AuditEntry, **expected: str) -> None:
    got = {k: getattr(entry, k) for k in expected}
    assert got == expected
    assert abs(entry.at - time.time()) < 30
    assert entry.id


async def test_explain_writes_a_customer_read(assembled: Assembled) -> None:
    """Reading a customer through /api/explain leaves who, role, the customer id (not
    the number), the peer and a hash of what was shown."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{assembled.url}/api/explain", params={"number": "13800138000"},
            headers=assembled.headers(Role.SUPERVISOR)) as r:
        shown = await r.json()
    [entry] = await _entries(assembled, "customer.read")
    _check(entry, who="u-supervisor", role="supervisor", action="customer.read",
           target="customer:C42", source="127.0.0.1", before="", after=state_hash(shown),
           outcome="ok")
    assert "13800138000" not in json.dumps(entry.to_dict())


async def test_rules_reload_writes_before_and_after_digests(assembled: Assembled) -> None:
    """An accepted reload records the file's digests before and after; a rejected file
    answers 422 and records 'refused' with the digest unchanged."""
    path = assembled.watcher.path
    before = assembled.watcher.digest
    path.write_text(path.read_text() + "\n# edited\n")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{assembled.url}/api/rules/reload",
                             headers=assembled.headers(Role.ENGINEER)) as r:
            assert r.status == 200
            assert (await r.json())["replaced"] is True
        after = assembled.watcher.digest
        assert after != before
        path.write_text("rules: [ {name: broken")
        async with http.post(f"{assembled.url}/api/rules/reload",
                             headers=assembled.headers(Role.ADMIN)) as r:
            assert r.status == 422
    first, second = await _entries(assembled, "rules.reload")
    _check(first, who="u-engineer", role="engineer", target="rules", source="127.0.0.1",
           before=before, after=after, outcome="ok")
    _check(second, who="u-admin", role="admin", before=after, after=after,
           outcome="refused")


async def test_signal_and_file_watch_reloads_are_audited_as_system(
        assembled: Assembled) -> None:
    """A reload by SIGHUP or by the file watcher is written as `system`, with the
    trigger as its source."""
    assembled.watcher.reload("signal")
    await assembled.audit.aclose()
    [entry] = await _entries(assembled, "rules.reload")
    _check(entry, who="system", role="admin", source="signal", outcome="ok",
           before=assembled.watcher.digest, after=assembled.watcher.digest)


async def test_cache_invalidation_records_hashed_numbers(assembled: Assembled) -> None:
    """Invalidating a number through the API drops it and records the keyed hash of the
    number (never the number) with the hash of the cached value before."""
    await assembled.cache.put(ALICE, CacheEntry(Customer(id="C1", name="Alice"), time.time()))
    raw = await assembled.cache.redis.get(KEYS.customer(ALICE))
    async with aiohttp.ClientSession() as http, http.post(
            f"{assembled.url}/api/cache/invalidate", json={"numbers": ["13800138000"]},
            headers=assembled.headers(Role.ENGINEER)) as r:
        assert await r.json() == {"invalidated": 1}
    assert await assembled.cache.redis.get(KEYS.customer(ALICE)) is None
    [entry] = await _entries(assembled, "cache.invalidate")
    _check(entry, who="u-engineer", role="engineer",
           target=f"number:{KEYS.number_hash(ALICE)}", before=state_hash([raw]), after="",
           outcome="ok")


async def test_webhook_invalidation_is_audited_as_the_crm(assembled: Assembled) -> None:
    """A signed CRM webhook that changes the cache writes an entry by `crm-webhook`."""
    body = json.dumps({"event": "customer.deleted", "customer_id": "C9",
                       "numbers": [ALICE]}).encode()
    ts = str(int(time.time()))
    async with aiohttp.ClientSession() as http, http.post(
            f"{assembled.url}/webhooks/crm", data=body,
            headers={"X-Callroute-Timestamp": ts,
                     "X-Callroute-Signature": sign(SECRET, ts, body),
                     "Content-Type": "application/json"}) as r:
        assert r.status == 200
    [entry] = await _entries(assembled, "cache.invalidate")
    _check(entry, who="crm-webhook", role="engineer", target="customer:C9",
           source="127.0.0.1", before="", after="")
    assert entry.outcome.startswith("ok: customer.deleted")


async def test_outbox_retry_and_replay_are_audited(assembled: Assembled) -> None:
    """Retrying a dead letter and replaying a record through the API each write an
    entry naming the record keys."""
    keys = Keys(prefix="callroute:", secret=b"change-me")
    await assembled.redis.xadd(keys.outbox_dead, {"key": "rk-1", "record": "{}",
                                                  "attempt": "3", "enq": "1", "error": "x",
                                                  "reason": "gone"})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{assembled.url}/api/outbox/retry", json={"keys": ["rk-1"]},
                             headers=assembled.headers(Role.ENGINEER)) as r:
            assert await r.json() == {"retried": ["rk-1"]}
        async with http.post(f"{assembled.url}/api/outbox/replay", json={},
                             headers=assembled.headers(Role.ENGINEER)) as r:
            assert r.status == 400
        async with http.post(f"{assembled.url}/api/outbox/replay", json={"dead": True},
                             headers=assembled.headers(Role.ADMIN)) as r:
            assert await r.json() == {"replayed": []}
    [retry] = await _entries(assembled, "outbox.retry")
    _check(retry, who="u-engineer", target="rk-1", before=state_hash(["rk-1"]),
           after=state_hash(["rk-1"]))
    [replay] = await _entries(assembled, "outbox.replay")
    _check(replay, who="u-admin", role="admin", target="-", after=state_hash([]))


async def test_audit_trail_is_readable_by_supervisors_only(assembled: Assembled) -> None:
    """GET /api/audit lists entries to a supervisor (filters apply) and refuses an
    engineer."""
    await assembled.audit.write(AuditEntry(who="x", role="admin", action="user.add",
                                           target="user:y", source="cli@h"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{assembled.url}/api/audit", params={"who": "x"},
                            headers=assembled.headers(Role.SUPERVISOR)) as r:
            body = await r.json()
        assert [e["action"] for e in body] == ["user.add"]
        async with http.get(f"{assembled.url}/api/audit",
                            headers=assembled.headers(Role.ENGINEER)) as r:
            assert r.status == 403
        async with http.get(f"{assembled.url}/api/audit", params={"since": "noon"},
                            headers=assembled.headers(Role.ADMIN)) as r:
            assert r.status == 400
