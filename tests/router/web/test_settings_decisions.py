"""The web settings and the decision store, without a server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.settings import Disposition, WebSettings
from router.web.decisions import CallDecision, DecisionStore


def test_web_settings_refuse_bad_dispositions_and_zones() -> None:
    """Duplicate disposition codes, a code with spaces and an unknown time zone are
    configuration errors; the defaults are valid and bilingual."""
    with pytest.raises(ValidationError, match="unique"):
        WebSettings(dispositions=[Disposition(code="a", en="A", zh="甲"),
                                  Disposition(code="a", en="B", zh="乙")])
    with pytest.raises(ValidationError, match="pattern"):
        Disposition(code="no spaces", en="x", zh="x")
    with pytest.raises(ValidationError, match="unknown time zone"):
        WebSettings(timezone="Mars/Base")
    assert all(d.en and d.zh for d in WebSettings().dispositions)


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def decision(uid: str, at: float) -> CallDecision:
    """A minimal decision for channel ``uid``."""
    return CallDecision(uid, at, None, None, "default", "default", None, None, None,
                        "support", "queue", "skipped", 0.0)


def test_decision_store_is_bounded_and_expires() -> None:
    """Old decisions expire after the TTL; past max_entries the oldest go first."""
    clock = Clock()
    store = DecisionStore(clock=clock, max_entries=3, ttl_s=10)
    for i in range(4):
        store.add(decision(f"u{i}", clock.now))
    assert len(store) == 3
    assert store.get("u0") is None
    assert store.get("u3") is not None
    clock.now += 11
    assert store.get("u3") is None


def test_late_dispositions_need_an_update_request_on_the_call_step() -> None:
    """A disposition after the wrap-up time is taken for web.late_disposition_s only when
    the CRM's call step says how to update its activity; without one it is refused."""
    from router.crm.config import sample_crm_section
    from router.settings import Settings
    from router.web.assemble import late_dispositions_s

    section = sample_crm_section()
    with_update = Settings.model_validate({"crm": section,
                                           "web": {"late_disposition_s": 7200}})
    assert late_dispositions_s(with_update) == 7200
    section["activity"].pop("update")
    without = Settings.model_validate({"crm": section, "web": {"late_disposition_s": 7200}})
    assert late_dispositions_s(without) == 0
