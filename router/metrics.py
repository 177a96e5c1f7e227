"""Every metric callroute exports, defined in this one place (Prometheus text format).

The admin API serves them at ``GET /metrics``. Tests read values with
``REGISTRY.get_sample_value(name, labels)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

REGISTRY = CollectorRegistry(auto_describe=True)
M = TypeVar("M", bound=MetricWrapperBase)


@lru_cache(maxsize=1024)
def child(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, remembered: the per-call paths count with it
    (``labels()`` validates and locks on every call; the children never change)."""
    return metric.labels(*values)


# --- FastAGI / routing -------------------------------------------------------------------
AGI_SESSIONS = Counter(
    "callroute_agi_sessions", "FastAGI sessions by outcome", ["outcome"], registry=REGISTRY
)
AGI_ACTIVE = Gauge("callroute_agi_active_sessions", "FastAGI sessions in flight", registry=REGISTRY)
AGI_REJECTED = Counter(
    "callroute_agi_rejected", "FastAGI sessions refused (over the concurrency bound)",
    registry=REGISTRY,
)
DECISIONS = Counter(
    "callroute_decisions", "Routing decisions by rule and reason", ["rule", "reason"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "callroute_decision_seconds", "Time from AGI environment read to decision",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0),
    registry=REGISTRY,
)

# --- CRM lookups and cache -----------------------------------------------------------------
LOOKUPS = Counter(
    "callroute_lookups", "Customer lookups by where the answer came from", ["source"],
    registry=REGISTRY,
)
CRM_REQUESTS = Counter(
    "callroute_crm_requests", "HTTP requests sent to the CRM", ["op"], registry=REGISTRY
)
CRM_ERRORS = Counter(
    "callroute_crm_errors", "CRM errors by operation and kind (timeout, 5xx, 429, ...)",
    ["op", "kind"], registry=REGISTRY,
)
CACHE_ERRORS = Counter(
    "callroute_cache_errors", "Redis cache failures by kind", ["kind"], registry=REGISTRY
)
CACHE_FEED = Gauge(
    "callroute_cache_feed_up",
    "1 while the cache invalidation feed (Redis pub/sub) is subscribed", registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "callroute_breaker_open", "1 while the CRM circuit breaker is open", registry=REGISTRY
)
LOOKUP_BACKGROUND = Gauge(
    "callroute_lookup_background", "CRM lookups running in the background (cache fill)",
    registry=REGISTRY,
)
CRM_LIMIT_WAITS = Counter(
    "callroute_crm_limit_waits",
    "Requests held back by the CRM's rate limit, by operation and outcome (queued: sent "
    "after the wait; refused: the wait was over the bound, not sent)",
    ["op", "outcome"], registry=REGISTRY,
)
CRM_LIMIT_REMAINING = Gauge(
    "callroute_crm_limit_remaining",
    "Requests the CRM says are left in its current window or quota (its limit headers)",
    ["crm"], registry=REGISTRY,
)
CRM_TOKEN_REFRESHES = Counter(
    "callroute_crm_token_refreshes",
    "OAuth2 token endpoint requests by outcome (ok, failed)", ["outcome"], registry=REGISTRY,
)
WEBHOOKS = Counter(
    "callroute_webhooks", "CRM webhooks by outcome (ok, bad_signature, stale, replay, ...)",
    ["outcome"], registry=REGISTRY,
)
SYNC_CUSTOMERS = Counter(
    "callroute_sync_customers", "Customers written to the cache by the pre-warm sync",
    registry=REGISTRY,
)

# --- AMI ---------------------------------------------------------------------------------
AMI_EVENTS = Counter("callroute_ami_events", "AMI events parsed", registry=REGISTRY)
AMI_BAD_MESSAGES = Counter(
    "callroute_ami_bad_messages", "AMI messages skipped as malformed", ["reason"],
    registry=REGISTRY,
)
AMI_RECONNECTS = Counter("callroute_ami_reconnects", "AMI reconnections", registry=REGISTRY)
AMI_INCOMPLETE_CALLS = Counter(
    "callroute_ami_incomplete_calls",
    "Calls whose record may be incomplete because events were missed during a reconnect",
    registry=REGISTRY,
)
PARKED_CALLS = Counter(
    "callroute_parked_calls",
    "Calls in progress at a restart by outcome: parked at shutdown, fallback (could not be "
    "parked: posted as incomplete), adopted (picked up again at start), posted (ended "
    "while callroute was down: posted from the parked state)",
    ["outcome"], registry=REGISTRY,
)
AMI_CONNECTED = Gauge("callroute_ami_connected", "1 while logged in to AMI", registry=REGISTRY)

# --- outbox / delivery -------------------------------------------------------------------
RECORDS = Counter(
    "callroute_records", "Call records by stage (enqueued, spooled, delivered, retry, dead, "
    "duplicate; deferred: an update waiting for its record still on its way)",
    ["stage"], registry=REGISTRY,
)
LEDGER_STEPS = Counter(
    "callroute_ledger_steps",
    "Delivery steps by how the ledger settled them (created, found: an earlier send's "
    "object found by its key, skipped: already in the ledger, reposted: sent again after a "
    "lost answer, trusting the CRM's idempotency, unconfirmed: held for a person)",
    ["outcome"], registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge("callroute_outbox_depth", "Records waiting for delivery", registry=REGISTRY)

# --- security (issue: protect the customers' data) ---------------------------------------
AUDIT_ENTRIES = Counter(
    "callroute_audit_entries", "Audit trail entries by where they were written",
    ["outcome"], registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "callroute_auth_failures", "Requests refused by the access check", ["status"],
    registry=REGISTRY,
)
