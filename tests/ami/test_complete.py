"""Records completed after the call: the customer of a degraded route, the recording link."""

from __future__ import annotations

import pytest

from ami.complete import RecordCompleter
from ami.records import CallRecord
from router.models import Customer

LI_LEI = Customer(id="C-1001", name="Li Lei", tier="gold", owner="7001", kind="lead")


def record(**fields: object) -> CallRecord:
    base: dict[str, object] = {"record_key": "call:1.1", "linkedid": "1.1",
                               "outcome": "answered", "caller": "+8613800138000"}
    base.update(fields)
    return CallRecord.model_validate(base)


async def test_degraded_route_gets_the_customer_found_after_the_call() -> None:
    """Routed past the deadline with no customer: the number is looked up again and the
    customer goes on the record (id, tier, owner, and kind: the CRM object to post on),
    which still says the route was degraded."""
    asked: list[str] = []

    async def find(number: str) -> Customer | None:
        asked.append(number)
        return LI_LEI

    done = await RecordCompleter(find).complete(
        record(route_reason="deadline", degraded=True))
    assert asked == ["+8613800138000"]
    assert (done.customer_id, done.customer_tier, done.degraded) == ("C-1001", "gold", True)
    assert (done.customer_owner, done.customer_kind) == ("7001", "lead")


@pytest.mark.parametrize("fields", [
    {"degraded": False},                                   # routed normally: unknown is unknown
    {"degraded": True, "customer_id": "C-9"},              # already known
    {"degraded": True, "caller": None, "anonymous": True},  # nothing to look up
])
async def test_no_lookup_when_not_needed(fields: dict[str, object]) -> None:
    """No second lookup for a complete route, a known customer or a withheld number."""
    async def find(number: str) -> Customer | None:
        raise AssertionError("looked up")

    original = record(**fields)
    assert await RecordCompleter(find).complete(original) is original


async def test_lookup_failure_keeps_the_record(caplog: pytest.LogCaptureFixture) -> None:
    """A lookup that fails (or finds nobody) leaves the record as it was, with a log line;
    an incomplete record (events missed) is looked up too."""
    async def broken(number: str) -> Customer | None:
        raise RuntimeError("CRM down")

    async def nobody(number: str) -> Customer | None:
        return None

    original = record(incomplete=True)
    assert (await RecordCompleter(broken).complete(original)).customer_id is None
    assert "lookup after the call failed" in caplog.text
    assert (await RecordCompleter(nobody).complete(original)).customer_id is None


async def test_recording_link_added() -> None:
    """A record with a recording gets the link the linker makes; one without, none."""
    completer = RecordCompleter(link=lambda path: f"https://pbx/r/{path.rsplit('/', 1)[-1]}")
    done = await completer.complete(record(recording="/var/spool/asterisk/monitor/1.2.wav"))
    assert done.recording_url == "https://pbx/r/1.2.wav"
    assert (await completer.complete(record())).recording_url is None
