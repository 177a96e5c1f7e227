"""End to end in headless Chromium: callroute on loopback (FastAGI, AMI from recorded
Asterisk events, real Redis, the sample CRM) and the agents' and supervisor's pages."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from playwright.async_api import expect

from router.samplecrm import state_of
from tests.router.web.conftest import WebService, wait_for

# Call 1 of ami-basic.raw: Li Lei (+8613800138000) rings owner 7001, who answers.
RING_7001 = (0, 50)        # up to DialBegin to Local/7001@agents
ANSWER_7001 = (51, 71)     # DialEnd ANSWER, bridge
HANGUP_7001 = (72, 101)    # hangups and Cdrs
LINKEDID = "1795338333.0"
CARD = "#card-1795338333\\.0"  # the card's id, dot escaped for CSS
NOTE = "#note-1795338333\\.0"


async def sign_in(browser: Any, service: WebService, user: str) -> Any:
    """A fresh browser context (its own cookies) signed in as ``user`` via the form."""
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    await page.goto(f"{service.base}/ui/login")
    await page.fill("#token", service.tokens[user])
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/ui/agent" if user not in ("boss", "looker")
                            else "**/ui/supervisor")
    await page.wait_for_selector("#status.on")
    return page


async def test_card_pops_on_the_right_agent_only_and_disposition_reaches_crm(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """The ring makes Li Lei's card appear on agent 7001's page (name, tier, value,
    owner, tags, tickets, language, rule) and not on 7002's; it shows the talk timer on
    answer and the disposition form on hangup; the disposition typed with the keyboard
    reaches the CRM on the call's one activity."""
    variables = await service.route("+8613800138000", "Li Lei", "1795338333.1")
    assert variables["CRM_CUSTOMER_ID"] == "C-1001"
    mine = await sign_in(browser, service, "li-na")
    other = await sign_in(browser, service, "wang-wei")

    before_mine, before_other = await mine.screenshot(), await other.screenshot()
    await service.ami.play(service.ami.events(*RING_7001))
    card = mine.locator(CARD)
    await card.wait_for()
    await mine.wait_for_selector(".last p.muted, .last ul")
    text = await card.inner_text()
    for expected in ("Li Lei", "gold", "52,000", "7001 (you)", "repeat-buyer",
                     "Open tickets", "zh", "vip-owner", "You are the account owner", "Ringing"):
        assert expected in text, (expected, text)
    link = await card.locator("a").get_attribute("href")
    assert link == "https://crm.example.test/customers/C-1001"
    shot_mine = tmp_path / "agent-7001-ringing.png"
    shot_other = tmp_path / "agent-7002-empty.png"
    await mine.screenshot(path=str(shot_mine))
    await other.screenshot(path=str(shot_other))
    # The pictures themselves: 7001's page changed; 7002's is the very image it was
    # before the ring (nothing appeared on it).
    assert shot_mine.read_bytes() != before_mine
    assert shot_other.read_bytes() == before_other
    assert await other.locator(".card").count() == 0
    assert await other.locator("#empty").is_visible()
    assert "Li Lei" not in await other.inner_text("body")

    await service.ami.play(service.ami.events(*ANSWER_7001))
    await mine.wait_for_selector(".card.talking")
    assert "Talk time" in await card.inner_text()

    await service.ami.play(service.ami.events(*HANGUP_7001))
    await mine.wait_for_selector(".card.ended form.wrapup")
    await mine.screenshot(path=str(tmp_path / "agent-7001-wrapup.png"))
    await mine.keyboard.press("1")        # first disposition: resolved
    await mine.fill(NOTE, "wants a callback about the invoice")
    await mine.keyboard.press("Control+Enter")
    await mine.wait_for_selector(".flash")
    assert await mine.locator(".card").count() == 0

    await wait_for(lambda: len(service.activities()) >= 1)
    acts = service.activities()
    assert len(acts) == 1
    assert acts[0]["call_id"] == LINKEDID
    assert acts[0]["disposition"] == "resolved"
    assert acts[0]["note"] == "wants a callback about the invoice"
    assert await other.locator(".card").count() == 0


