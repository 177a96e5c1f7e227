"""The role table, the sign-in cookie and the decision store, without a server."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from router.settings import WebSettings, WebUser
from router.web.auth import Principal, SessionCodec, TokenTable
from router.web.decisions import CallDecision, DecisionStore


def table() -> TokenTable:
    """Four users: one by plain token, one by its SHA-256, plus the admin token."""
    web = WebSettings(users=[
        WebUser(name="li-na", role="agent", agent="7001", token="agent-token-7001"),
        WebUser(name="boss", role="supervisor",
                token_sha256=hashlib.sha256(b"supervisor-token").hexdigest()),
        WebUser(name="looker", role="viewer", token="viewer-token-xx"),
    ])
    return TokenTable.from_settings(web, admin_token="the-admin-token")


def test_tokens_resolve_to_their_principal_only() -> None:
    """Each token gives its own user and role; a near miss, an empty token give nobody."""
    t = table()
    assert t.authenticate("agent-token-7001") == Principal("li-na", "agent", "7001")
    assert t.authenticate("supervisor-token") == Principal("boss", "supervisor")
    assert t.authenticate("the-admin-token") == Principal("admin", "admin")
    assert t.authenticate("agent-token-700") is None
    assert t.authenticate("") is None


def test_permissions_of_each_role() -> None:
    """Agents see only their own cards and may dispose; viewers see figures but no
    customers; supervisors watch any agent but do not dispose."""
    agent = Principal("a", "agent", "7001")
    viewer = Principal("v", "viewer")
    boss = Principal("b", "supervisor")
    assert agent.may_watch("7001")
    assert not agent.may_watch("7002")
    assert agent.can("dispose")
    assert not agent.can("live")
    assert viewer.can("live")
    assert not viewer.can("customers")
    assert not viewer.may_watch("7001")
    assert boss.may_watch("7002")
    assert boss.can("customers")
    assert not boss.can("dispose")
    assert Principal("e", "engineer").can("live")
    assert not Principal("e", "engineer").can("cards")


def test_session_cookie_signed_expiring_and_bound_to_the_token() -> None:
    """A cookie decodes to its user until it expires; a changed signature or user fails;
    the stamp changes when the user's token does."""
    codec = SessionCodec("k" * 32, ttl_s=60)
    t = table()
    principal, stamp = t.lookup("li-na") or (None, "")
    assert principal is not None
    value = codec.encode("li-na", stamp, now=1000)
    assert codec.decode(value, now=1030) == ("li-na", stamp)
    assert codec.decode(value, now=1061) is None
    assert codec.decode(value[:-1] + ("0" if value[-1] != "0" else "1"), now=1030) is None
    assert codec.decode("a.b.c", now=1030) is None
    assert SessionCodec("other", 60).decode(value, now=1030) is None
    rotated = TokenTable.from_settings(WebSettings(users=[
        WebUser(name="li-na", role="agent", agent="7001", token="agent-token-NEW1")]))
    assert (rotated.lookup("li-na") or (None, ""))[1] != stamp
    assert t.lookup("nobody") is None


def test_web_settings_refuse_incomplete_users() -> None:
    """An agent without an agent id, a user without a token, a short token, duplicate
    names and an unknown time zone are configuration errors."""
    with pytest.raises(ValidationError, match="agent role but no agent id"):
        WebUser(name="x", role="agent", token="long-enough-token")
    with pytest.raises(ValidationError, match="needs a token"):
        WebUser(name="x", role="viewer")
    with pytest.raises(ValidationError, match="at least 12"):
        WebUser(name="x", role="viewer", token="short")
    user = WebUser(name="x", role="viewer", token="long-enough-token")
    with pytest.raises(ValidationError, match="unique"):
        WebSettings(users=[user, user])
    with pytest.raises(ValidationError, match="unknown time zone"):
        WebSettings(timezone="Mars/Base")


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
