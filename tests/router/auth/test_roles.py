"""The role model: ranks, permissions, the agent binding."""

from __future__ import annotations

import json

import pytest

from router.auth.roles import PERMISSIONS, Permission, Principal, Role, roles_with


def test_roles_are_ranked_viewer_to_admin() -> None:
    """The rank orders trust: viewer < agent < supervisor < engineer < admin."""
    order = [Role.VIEWER, Role.AGENT, Role.SUPERVISOR, Role.ENGINEER, Role.ADMIN]
    assert [r.rank for r in order] == [0, 1, 2, 3, 4]
    assert Role.ADMIN.at_least(Role.ENGINEER)
    assert not Role.AGENT.at_least(Role.SUPERVISOR)
    assert Role.SUPERVISOR.at_least(Role.SUPERVISOR)


def test_roles_and_permissions_are_plain_strings_too() -> None:
    """A role compares equal to its name and serialises as it (config files, JSON, the
    pages' tables of role names)."""
    assert Role.AGENT == "agent"
    assert Role("supervisor") is Role.SUPERVISOR
    assert json.dumps({"role": Role.ENGINEER}) == '{"role": "engineer"}'
    assert Role.VIEWER in frozenset({"viewer", "admin"})
    with pytest.raises(ValueError, match="root"):
        Role("root")


@pytest.mark.parametrize(("permission", "roles"), [
    (Permission.STATUS, {"viewer", "supervisor", "engineer", "admin"}),
    (Permission.LIVE, {"viewer", "supervisor", "engineer", "admin"}),
    (Permission.CUSTOMERS, {"supervisor", "engineer", "admin"}),
    (Permission.CARDS, {"agent", "supervisor", "admin"}),
    (Permission.DISPOSE, {"agent"}),
    (Permission.RULES, {"engineer", "admin"}),
    (Permission.CACHE, {"engineer", "admin"}),
    (Permission.OUTBOX, {"engineer", "admin"}),
    (Permission.AUDIT, {"supervisor", "admin"}),
    (Permission.USERS, {"admin"}),
    (Permission.KEYS, {"admin"}),
])
def test_who_holds_each_permission(permission: Permission, roles: set[str]) -> None:
    """Each permission is held by exactly the roles the issue gives it."""
    assert roles_with(permission) == roles
    for role in Role:
        assert Principal("u", role, "7001" if role is Role.AGENT else None).can(permission) \
            == (role in roles)


def test_every_permission_is_held_by_someone_and_admin_holds_all_but_dispose() -> None:
    """No permission is unreachable; the admin holds everything but an agent's own
    disposition; the viewer sees no customer."""
    held = set().union(*PERMISSIONS.values())
    assert held == set(Permission)
    assert PERMISSIONS[Role.ADMIN] == set(Permission) - {Permission.DISPOSE}
    assert not Principal("v", Role.VIEWER).can("customers")


def test_an_agent_is_bound_to_its_own_agent_id() -> None:
    """An agent may act for its own agent id only; a supervisor for any; a viewer or an
    engineer for none (they hold no cards)."""
    alice = Principal("alice", Role.AGENT, "7001")
    assert alice.agent_id == "7001"
    assert alice.may_act_for("7001")
    assert not alice.may_act_for("7002")
    assert Principal("sue", Role.SUPERVISOR).may_act_for("7002")
    assert not Principal("eve", Role.ENGINEER).may_act_for("7001")
    assert not Principal("vic", Role.VIEWER).may_watch("7001")