ENTRY = "#pending-1795338333\\.0"  # the call's entry in the list of calls awaiting one


def patches(service: WebService) -> list[Any]:
    """The PATCH requests the sample CRM received (updates of activities)."""
    return [r for r in state_of(service.crm).requests if r.method == "PATCH"]


async def later_and_reload(service: WebService, mine: Any, tmp_path: Path, tag: str) -> None:
    """Call 1 rings 7001, is answered and ends; on the wrap-up form the agent presses Esc
    ("Later"): the card goes and the call is in the list; after a reload it still is,
    with no card."""
    await service.ami.play(service.ami.events(*RING_7001))
    await service.ami.play(service.ami.events(*ANSWER_7001))
    await service.ami.play(service.ami.events(*HANGUP_7001))
    await mine.wait_for_selector(".card.ended form.wrapup")
    await mine.keyboard.press("Escape")
    await mine.wait_for_selector(".card", state="detached")
    await mine.wait_for_selector(ENTRY)
    await mine.screenshot(path=str(tmp_path / f"agent-7001-later-{tag}.png"), full_page=True)
    await mine.reload()
    await mine.wait_for_selector("#status.on")
    await mine.wait_for_selector(ENTRY)
    assert await mine.locator(".card").count() == 0
    assert await mine.locator("#pending-list .pending-call").count() == 1


async def test_a_call_left_for_later_is_listed_after_a_reload_and_disposed_from_it(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """Esc on the wrap-up form, then a reload: the call is in 7001's list of calls
    awaiting a disposition (name and number masked, outcome, talk time, the record still
    waiting for it), never in 7002's (nor after 7002 reloads); opened with the keyboard
    (Alt+L, Enter), a disposition and note saved from it (Ctrl+Enter) go onto the held
    record: the CRM gets one activity with them, and no update; the list is empty then.
    In Chinese the list speaks Chinese."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    mine = await sign_in(browser, service, "li-na")
    other = await sign_in(browser, service, "wang-wei")
    await expect(other.locator("#pending-none")).to_be_visible()
    await later_and_reload(service, mine, tmp_path, "held")
    entry = await mine.inner_text(ENTRY)
    for expected in ("L.L.", "+86138****8000", "answered", "GOLD", "Talk time",
                     "The call's record waits for it"):
        assert expected in entry, (expected, entry)
    assert "Li Lei" not in entry
    assert "13800138000" not in await mine.inner_text("#pending")
    await mine.screenshot(path=str(tmp_path / "agent-7001-list-after-reload.png"),
                          full_page=True)
    for reload in (False, True):
        if reload:
            await other.reload()
        await other.wait_for_selector("#status.on")
        assert await other.locator("#pending-list li").count() == 0
        assert await other.locator("#pending-none").is_visible()
        assert "L.L." not in await other.inner_text("body")
    await other.screenshot(path=str(tmp_path / "agent-7002-list-empty.png"), full_page=True)

    await mine.click("#lang")  # 中文
    assert "待填写通话结果的通话" in await mine.inner_text("#pending")
    assert "已接听" in await mine.inner_text(ENTRY)
    await mine.screenshot(path=str(tmp_path / "agent-7001-list-zh.png"), full_page=True)
    await mine.click("#lang")  # back to English

    await mine.keyboard.press("Alt+l")
    await expect(mine.locator(ENTRY)).to_be_focused()
    await mine.keyboard.press("Enter")
    await mine.wait_for_selector("#pending-list form.wrapup")
    assert await mine.get_attribute(ENTRY, "aria-expanded") == "true"
    await mine.keyboard.press("2")  # follow-up
    await mine.fill(NOTE, "call back on Monday")
    await mine.screenshot(path=str(tmp_path / "agent-7001-list-form.png"), full_page=True)
    await mine.keyboard.press("Control+Enter")
    await mine.wait_for_selector(".flash")
    assert "goes to the CRM with the call" in await mine.inner_text(".flash")
    await mine.wait_for_selector("#pending-list li", state="detached")
    assert await mine.locator("#pending-none").is_visible()

    await wait_for(lambda: len(service.activities()) >= 1)
    (act,) = service.activities()
    assert (act["call_id"], act["disposition"], act["note"]) == \
        (LINKEDID, "follow-up", "call back on Monday")
    assert patches(service) == []
    await mine.reload()
    await mine.wait_for_selector("#status.on")
    assert await mine.locator("#pending-list li").count() == 0
    assert await other.locator("#pending-list li").count() == 0


@pytest.mark.parametrize("service", [{"wrapup_s": 1.0}], indirect=True)
async def test_a_disposition_from_the_list_after_the_wrapup_updates_the_activity_once(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """With a 1 s wrap-up, the call left for later is sent without a disposition; after
    a reload it is still in 7001's list (already sent: a disposition now updates the
    activity), not in 7002's; the disposition given from it PATCHes the one activity
    once (still one activity, now with it), and the list is empty then."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    mine = await sign_in(browser, service, "li-na")
    other = await sign_in(browser, service, "wang-wei")
    await later_and_reload(service, mine, tmp_path, "late")
    await wait_for(lambda: len(service.activities()) == 1)
    assert service.activities()[0]["disposition"] is None
    await mine.reload()
    await mine.wait_for_selector(ENTRY)
    await expect(mine.locator(ENTRY)).to_contain_text("Already sent to the CRM")
    await mine.screenshot(path=str(tmp_path / "agent-7001-list-late.png"), full_page=True)
    assert await other.locator("#pending-list li").count() == 0
    await mine.focus(ENTRY)
    await mine.keyboard.press("Enter")
    await mine.wait_for_selector("#pending-list form.wrapup")
    await mine.keyboard.press("1")  # resolved
    await mine.keyboard.press("Control+Enter")
    await mine.wait_for_selector(".flash")
    assert "activity in the CRM is updated" in await mine.inner_text(".flash")
    await wait_for(lambda: service.activities()[0].get("disposition") == "resolved")
    assert len(service.activities()) == 1
    assert len(patches(service)) == 1
    await mine.wait_for_selector("#pending-list li", state="detached")
    await mine.reload()
    await mine.wait_for_selector("#status.on")
    assert await mine.locator("#pending-list li").count() == 0
    assert await other.locator("#pending-list li").count() == 0
    await other.screenshot(path=str(tmp_path / "agent-7002-after-late.png"), full_page=True)


