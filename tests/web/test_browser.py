"""End to end in headless Chromium: callroute on loopback (FastAGI, AMI from recorded
Asterisk events, real Redis, the sample CRM) and the agents' and supervisor's pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.web.conftest import TOKENS, WebService, wait_for

# Call 1 of ami-basic.raw: Li Lei (+8613800138000) rings owner 7001, who answers.
RING_7001 = (0, 50)        # up to DialBegin to Local/7001@agents
ANSWER_7001 = (51, 71)     # DialEnd ANSWER, bridge
HANGUP_7001 = (72, 101)    # hangups and Cdrs
LINKEDID = "1795338333.0"
CARD = "#card-1795338333\\.0"  # the card's id, dot escaped for CSS
NOTE = "#note-1795338333\\.0"


async def sign_in(browser: Any, base: str, user: str) -> Any:
    """A fresh browser context (its own cookies) signed in as ``user`` via the form."""
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    await page.goto(f"{base}/ui/login")
    await page.fill("#token", TOKENS[user])
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
    mine = await sign_in(browser, service.base, "li-na")
    other = await sign_in(browser, service.base, "wang-wei")

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
    assert shot_mine.stat().st_size > 0 and shot_other.stat().st_size > 0
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
