"""The role model: five roles, ranked by trust, each with an explicit set of permissions.

==============  =====================================================================
role            may
==============  =====================================================================
``viewer``      see the service's state: readiness, metrics, presence, outbox depth,
                the supervisor's live figures without customer names
``agent``       see the screen-pop cards of the calls rung to *its own* agent id and
                add a disposition to them; nothing about other agents' callers
``supervisor``  everything a viewer sees, with customers' names and ids; any agent's
                cards; the audit trail
``engineer``    everything a viewer sees, with customers (``explain``); reload rules,
                invalidate cache entries, retry and replay call records
``admin``       everything above (but an agent's own dispositions); users and roles,
                encryption keys
==============  =====================================================================

The rank (``viewer < agent < supervisor < engineer < admin``) orders trust: who may
grant what, and which of two roles is the stronger; it is *not* a superset chain (an
agent sees customers a viewer does not, but no figures). Every check asks
:meth:`Principal.can` for one :class:`Permission`; the agent binding is
:meth:`Principal.may_act_for`.

``Role`` and ``Permission`` are string enums: ``Role.AGENT == "agent"``, they serialise
as their value, and a plain string from a config file or JSON converts with
``Role(text)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """A user's role (ranked by :attr:`rank`)."""

    VIEWER = "viewer"
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    ENGINEER = "engineer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """0 (viewer) .. 4 (admin)."""
        return _RANK[self]

    def at_least(self, other: Role) -> bool:
        """Whether this role ranks at or above ``other``."""
        return self.rank >= other.rank


_RANK = {role: i for i, role in enumerate(Role)}


class Permission(StrEnum):
    """One thing a route or an action needs."""

    #: readiness details, metrics, presence, outbox depth: no personal data
    STATUS = "status"
    #: the supervisor's live figures and charts (callers without names)
    LIVE = "live"
    #: customers' names, ids and records: live view with names, exports, ``explain``
    CUSTOMERS = "customers"
    #: screen-pop cards (an agent: only those of its own agent id)
    CARDS = "cards"
    #: a disposition on a call one answered
    DISPOSE = "dispose"
    #: reload (or roll back) the routing rules
    RULES = "rules"
    #: invalidate cache entries
    CACHE = "cache"
    #: retry and replay call records
    OUTBOX = "outbox"
    #: read the audit trail
    AUDIT = "audit"
    #: add, disable, rotate users and change roles
    USERS = "users"
    #: encryption keys (status, rotation)
    KEYS = "keys"


P = Permission
#: What each role may do. Changing this table changes every route's answer; the
#: table-driven access test checks each role on each route against it.
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({P.STATUS, P.LIVE}),
    Role.AGENT: frozenset({P.CARDS, P.DISPOSE}),
    Role.SUPERVISOR: frozenset({P.STATUS, P.LIVE, P.CUSTOMERS, P.CARDS, P.AUDIT}),
    Role.ENGINEER: frozenset({P.STATUS, P.LIVE, P.CUSTOMERS, P.RULES, P.CACHE, P.OUTBOX}),
    Role.ADMIN: frozenset(set(Permission) - {P.DISPOSE}),
}


def roles_with(permission: Permission | str) -> frozenset[Role]:
    """The roles that hold ``permission``."""
    wanted = Permission(permission)
    return frozenset(r for r, perms in PERMISSIONS.items() if wanted in perms)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request or a command comes from: a user, its role and, for an agent, the
    agent id (the rules' ``agents`` table) it is bound to."""

    user: str
    role: Role
    agent: str | None = None

    @property
    def agent_id(self) -> str | None:
        """The agent id an agent is bound to (None for the other roles)."""
        return self.agent

    def can(self, permission: Permission | str) -> bool:
        """Whether this principal's role holds ``permission``."""
        return Permission(permission) in PERMISSIONS[self.role]

    def may_act_for(self, agent: str) -> bool:
        """Whether this principal may see or act on the calls of ``agent``: an agent only
        on its own; supervisors and admins on any (they hold ``cards``)."""
        if not self.can(Permission.CARDS):
            return False
        return self.role is not Role.AGENT or self.agent == agent

    # The web helper's name for the same check.
    may_watch = may_act_for


#: The principal of requests on a loopback-only admin API that has no users at all (the
#: out-of-the-box setup): the host's own users, trusted as admins. Binding elsewhere with
#: no users is refused at start-up (router.auth.access.check_exposure).
LOCAL_ADMIN = Principal("local", Role.ADMIN)
#: The CRM's webhook, once its HMAC signature checked out (audit trail's "who").
CRM_WEBHOOK = Principal("crm-webhook", Role.ENGINEER)
#: The service itself (file watcher, signals), for the audit trail.
SYSTEM = Principal("system", Role.ADMIN)