# Call 3: an unknown caller on the sales line; 7008 does not answer, then the ringall
# support queue rings 7002 and 7001 at once, and 7002 answers.
CALL3 = "1795338393.10"
QUEUE_RINGS = (245, 342)   # up to DialBegin to 7001 from the queue
TAKEN = (343, 360)         # 7002 answers; 7001's leg is cancelled


async def test_queue_card_closes_when_another_agent_takes_the_call(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """Both agents rung by the ringall queue see the card ("From queue support"); when 7002
    answers, 7001's card closes and 7002's shows the talk timer; the page is in Chinese
    when the agent switches language, its header (binding, socket status) too."""
    await service.route("02150501234", "unknown", "1795338393.11")
    a7001 = await sign_in(browser, service, "li-na")
    a7002 = await sign_in(browser, service, "wang-wei")
    await a7001.click("#lang")  # 中文
    assert await a7001.inner_text("#binding") == "坐席 7001 · Li Na · 话机 Local/7001@agents"
    assert await a7001.inner_text("#status") == "在线"
    await service.ami.play(service.ami.events(*QUEUE_RINGS))
    await a7001.wait_for_selector(".card.ringing")
    await a7002.wait_for_selector(".card.ringing")
    zh = await a7001.inner_text(".card")
    for expected in ("来自队列 support", "振铃中", "未知来电", "+862150501234", "规则: default"):
        assert expected in zh, (expected, zh)
    assert "From queue support" in await a7002.inner_text(".card")
    await a7001.screenshot(path=str(tmp_path / "agent-7001-queue-zh.png"))
    await service.ami.play(service.ami.events(*TAKEN))
    await a7002.wait_for_selector(".card.talking")
    await a7001.wait_for_selector(".card", state="detached")
    assert await a7001.locator("#empty").is_visible()
    assert "暂无来电" in await a7001.inner_text("#empty")
    await a7002.screenshot(path=str(tmp_path / "agent-7002-talking.png"))


async def test_supervisor_sees_live_calls_alerts_and_today_viewer_sees_no_customers(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """With call 2 waiting in the vip queue, the supervisor's page shows it with the
    customer's name and the waiting count; the viewer's shows the call without the name
    and no CSV link; after the four calls end, today's charts and the CSV have them."""
    await service.route("13900139000", "Han Meimei", "1795338363.5")
    boss = await sign_in(browser, service, "boss")
    looker = await sign_in(browser, service, "looker")
    await service.ami.play(service.ami.events(0, 170))  # call 1 done, call 2 queued
    await expect(boss.locator("#tiles .tile .value").first).to_have_text("1")
    boss_text = await boss.inner_text("main")
    assert "Han Meimei" in boss_text
    assert "vip" in boss_text
    await expect(looker.locator("#tiles .tile .value").first).to_have_text("1")
    looker_text = await looker.inner_text("main")
    assert "Han Meimei" not in looker_text
    assert "hidden for your role" in looker_text
    assert not await looker.locator("#csv").is_visible()
    await boss.screenshot(path=str(tmp_path / "supervisor-live.png"), full_page=True)
    await service.ami.play(service.ami.events(171, 432))
    await wait_for(lambda: len(service.activities()) == 4)
    started = datetime.fromisoformat(service.activities()[0]["started_at"])
    day = started.astimezone(ZoneInfo("Asia/Shanghai")).date().isoformat()
    await boss.goto(f"{service.base}/ui/supervisor?day={day}")
    await boss.wait_for_selector("#chart-hours svg rect")
    assert await boss.locator("#chart-hours svg rect").count() >= 1
    await boss.screenshot(path=str(tmp_path / "supervisor-today.png"), full_page=True)
    await boss.click("#lang")
    await expect(boss.locator("h2 [data-t=today]")).to_have_text("今日")
    assert "每小时通话（按结果）" in await boss.inner_text("main")
    await boss.screenshot(path=str(tmp_path / "supervisor-today-zh.png"), full_page=True)
    async with boss.expect_download() as info:
        await boss.click("#csv")
    download = await info.value
    csv_path = tmp_path / "today.csv"
    await download.save_as(str(csv_path))
    lines = csv_path.read_text(encoding="utf-8-sig").strip().splitlines()
    assert lines[0].startswith("start,call,outcome,customer_id")
    assert len(lines) == 5
    assert any(",C-1001,gold," in line and ",answered," in line and ",7001," in line
               for line in lines)

    # The audit trail panel: the supervisor's own reads, filtered by who and action.
    assert not await looker.locator("#audit-panel").is_visible()
    await boss.click("#lang")  # back to English
    await boss.select_option("#audit-action", "customer.")
    await boss.click("#audit-form button[type=submit]")
    await expect(boss.locator("#audit td", has_text="customer.export")).to_have_count(1)
    audit_text = await boss.inner_text("#audit")
    assert "customer.live" in audit_text
    assert "customer:C-1002" in audit_text
    assert "boss" in audit_text
    await boss.locator("#audit-panel").scroll_into_view_if_needed()
    await boss.screenshot(path=str(tmp_path / "supervisor-audit.png"), full_page=True)
    await boss.fill("#audit-who", "li-na")
    await boss.click("#audit-form button[type=submit]")
    await expect(boss.locator("#audit")).to_have_text("No entries for these filters.")


async def test_a_page_whose_sign_in_expired_goes_to_the_sign_in_page(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """The agent's sign-in ends while the page is open (its cookie gone) and its socket
    drops: the socket is refused from then on, and the page goes to the sign-in page
    instead of saying "Reconnecting…" for ever."""
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    sockets: list[Any] = []

    def through(ws: Any) -> None:  # the page's socket, passed on to the service
        sockets.append(ws)
        ws.connect_to_server()

    await page.route_web_socket("**/ui/ws/agent", through)
    await page.goto(f"{service.base}/ui/login")
    await page.fill("#token", service.tokens["li-na"])
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/ui/agent")
    await page.wait_for_selector("#status.on")
    await context.clear_cookies()  # the sign-in expired
    await sockets[-1].close()      # and the socket dropped
    await page.wait_for_url("**/ui/login", timeout=10_000)
    await page.screenshot(path=str(tmp_path / "agent-signed-out.png"))
    assert len(sockets) >= 2


async def test_a_note_being_typed_keeps_its_caret_and_composition_through_a_push(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """The agent types a note on call 1's wrap-up form and goes back to its start; a push
    (call 3 rings the agent from the queue) redraws the page: the typing goes on where
    the caret was. While an input method composes (Chinese), the page is not redrawn
    under it: the next card shows once the composition ends."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    await service.route("02150501234", "unknown", "1795338393.11")
    await service.route("02150501234", "unknown", "1795338493.11")
    mine = await sign_in(browser, service, "li-na")
    for part in (RING_7001, ANSWER_7001, HANGUP_7001):
        await service.ami.play(service.ami.events(*part))
    await mine.wait_for_selector(".card.ended form.wrapup")
    await mine.click(NOTE)
    await mine.keyboard.type("call back")
    await mine.keyboard.press("Home")
    await service.ami.play(service.ami.events(*QUEUE_RINGS))
    await mine.wait_for_selector(".card.ringing")
    await mine.keyboard.type("please ")
    assert await mine.input_value(NOTE) == "please call back"

    await service.ami.play(service.ami.events(*TAKEN))  # 7002 takes call 3: 7001's closes
    await mine.wait_for_selector(".card.ringing", state="detached")
    await mine.dispatch_event(NOTE, "compositionstart")
    await mine.evaluate("document.querySelector('#note-1795338333\\\\.0').dataset.mark = 'x'")
    await service.ami.play(renamed_call3(service.ami.events(*QUEUE_RINGS)))
    await asyncio.sleep(0.5)
    assert await mine.locator(".card.ringing").count() == 0  # not drawn while composing
    assert await mine.get_attribute(NOTE, "data-mark") == "x"  # the very same node
    await mine.dispatch_event(NOTE, "compositionend")
    await mine.wait_for_selector(".card.ringing")
    assert await mine.input_value(NOTE) == "please call back"
    await mine.screenshot(path=str(tmp_path / "agent-7001-note-kept.png"), full_page=True)


def renamed_call3(blocks: list[bytes]) -> list[bytes]:
    """Call 3's ring again as a new call (other Uniqueids and Linkedid)."""
    return [b.replace(b"1795338393", b"1795338493") for b in blocks]


async def test_last_calls_show_an_error_or_none_instead_of_waiting_for_ever(
    service: WebService, browser: Any, tmp_path: Path
) -> None:
    """Li Lei's history in Redis cannot be read (its entry is broken): her card says the
    earlier calls could not be read, in English and in Chinese, instead of "…" for
    ever; a page that opens after the queue rang the agent gets that card completed
    too: an unknown caller without history shows "No earlier calls"."""
    import redis.asyncio as aioredis

    from router.keys import keys_from_settings

    client = aioredis.Redis.from_url(service.settings.redis.url)
    try:
        await client.set(keys_from_settings(service.settings).web_recent("c:C-1001"), "x")
    finally:
        await client.aclose()
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    mine = await sign_in(browser, service, "li-na")
    await service.ami.play(service.ami.events(*RING_7001))
    error = mine.locator(f"{CARD} .last .last-error")
    await expect(error).to_have_text("Earlier calls could not be read just now.")
    await mine.click("#lang")  # 中文
    await expect(error).to_have_text("暂时无法读取以往通话。")
    await mine.screenshot(path=str(tmp_path / "agent-7001-last-calls-error-zh.png"))

    await service.route("02150501234", "unknown", "1795338393.11")
    await service.ami.play(service.ami.events(*QUEUE_RINGS))
    other = await sign_in(browser, service, "wang-wei")  # after the ring
    card = other.locator("#card-1795338393\\.10")
    await expect(card.locator(".last p.muted")).to_have_text("No earlier calls")
    await other.screenshot(path=str(tmp_path / "agent-7002-no-last-calls.png"))
