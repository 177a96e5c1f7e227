"""The sample CRM itself: its API, idempotency, fault injection over HTTP, request log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from yarl import URL

from router import demo
from router.crm.config import SAMPLE_CRM_PORT, SAMPLE_CRM_URL, CrmSettings, sample_crm_section
from router.samplecrm import address, serve_forever, start_sample_crm
from router.settings import Settings
from tests.crm_server import RunningCrm, closed_port, running_crm

ROOT = Path(__file__).resolve().parents[3]

AUTH = {"Authorization": "Bearer t0k"}


@pytest.fixture
async def crm() -> AsyncIterator[RunningCrm]:
    """The seeded sample CRM with bearer token ``t0k``."""
    async with running_crm(token="t0k") as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client sending the token."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def _json(resp: aiohttp.ClientResponse) -> Any:
    async with resp:
        return resp.status, await resp.json()


async def test_lookup_and_token(crm: RunningCrm, client: aiohttp.ClientSession) -> None:
    """Lookups match by digits; a missing token is 401; a missing phone is 400."""
    status, body = await _json(await client.get(f"{crm.url}/api/customers",
                                                params={"phone": "+8613900139000"}))
    assert status == 200
    assert [c["name"] for c in body["results"]] == ["Han Meimei"]
    assert body["results"][0]["owner"]["id"] == "7009"
    status, body = await _json(await client.get(f"{crm.url}/api/customers",
                                                params={"phone": "8613500135000"}))
    assert len(body["results"]) == 4
    async with aiohttp.ClientSession() as anonymous:
        status, _ = await _json(await anonymous.get(f"{crm.url}/api/customers?phone=1"))
    assert status == 401
    status, _ = await _json(await client.get(f"{crm.url}/api/customers"))
    assert status == 400


async def test_idempotent_creates(crm: RunningCrm, client: aiohttp.ClientSession) -> None:
    """Same Idempotency-Key → 200 with the same object; a new key → 201 and a new object."""
    url = f"{crm.url}/api/activities"
    s1, a = await _json(await client.post(url, json={"x": 1}, headers={"Idempotency-Key": "k1"}))
    s2, b = await _json(await client.post(url, json={"x": 2}, headers={"Idempotency-Key": "k1"}))
    s3, c = await _json(await client.post(url, json={"x": 3}, headers={"Idempotency-Key": "k2"}))
    s4, _ = await _json(await client.post(url, data=b"[1]"))
    assert (s1, s2, s3, s4) == (201, 200, 201, 400)
    assert a == b
    assert a["x"] == 1
    assert c["id"] != a["id"]
    _status, listing = await _json(await client.get(url))
    assert [o["id"] for o in listing["results"]] == [a["id"], c["id"]]


async def test_update_customer_moves_it_in_changed(
    crm: RunningCrm, client: aiohttp.ClientSession
) -> None:
    """PATCH changes fields and bumps updated_at; PUT creates; changed pages by cursor."""
    status, patched = await _json(await client.patch(
        f"{crm.url}/api/customers/C-1001", json={"tier": "platinum"}))
    assert status == 200
    assert patched["tier"] == "platinum"
    assert patched["name"] == "Li Lei"
    status, _ = await _json(await client.patch(f"{crm.url}/api/customers/C-9", json={}))
    assert status == 404
    status, created = await _json(await client.put(
        f"{crm.url}/api/customers/C-2000", json={"name": "New", "phones": ["+8613300133000"]}))
    assert status == 201
    assert created["id"] == "C-2000"
    status, page = await _json(await client.get(
        f"{crm.url}/api/customers/changed",
        params={"updated_since": "2025-06-01T00:00:00Z", "limit": "1"}))
    assert [c["id"] for c in page["results"]] == ["C-1001"]
    assert page["next_cursor"] == "1"
    status, page = await _json(await client.get(
        f"{crm.url}/api/customers/changed",
        params={"updated_since": "2025-06-01T00:00:00Z", "limit": "1", "cursor": "1"}))
    assert [c["id"] for c in page["results"]] == ["C-2000"]
    assert page["next_cursor"] is None
    status, _ = await _json(await client.get(f"{crm.url}/api/customers/changed?cursor=x"))
    assert status == 400


async def test_faults_over_http(crm: RunningCrm, client: aiohttp.ClientSession) -> None:
    """POST /_faults injects a counted fault on one path; bad faults are 400; DELETE clears."""
    status, fault = await _json(await client.post(f"{crm.url}/_faults", json={
        "kind": "status", "status": 429, "retry_after": "3", "path": "/api/customers",
        "count": 2}))
    assert status == 201
    assert fault["count"] == 2
    statuses = []
    for _ in range(3):
        async with client.get(f"{crm.url}/api/customers?phone=1") as resp:
            statuses.append((resp.status, resp.headers.get("Retry-After")))
    assert statuses == [(429, "3"), (429, "3"), (200, None)]
    async with client.post(f"{crm.url}/api/leads", json={}) as resp:
        assert resp.status == 201  # other paths are not affected
    status, body = await _json(await client.post(f"{crm.url}/_faults", json={"kind": "boom"}))
    assert status == 400
    assert "kind must be one of" in body["error"]
    await client.post(f"{crm.url}/_faults", json={"kind": "stall"})
    status, listing = await _json(await client.get(f"{crm.url}/_faults"))
    assert [f["kind"] for f in listing["faults"]] == ["stall"]
    await client.delete(f"{crm.url}/_faults")
    status, listing = await _json(await client.get(f"{crm.url}/_faults"))
    assert listing["faults"] == []


async def test_stall_released_by_clear(crm: RunningCrm, client: aiohttp.ClientSession) -> None:
    """A stalled request answers normally once the faults are cleared."""
    crm.faults.add("stall")

    async def fetch() -> int:
        async with client.get(f"{crm.url}/api/customers?phone=1") as resp:
            return resp.status

    pending = asyncio.ensure_future(fetch())
    await asyncio.sleep(0.1)
    assert not pending.done()
    crm.faults.clear()
    assert await asyncio.wait_for(pending, 2) == 200


async def test_request_log_and_reset(crm: RunningCrm, client: aiohttp.ClientSession) -> None:
    """Requests are logged (token masked over HTTP); /_reset restores the seed."""
    await client.post(f"{crm.url}/api/tasks", json={"customer_id": "C-1004"},
                      headers={"Idempotency-Key": "t-1"})
    await client.patch(f"{crm.url}/api/customers/C-1004", json={"name": "Changed"})
    entry = crm.state.requests[0]
    assert (entry.method, entry.path, entry.idempotency_key) == ("POST", "/api/tasks", "t-1")
    assert entry.body == {"customer_id": "C-1004"}
    assert crm.state.objects["tasks"]["TASK-000001"]["owner"] == "7002"  # from the customer
    _, log = await _json(await client.get(f"{crm.url}/_requests?limit=1"))
    assert [r["method"] for r in log["requests"]] == ["PATCH"]
    assert log["requests"][0]["headers"]["Authorization"] == "***"
    await client.post(f"{crm.url}/_reset")
    _status, health = await _json(await client.get(f"{crm.url}/_health"))
    assert health == {"ok": True, "customers": 10, "activities": 0, "leads": 0, "tasks": 0}
    assert crm.state.customers["C-1004"]["name"] == "Impatient"


async def test_serve_forever_uses_config_address_and_token() -> None:
    """``callroute sample-crm`` serves on the configured port with the configured token."""
    port = closed_port()
    settings = Settings.model_validate({"crm": sample_crm_section(f"http://127.0.0.1:{port}")})
    stop = asyncio.Event()
    task = asyncio.create_task(serve_forever(settings, stop=stop))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/_health") as resp:
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.02)
            async with session.get(f"http://127.0.0.1:{port}/api/customers?phone=1") as resp:
                assert resp.status == 401
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 5) == 0


@pytest.mark.parametrize(("base_url", "where"), [
    (SAMPLE_CRM_URL, ("127.0.0.1", SAMPLE_CRM_PORT)),
    ("http://127.0.0.1:9099/api", ("127.0.0.1", 9099)),
    ("http://crm.local", ("crm.local", 80)),
    ("https://crm.local/", ("crm.local", 443)),
])
def test_sample_crm_and_demo_serve_where_the_connector_connects(
        base_url: str, where: tuple[str, int]) -> None:
    """``callroute sample-crm`` and ``callroute demo`` take the sample CRM's address from
    crm.base_url by one function: its port, or without one the port the connector
    connects to (80/443; sample-crm used 8088 and the demo 80); the default base_url,
    examples/config.yaml and the README all say port 8088 (SAMPLE_CRM_PORT)."""
    assert address(base_url) == where
    assert address(base_url)[1] == URL(base_url).port  # what aiohttp connects to
    assert demo.address is address
    assert CrmSettings().base_url == SAMPLE_CRM_URL
    example = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())
    assert example["crm"]["base_url"] == SAMPLE_CRM_URL
    assert f"on 127.0.0.1:{SAMPLE_CRM_PORT}" in (ROOT / "README.md").read_text()


async def test_demo_serves_its_sample_crm_at_the_configured_port() -> None:
    """The demo's sample CRM listens at crm.base_url's port, as sample-crm does."""
    port = closed_port()
    settings = Settings.model_validate({"crm": sample_crm_section(f"http://127.0.0.1:{port}")})
    runner, served = await demo._start_crm(settings)
    try:
        assert served.crm.base_url == f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/_health") as resp:
            assert resp.status == 200
    finally:
        await runner.cleanup()


async def test_start_sample_crm_default_app() -> None:
    """start_sample_crm with no app serves the seed on a free port."""
    runner, url = await start_sample_crm()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/_health") as resp:
            assert (await resp.json())["customers"] == 10
    finally:
        await runner.cleanup()
