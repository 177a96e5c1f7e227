"""``callroute crm doctor`` through the command line, against vendor-shaped fakes
(tests/crm_fakes) served from a background thread on loopback."""

from __future__ import annotations

import asyncio
import importlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router import cli
from tests.crm_fakes.base import LI, SARAH, UNKNOWN, FakeCrm


class ThreadedFake:
    """A fake CRM serving from its own event loop in a thread."""

    def __init__(self, name: str) -> None:
        self.module = importlib.import_module(f"tests.crm_fakes.{name}")
        self.fake: FakeCrm = self.module.make()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> ThreadedFake:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def config(self, tmp_path: Path, **extra: Any) -> Path:
        """A config file whose crm: section is the preset pointed at the fake."""
        path = tmp_path / "config.yaml"
        rules = tmp_path / "rules.yaml"
        rules.write_text("rules: []\n")
        crm = {**self.module.config(self.fake), **extra}
        path.write_text(yaml.safe_dump({"crm": crm, "routing": {"rules": "rules.yaml"}}))
        return path


@pytest.fixture
def hubspot() -> Iterator[ThreadedFake]:
    """The HubSpot fake, running."""
    with ThreadedFake("hubspot") as running:
        yield running


def test_doctor_shows_each_request_answer_and_the_customer(
        hubspot: ThreadedFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """For a caller typed nationally in the CRM, the doctor prints every lookup's request
    (method, URL, body) and answer, in order, and the customer it maps to; the token is
    masked."""
    code = cli.main(["crm", "doctor", "--config", str(hubspot.config(tmp_path)), SARAH])
    out = capsys.readouterr().out
    assert code == 0
    assert "lookup 1/3: contact_exact" in out
    assert "lookup 2/3: contact_digits" in out
    assert out.index("contact_exact") < out.index("contact_digits")
    assert "-> POST http://127.0.0.1" in out
    assert "/crm/v3/objects/contacts/search" in out
    assert '"value": "*5550100"' in out  # the body, with {last:7} rendered
    assert "<- HTTP 200" in out
    assert f"=> customer id={hubspot.fake.ids['sarah']}" in out
    assert "Authorization: ***" in out
    assert hubspot.module.TOKEN not in out
    assert "doctor: OK" in out
    assert hubspot.fake.violations == []


def test_doctor_post_runs_every_step_reads_back_and_finds_the_new_lead(
        hubspot: ThreadedFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --post, an unknown number's test record goes through lead, call and task;
    each created object is read back by id, and the caller is then found as the new
    lead."""
    code = cli.main(["crm", "doctor", "--config", str(hubspot.config(tmp_path)), UNKNOWN,
                     "--post"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "=> unknown caller" in out
    for step in ("step lead:", "step call:", "step task:"):
        assert step in out
    lead_id = hubspot.fake.created("lead")[0]["id"]
    assert f"reading lead {lead_id} back:" in out
    assert f"-> GET http://127.0.0.1:{hubspot.fake.url.rsplit(':', 1)[1]}" \
           f"/crm/v3/objects/contacts/{lead_id}" in out
    assert "looking the caller up again:" in out
    assert f"=> customer id={lead_id}" in out.split("looking the caller up again:")[1]
    assert "=> found the record the pipeline created" in out
    assert [c["on"] for c in hubspot.fake.created("call")] == [lead_id]
    assert hubspot.fake.violations == []


def test_doctor_post_for_a_known_customer_skips_the_lead(
        hubspot: ThreadedFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A known caller's test record skips the lead step (its when is false) and posts the
    call and the task on the customer, assigned to their owner."""
    code = cli.main(["crm", "doctor", "--config", str(hubspot.config(tmp_path)), LI, "--post"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step lead: skipped" in out
    assert [(t["on"], t["owner"]) for t in hubspot.fake.created("task")] == [
        (hubspot.fake.ids["li"], hubspot.fake.owner_ids["o1"])]
    assert hubspot.fake.created("lead") == []


def test_doctor_reports_a_failure_and_exits_1(
        hubspot: ThreadedFake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CRM error is shown with the vendor's answer and the doctor exits 1."""
    hubspot.fake.fail_next("error")
    code = cli.main(["crm", "doctor", "--config", str(hubspot.config(tmp_path)), LI])
    out = capsys.readouterr().out
    assert code == 1
    assert "<- HTTP 400" in out
    assert "VALIDATION_ERROR" in out
    assert "!! lookup failed: 4xx" in out
    assert "doctor: FAILED" in out


def test_doctor_masks_secrets_inside_request_bodies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Odoo's key travels inside each JSON-RPC body: the doctor masks it there too, and
    shows the tag-name reference call the field map needed."""
    with ThreadedFake("odoo") as odoo:
        code = cli.main(["crm", "doctor", "--config", str(odoo.config(tmp_path)), LI])
        out = capsys.readouterr().out
        assert code == 0, out
        assert odoo.module.KEY not in out
        assert '"***"' in out
        assert "(ref:tag_names)" in out
        assert "tags=('repeat-buyer',)" in out


def test_doctor_without_a_number_describes_the_configuration(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a number the doctor lists the lookups and record steps and makes no
    request."""
    with ThreadedFake("salesforce") as sf:
        code = cli.main(["crm", "doctor", "--config", str(sf.config(tmp_path))])
        out = capsys.readouterr().out
        assert code == 0
        assert "lookups: contact_exact (contact, 1 step(s)), contact_search (contact, 2 " \
               "step(s)), lead (lead, 1 step(s))" in out
        assert "record steps: lead [when 'lead' in plan and record.caller], call, task" in out
        assert sf.fake.seen == []


def test_the_doctors_test_record_is_a_call_record() -> None:
    """The record the doctor posts has exactly the call record's shape (so templates see
    what they see in production)."""
    from ami.records import CallRecord
    from router.crm.doctor import test_record
    from router.models import Customer
    from router.phone import normalize

    rec = test_record(normalize(LI, "CN"), Customer(id="C1", owner="7001", kind="lead"))
    assert CallRecord.model_validate(rec).model_dump(mode="json") == rec
    assert (rec["customer_id"], rec["customer_owner"], rec["customer_kind"]) == (
        "C1", "7001", "lead")


@pytest.mark.parametrize("name", ["hubspot", "salesforce", "zoho", "odoo", "pipedrive",
                                  "espocrm"])
def test_doctor_post_finds_each_object_again_by_its_key(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With --post, every record step of every preset is found again by the key it wrote
    (its find: what a retry does after a lost answer), by the very id it was created
    with; the call (the one step with an update) is then changed with a test disposition
    (the first of web.dispositions and a note) and read back, showing the fields the
    update changed, which carry the disposition."""
    with ThreadedFake(name) as running:
        code = cli.main(["crm", "doctor", "--config", str(running.config(tmp_path)), UNKNOWN,
                         "--post"])
        out = capsys.readouterr().out
        assert code == 0, out
        steps = [s for s in ("person", "lead", "call", "task") if f"step {s}:" in out]
        assert len(steps) >= 3
        assert out.count("finding ") == len(steps)
        assert out.count("=> found it by its key (id ") == len(steps)
        call_id = running.fake.created("call")[0]["id"]
        assert out.count("updating ") == 1
        assert f"updating call {call_id} with a test disposition 'resolved'" in out
        update = out.split("updating call")[1].split("step task:")[0]
        assert "(call:update)" in update
        assert "(call:fetch)" in update
        changed = update.split("changed by the update:")[1]
        assert "disposition resolved" in changed or "Disposition: resolved" in changed
        assert "callroute doctor: a test note" in changed
        assert "=> the disposition is on it" in update
        assert [c.id for c in running.fake.changes] == [call_id]
        assert running.fake.violations == []


def test_doctor_fails_an_update_that_does_not_show_the_disposition(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An update that changes the call but writes the disposition nowhere the fetch
    reads (here: only its name) fails the doctor, and so does one the vendor refuses."""
    with ThreadedFake("espocrm") as running:
        config = running.config(tmp_path, records=[{"name": "call", "update": {
            "body": {"description": "{omit}", "name": "Inbound call (updated)"}}}])
        code = cli.main(["crm", "doctor", "--config", str(config), LI, "--post"])
        out = capsys.readouterr().out
        assert code == 1
        assert "name: Inbound call (updated)" in out
        assert "!! reading it back shows no field with the test disposition" in out
        config = running.config(tmp_path, **running.module.BROKEN_UPDATE)
        code = cli.main(["crm", "doctor", "--config", str(config), LI, "--post"])
        out = capsys.readouterr().out
        assert code == 1
        assert "!! update failed: 4xx" in out
        assert "doctor: FAILED" in out


def test_doctor_waits_for_a_lagging_search_and_fails_a_find_that_cannot_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """HubSpot's search shows a new call only after a while: the doctor asks again until
    it shows (within settle_s). A find on a property the portal lacks fails the doctor
    with the vendor's answer, and so does one that never finds the object."""
    from router.crm import doctor as doctor_module

    monkeypatch.setattr(doctor_module, "FIND_POLL_S", 0.2)
    with ThreadedFake("hubspot") as running:
        running.fake.index_lag_s = 0.5  # type: ignore[attr-defined]
        code = cli.main(["crm", "doctor", "--config", str(running.config(tmp_path)), LI,
                         "--post"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "not found yet (the CRM's search may lag up to settle_s, 30 s)" in out
        assert out.count("=> found it by its key") == 2  # the call and the task
        find = {"properties": ["hs_timestamp"], "limit": 10, "filterGroups": [{"filters": [
            {"propertyName": "callroute_key", "operator": "EQ",
             "value": "{idempotency_key}"}]}]}
        config = running.config(tmp_path, records=[{"name": "call", "find": {
            "body": find}}])
        code = cli.main(["crm", "doctor", "--config", str(config), LI, "--post"])
        out = capsys.readouterr().out
        assert code == 1
        assert "!! find failed: 4xx" in out
        assert "callroute_key" in out
        config = running.config(tmp_path, records=[{"name": "task", "find": {
            "settle_s": 0, "match": {"path": "properties.hs_task_body",
                                     "contains": "no such {idempotency_key}"}}}])
        code = cli.main(["crm", "doctor", "--config", str(config), LI, "--post"])
        out = capsys.readouterr().out
        assert code == 1
        assert "!! not found by its key: after a lost answer the step would be posted" in out


async def test_doctor_masks_an_oauth_token_sent_in_a_header_of_its_own(tmp_path: Path) -> None:
    """An OAuth2 token sent in a header other than Authorization (oauth2.header) is
    masked in the doctor's requests like the client's own log lines mask it."""
    from router.crm.doctor import doctor
    from router.settings import load_settings
    from tests.router.crm.oauth_server import CLIENT_ID, CLIENT_SECRET, oauth_server

    async with oauth_server() as server:
        (tmp_path / "rules.yaml").write_text("rules: []\n")
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"routing": {"rules": "rules.yaml"}, "crm": {
            "base_url": server.url,
            "auth": {"type": "oauth2", "oauth2": {
                "token_url": "/oauth/token", "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "header": "X-Access-Token", "scheme": ""}},
            "lookups": [{"steps": [{"url": "/api/search", "results": "",
                                    "not_found_status": [401]}]}]}}))
        out = io.StringIO()
        await doctor(load_settings(config), "+14155550199", post=False, out=out)
    text = out.getvalue()
    assert server.issued == ["at-1", "at-2"]  # the API refuses the header: one refresh
    assert "-> GET http://127.0.0.1" in text
    assert "X-Access-Token: ***" in text
    assert not any(token in text for token in server.issued)
