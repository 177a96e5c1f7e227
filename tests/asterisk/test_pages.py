"""The agents' pages in headless Chromium against callroute serving a real Asterisk 22.

One Asterisk with callroute's own dialplan (tests/asterisk/harness.py), one
``router.app.serve`` with the pages, the sample CRM; four agents signed in, each in a
browser context of its own: Sun Li (7003), the VIP desk (7101), Zhao Min (7018) and Li Na
(7001). Three calls placed at once by AMI Originate into the trunk context, through the
real dialplan and FastAGI:

* Li Lei (gold, owner 7003): the owner is dialled (``DialBegin`` to Local/7003@agents),
  rings 1 s, answers, talks 2 s and hangs up; Sun Li gives the disposition within the
  wrap-up time: the call's one activity is posted with it.
* Han Meimei (platinum, owner 7019 busy): the vip queue offers the call to the VIP desk
  (``AgentCalled``), which answers; the disposition is given after the wrap-up time, when
  the activity was already posted: the activity is updated with it (PATCH), still one.
* Zhou Jie (owner 7018, who never answers): the caller hangs up while 7018 rings: the
  card closes.
* A caller who withholds the number, on the sales line: the ring-all sales queue offers
  it to Wang Wei (7002), whose card says the number is withheld.

Li Na's page stays empty all along (no call rings 7001): the same picture, byte for byte,
before, during and after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from router.audit import list_entries
from router.auth.roles import Role
from router.auth.users import FileUserStore, make_user
from router.keys import Keys
from router.samplecrm import state_of
from tests.asterisk.harness import CallView
from tests.asterisk.lab import Lab, open_lab

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The pages' users: name -> agent id.
AGENTS = {"sun-li": "7003", "vip-desk": "7101", "zhao-min": "7018", "wang-wei": "7002",
          "li-na": "7001"}
WRAPUP_S = 4.0
NOTE_1 = "wants the invoice re-sent"
NOTE_2 = "call back on Monday"


@dataclass
class Pages:
    """The running lab with one signed-in page per agent."""

    lab: Lab
    base: str
    pages: dict[str, Any]
    shots: Path


@dataclass
class Seen:
    """What the pages showed during the wave of calls."""

    views: dict[str, CallView] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    shots: dict[str, Path] = field(default_factory=dict)
    flashes: dict[str, str] = field(default_factory=dict)
    closed_on_hangup: bool = False
    empty_before: bytes = b""
    empty_during: bytes = b""
    empty_after: bytes = b""
    empty_cards_after: int = -1
    owner_before: bytes = b""


def configure(lab: Lab, users_file: Path) -> None:
    """The lab's config with the pages' users, English pages, a short wrap-up time and
    the disposition on the activity (the sample CRM's update request patches it later)."""
    data = yaml.safe_load(lab.config.read_text())
    data["auth"] = {"users_file": str(users_file)}
    data["web"] = {**data.get("web", {}), "language": "en", "wrapup_s": WRAPUP_S,
                   "timezone": "Asia/Shanghai",
                   "crm_url": "https://crm.example.test/customers/{id}"}
    data["crm"]["activity"]["body"].update({"disposition": "{record.disposition}",
                                            "note": "{record.disposition_note}"})
    lab.config.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pages(tmp_path_factory: pytest.TempPathFactory, asterisk_kit: None
                ) -> AsyncIterator[Pages]:
    """Asterisk in the host's zone, callroute serving its pages, four agents signed in."""
    from playwright.async_api import async_playwright

    from tests.router.web.conftest import chromium_path

    path = chromium_path()
    if path is None:
        pytest.fail("chromium is not installed (./dev test installs Debian's package)")
    tmp = tmp_path_factory.mktemp("pages")
    async with open_lab(tmp, tz=None) as lab, async_playwright() as p:
        store = FileUserStore(tmp / "users.json")
        tokens = {}
        for name, agent in AGENTS.items():
            user, tokens[name] = make_user(name, Role.AGENT, agent)
            await store.save(user)
        configure(lab, store.path)
        await lab.start()
        base = f"http://127.0.0.1:{lab.settings.admin.port}"
        browser = await p.chromium.launch(executable_path=path, headless=True,
                                          args=["--disable-gpu", "--disable-dev-shm-usage"])
        try:
            opened = {}
            for name in AGENTS:
                context = await browser.new_context(viewport={"width": 1280, "height": 720})
                page = await context.new_page()
                await page.goto(f"{base}/ui/login")
                await page.fill("#token", tokens[name])
                await page.keyboard.press("Enter")
                await page.wait_for_url("**/ui/agent")
                await page.wait_for_selector("#status.on")
                opened[name] = page
            yield Pages(lab, base, opened, tmp)
        finally:
            await browser.close()


async def shot(page: Any, path: Path) -> bytes:
    """A screenshot saved to ``path``; its bytes."""
    data: bytes = await page.screenshot(path=str(path))
    return data


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seen(pages: Pages) -> Seen:
    """The three calls placed at once; each page followed while they ring, talk and end."""
    lab, p, out = pages.lab, pages.pages, Seen()
    out.empty_before = await shot(p["li-na"], pages.shots / "7001-before.png")
    out.owner_before = await shot(p["sun-li"], pages.shots / "7003-before.png")
    observer = lab.observer
    ring = {"__RING_S": "1"}
    owner_call, queue_call, hangup_call, withheld_call = await asyncio.gather(
        observer.originate("4008001000", '"Li Lei" <+8613800138000>', hold_s=10, talk_s=2,
                           variables=ring),
        observer.originate("4008001000", '"Han Meimei" <13900139000>', hold_s=10, talk_s=2,
                           variables=ring),
        observer.originate("4008001000", '"Zhou Jie" <+8613700137001>', patience_s=2),
        observer.originate("4008002000", '"Anonymous" <anonymous>', hold_s=10, talk_s=1,
                           variables=ring))
    out.views = {"owner": owner_call, "queue": queue_call, "hangup": hangup_call,
                 "withheld": withheld_call}

    async def owner() -> None:
        page = p["sun-li"]
        card = page.locator(".card.ringing")
        await card.wait_for(timeout=15_000)
        out.texts["owner-ringing"] = await card.inner_text()
        out.shots["owner-ringing"] = pages.shots / "7003-ringing.png"
        await shot(page, out.shots["owner-ringing"])
        out.empty_during = await shot(p["li-na"], pages.shots / "7001-during.png")
        await page.wait_for_selector(".card.talking", timeout=15_000)
        out.texts["owner-talking"] = await page.inner_text(".card")
        await page.wait_for_selector(".card.ended form.wrapup", timeout=20_000)
        out.shots["owner-wrapup"] = pages.shots / "7003-wrapup.png"
        await shot(page, out.shots["owner-wrapup"])
        await page.keyboard.press("1")  # resolved
        await page.fill("textarea", NOTE_1)
        await page.keyboard.press("Control+Enter")
        out.flashes["owner"] = await page.inner_text(".flash")
        await page.wait_for_selector(".card", state="detached")

    async def queue() -> None:
        page = p["vip-desk"]
        await page.wait_for_selector(".card", timeout=15_000)
        out.texts["queue-ringing"] = await page.inner_text(".card")
        out.shots["queue-ringing"] = pages.shots / "7101-queue.png"
        await shot(page, out.shots["queue-ringing"])
        await page.wait_for_selector(".card.ended form.wrapup", timeout=25_000)
        await lab.record(queue_call, timeout=WRAPUP_S + 20)  # sent without a disposition
        await page.wait_for_selector(".wrapup-left:has-text('one saved now updates it')")
        out.shots["queue-late"] = pages.shots / "7101-late.png"
        await shot(page, out.shots["queue-late"])
        await page.keyboard.press("2")  # follow-up
        await page.fill("textarea", NOTE_2)
        await page.keyboard.press("Control+Enter")
        out.flashes["queue"] = await page.inner_text(".flash")
        await page.wait_for_selector(".card", state="detached")

    async def hangup() -> None:
        page = p["zhao-min"]
        await page.wait_for_selector(".card.ringing", timeout=15_000)
        out.texts["hangup-ringing"] = await page.inner_text(".card")
        await page.wait_for_selector(".card", state="detached", timeout=15_000)
        out.closed_on_hangup = await page.locator("#empty").is_visible()

    async def withheld() -> None:
        page = p["wang-wei"]
        await page.wait_for_selector(".card", timeout=15_000)
        out.texts["withheld"] = await page.inner_text(".card")
        out.shots["withheld"] = pages.shots / "7002-withheld.png"
        await shot(page, out.shots["withheld"])

    try:
        await asyncio.gather(owner(), queue(), hangup(), withheld())
    finally:
        for name, page in p.items():
            with contextlib.suppress(Exception):
                await page.screenshot(path=str(pages.shots / f"{name}-last.png"))
    await observer.wait_ended(out.views.values(), timeout=60)
    await lab.record(owner_call)
    await asyncio.sleep(0.5)  # the late update is delivered; nothing else comes
    out.empty_after = await shot(p["li-na"], pages.shots / "7001-after.png")
    out.empty_cards_after = await p["li-na"].locator(".card").count()
    return out


async def test_owner_dial_pops_on_the_owners_page_only(seen: Seen) -> None:
    """DialBegin to the owner's device: Sun Li's page shows Li Lei's card while it rings
    (name, tier, value, the owner is you, the rule), then the talk timer; the screenshots
    are saved."""
    text = seen.texts["owner-ringing"]
    for expected in ("Li Lei", "gold", "1,000", "7003 (you)", "You are the account owner",
                     "vip-owner", "Ringing"):
        assert expected in text, (expected, text)
    assert "Talk time" in seen.texts["owner-talking"]
    assert seen.shots["owner-ringing"].read_bytes() != seen.owner_before


async def test_queue_offer_pops_on_the_desk_the_queue_rang(seen: Seen) -> None:
    """The owner (7019) is busy, the vip queue offers the call to 7101 (AgentCalled): the
    VIP desk's page shows Han Meimei's card, from queue vip, with the rule that sent it."""
    text = seen.texts["queue-ringing"]
    for expected in ("Han Meimei", "platinum", "From queue vip", "vip-owner"):
        assert expected in text, (expected, text)


async def test_the_ringing_card_closes_when_the_caller_hangs_up(seen: Seen) -> None:
    """Zhou Jie hangs up while his owner's phone rings: Zhao Min's card (shown ringing)
    closes and the page says there is no call."""
    assert "Zhou Jie" in seen.texts["hangup-ringing"]
    assert seen.closed_on_hangup


async def test_a_withheld_number_says_so_on_the_card(seen: Seen) -> None:
    """The caller withheld the number: the card the sales queue popped on Wang Wei's page
    says "Withheld number" (as its title and instead of a number), not in the CRM."""
    text = seen.texts["withheld"]
    for expected in ("Withheld number", "Not in the CRM", "From queue sales",
                     "unknown-sales-line"):
        assert expected in text, (expected, text)
    assert "anonymous" not in text.lower()


async def test_a_second_agents_page_stays_empty(seen: Seen) -> None:
    """Li Na (7001) is rung by none of the calls: her page is the same picture, byte for
    byte, before the calls, while Li Lei's card rings elsewhere, and after them."""
    assert seen.empty_before
    assert seen.empty_during == seen.empty_before
    assert seen.empty_after == seen.empty_before
    assert seen.empty_cards_after == 0


def activities(lab: Lab, view: CallView) -> list[dict[str, Any]]:
    return lab.objects("activities", view.linkedid)


def patches(lab: Lab) -> list[Any]:
    return [r for r in state_of(lab.crm).requests if r.method == "PATCH"]


async def test_disposition_within_the_wrapup_is_on_the_posted_activity(
    pages: Pages, seen: Seen,
) -> None:
    """Sun Li's disposition and note, typed with the keyboard before the wrap-up time was
    over, are on the call's one activity as it was posted (no update needed)."""
    (activity,) = activities(pages.lab, seen.views["owner"])
    assert (activity["disposition"], activity["note"]) == ("resolved", NOTE_1)
    assert activity["agent"] == "7003"
    assert "goes to the CRM with the call" in seen.flashes["owner"]
    assert not [r for r in patches(pages.lab) if activity["id"] in r.path]


async def test_disposition_after_the_wrapup_updates_the_posted_activity(
    pages: Pages, seen: Seen,
) -> None:
    """The VIP desk's disposition came after the record was sent without one: the page
    said so, and the call's one activity was updated with it by one PATCH."""
    (activity,) = activities(pages.lab, seen.views["queue"])
    assert (activity["disposition"], activity["note"]) == ("follow-up", NOTE_2)
    assert activity["agent"] == "7101"
    assert "activity in the CRM is updated" in seen.flashes["queue"]
    mine = [r for r in patches(pages.lab) if r.path == f"/api/activities/{activity['id']}"]
    assert len(mine) == 1


async def test_each_card_shown_is_in_the_audit_trail(pages: Pages, seen: Seen) -> None:
    """Each agent's page read its customer: one customer.card entry per page and call in
    the audit trail, by the agent's user; none by Li Na."""
    settings = pages.lab.settings
    keys = Keys(prefix=settings.redis.prefix,
                secret=settings.redis.key_secret.get_secret_value().encode())
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis.url)
    try:
        found = await list_entries(client, keys, action="customer.card", limit=1000)
    finally:
        await client.aclose()
    got = {(e.who, e.target) for e in found}
    assert {("sun-li", "customer:C-2001"), ("vip-desk", "customer:C-2002"),
            ("zhao-min", "customer:C-2003")} <= got
    assert not any(e.who == "li-na" for e in found)
