"""Every Redis key callroute uses, defined in this one place.

All keys start with the configured prefix (default ``callroute:``), so several
deployments can share one Redis and ``SCAN prefix*`` shows everything we own.
Phone numbers never appear in plaintext: customer keys carry a keyed hash
(HMAC-SHA256 with the configured secret) of the E.164 number.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from router.settings import Settings


@lru_cache(maxsize=8192)
def keyed_hash(secret: bytes, e164: str) -> str:
    """HMAC-SHA256 of ``e164`` under ``secret``, 32 hex digits (remembered: a number's
    hash is needed by every read and write of its cache entry)."""
    return hmac.new(secret, e164.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Keys:
    """Key builder for one deployment's prefix and hashing secret."""

    prefix: str = "callroute:"
    secret: bytes = b"callroute"

    def number_hash(self, e164: str) -> str:
        """Keyed hash of a phone number: stable across instances, useless without the secret."""
        return keyed_hash(self.secret, e164)

    # --- customer cache (issue: cache) -------------------------------------------------
    def customer(self, e164: str) -> str:
        """String: cached lookup answer (JSON envelope) for one number."""
        return self.customer_by_hash(self.number_hash(e164))

    def customer_by_hash(self, number_hash: str) -> str:
        """The :meth:`customer` key for an already hashed number (from the index)."""
        return f"{self.prefix}cust:{number_hash}"

    def customer_index(self, customer_id: str) -> str:
        """Set: hashed numbers cached for one CRM customer id (for webhook invalidation)."""
        return f"{self.prefix}custidx:{customer_id}"

    @property
    def cache_events(self) -> str:
        """Pub/sub channel (not a key: nothing stored): cache invalidations between
        instances (:mod:`router.lookup.cachefeed`)."""
        return f"{self.prefix}cache:events"

    @property
    def sync_cursor(self) -> str:
        """String: the ``updated_since`` cursor of the last completed sync page."""
        return f"{self.prefix}sync:cursor"

    @property
    def webhook_nonces(self) -> str:
        """Prefix for webhook replay protection (one key per seen signature, with TTL)."""
        return f"{self.prefix}webhook:seen:"

    # --- outbox (issue: call records) --------------------------------------------------
    @property
    def outbox_stream(self) -> str:
        """Stream: call records waiting for delivery (consumer group ``delivery``)."""
        return f"{self.prefix}outbox"

    @property
    def outbox_dead(self) -> str:
        """Stream: records that failed permanently, with the reason."""
        return f"{self.prefix}outbox:dead"

    def outbox_dedupe(self, record_key: str) -> str:
        """String with TTL: marks a record key already enqueued (one record per call)."""
        return f"{self.prefix}outbox:seen:{record_key}"

    def delivered(self, record_key: str) -> str:
        """String with TTL: marks a record key delivered to the CRM (a retry sends nothing)."""
        return f"{self.prefix}outbox:done:{record_key}"

    @property
    def outbox_retry(self) -> str:
        """Sorted set: records waiting for their next attempt (score = due time, epoch ms)."""
        return f"{self.prefix}outbox:retry"

    @property
    def outbox_sent(self) -> str:
        """Stream (capped): recently delivered records, kept for ``callroute outbox replay``."""
        return f"{self.prefix}outbox:sent"

    def outbox_step(self, record_key: str, step: str) -> str:
        """String with TTL: one step done at the CRM, as versions before the ledger marked
        it (read only, so a record they half-delivered keeps its steps done)."""
        return f"{self.prefix}outbox:step:{step}:{record_key}"

    def outbox_ledger(self, record_key: str) -> str:
        """Hash with TTL: what each step of a record created at the CRM (``<step>`` ->
        id and key) and which steps were sent without a known answer (``<step>:sent``)
        (:mod:`router.records.ledger`)."""
        return f"{self.prefix}outbox:ledger:{record_key}"

    def outbox_died(self, record_key: str) -> str:
        """String with TTL: the id of a record's entry in the dead letters (set when it
        was dead-lettered; stale once that entry left them, e.g. by ``outbox retry``).
        An update of the record waits for it while it is not dead (:mod:`router.records.
        updates`)."""
        return f"{self.prefix}outbox:died:{record_key}"

    # --- calls in progress across a restart (ami.parking) ---------------------------------
    def parked_calls(self, scope: str) -> str:
        """Hash with TTL: Linkedid -> (encrypted JSON) the saved state of a call in progress
        on the Asterisk ``scope`` (its AMI address), checkpointed as it goes and parked at
        shutdown, removed once its record is stored; the next start picks the call up
        again or, when it ended meanwhile, posts the record from it."""
        return f"{self.prefix}parked:{scope}"

    def parked_alive(self, scope: str) -> str:
        """String with TTL: epoch seconds when an instance following the Asterisk ``scope``
        last saved its calls (every second while it runs, once the calls an earlier run
        left are decided): a parked call that ended while nobody followed it was up until
        at least then."""
        return f"{self.prefix}parked-alive:{scope}"

    def ratelimit(self, crm: str) -> str:
        """Key for the client-side rate limit towards one CRM."""
        return f"{self.prefix}ratelimit:{crm}"

    # --- users, audit trail (issue: security) ------------------------------------------
    @property
    def users(self) -> str:
        """Hash: user name -> JSON of the user (role, agent id, scrypt hash of its token)."""
        return f"{self.prefix}users"

    @property
    def users_version(self) -> str:
        """String (counter): bumped on every change of :attr:`users`; instances poll it."""
        return f"{self.prefix}users:version"

    @property
    def audit(self) -> str:
        """Stream: the append-only audit trail (trimmed by MINID to the retention)."""
        return f"{self.prefix}audit"

    # --- screen pop and supervisor view (issue: web) -----------------------------------
    def web_hold(self, record_key: str) -> str:
        """String (JSON): a finished call's record waiting for the agent's disposition."""
        return f"{self.prefix}web:hold:{record_key}"

    def web_disposition(self, record_key: str, agent: str) -> str:
        """String (JSON) with TTL: ``agent``'s disposition of a call given before the
        call's record was held or sent (one per agent: the record takes the one of the
        agent who answered it, whatever another agent rung gave)."""
        return f"{self.prefix}web:disp:{record_key}:{agent}"

    def web_release(self, record_key: str) -> str:
        """String with TTL: held by the one instance sending a call's record out of the
        wrap-up (a held record's release, a disposition put on it), so the record goes
        once and a disposition given meanwhile is seen to be in it or not."""
        return f"{self.prefix}web:release:{record_key}"

    @property
    def web_holds(self) -> str:
        """Sorted set: record keys held for a disposition (score = release time, epoch ms)."""
        return f"{self.prefix}web:holds"

    def web_online(self, agent: str) -> str:
        """String with TTL: an agent's page is connected to some instance."""
        return f"{self.prefix}web:online:{agent}"

    def web_recent(self, subject: str) -> str:
        """List (newest first, capped): summaries of the last calls of one customer id (or
        of one keyed number hash for callers the CRM does not know)."""
        return f"{self.prefix}web:recent:{subject}"

    def web_day(self, day: str) -> str:
        """Hash of counters for one day (``YYYY-MM-DD``): the supervisor's charts."""
        return f"{self.prefix}web:day:{day}"

    def web_day_calls(self, day: str) -> str:
        """List: one JSON row per call of one day, for the CSV export."""
        return f"{self.prefix}web:calls:{day}"

    def web_sent(self, record_key: str) -> str:
        """String (encrypted JSON) with TTL ``web.late_disposition_s``: an answered call's
        record sent without a disposition, kept for one given later (an update)."""
        return f"{self.prefix}web:sent:{record_key}"

    def web_day_dispositions(self, day: str) -> str:
        """Hash: linkedid -> (encrypted JSON) disposition given after the call's row was
        filed, for the CSV export."""
        return f"{self.prefix}web:late:{day}"

    def web_todo(self, agent: str) -> str:
        """Sorted set: record keys of one agent's answered calls that may still get a
        disposition (score = the call's end, epoch s), the agent's "awaiting a
        disposition" list (:mod:`router.web.pending`)."""
        return f"{self.prefix}web:todo:{agent}"

    def web_todo_rows(self, agent: str) -> str:
        """Hash: record key -> (encrypted JSON) the row of :meth:`web_todo`'s call that the
        agent's list shows."""
        return f"{self.prefix}web:todo-rows:{agent}"

    # --- CRM credentials (router.crm.auth) ----------------------------------------------
    def crm_token(self, crm: str) -> str:
        """String with TTL: the CRM's OAuth2 access token, shared by every instance."""
        return f"{self.prefix}crm:token:{crm}"

    def crm_token_lock(self, crm: str) -> str:
        """String with TTL: held by the one instance refreshing the CRM's token."""
        return f"{self.prefix}crm:token-lock:{crm}"

    def crm_refresh_token(self, crm: str) -> str:
        """String: the newest refresh token, when the CRM rotates them."""
        return f"{self.prefix}crm:refresh-token:{crm}"


def keys_from_settings(settings: Settings) -> Keys:
    """The key builder of a deployment: its prefix and its number-hashing secret."""
    return Keys(prefix=settings.redis.prefix,
                secret=settings.redis.key_secret.get_secret_value().encode())
