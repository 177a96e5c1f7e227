"""Every exception callroute raises, in one hierarchy.

Each class says what went wrong and what to do about it. Library errors (aiohttp,
redis, pydantic, yaml) are translated at the boundary with ``raise ... from exc`` so
callers only ever catch these::

    CallrouteError
    ├── ConfigError              a config or rules file is invalid: fix the file it names
    │   └── ListenError          a listening address of the config cannot be bound (in use)
    ├── ProtocolError            a peer broke its protocol
    │   ├── AgiProtocolError     a FastAGI session misbehaved: the call gets the safe route
    │   │   └── AgiHangup        the channel hung up (HANGUP line, 511, EOF): stop sending
    │   └── AmiProtocolError     an AMI message was malformed or too large: it is skipped
    ├── AmiError                 the AMI connection failed (refused, login rejected)
    ├── CrmError                 the CRM did not give a usable answer  (.kind, .retryable)
    │   ├── CrmTimeout           no answer within the per-request timeout
    │   ├── CrmUnavailable       connection refused, dropped or DNS failure
    │   ├── CrmHttpError         an HTTP error status (.status, .detail: the CRM's words)
    │   │   ├── CrmClientError   4xx: credentials, URL or payload are wrong; not retried
    │   │   ├── CrmRedirected    3xx: not followed (credentials would go along); fix the URL
    │   │   ├── CrmRateLimited   429: slow down; honour .retry_after
    │   │   └── CrmServerError   5xx: the CRM is failing; retried
    │   ├── CrmBadResponse       the body is not the JSON that was promised
    │   ├── CrmMappingError      the JSON does not fit the configured field mapping
    │   ├── CircuitOpen          too many recent failures: the CRM is not asked for a while
    │   └── CrmUnconfirmed       a create's answer was lost and nothing can confirm it
    ├── WebhookError             an inbound webhook is refused (.status, .outcome)
    ├── CacheError               Redis is unreachable or answered garbage: served without it
    └── OutboxError              a call record could not be stored durably anywhere
"""

from __future__ import annotations

import errno


class CallrouteError(Exception):
    """Base class of every error callroute raises on purpose."""


class ConfigError(CallrouteError):
    """A configuration or rules file is invalid.

    ``location`` names where (file, rule, field) so the user can fix it.
    """

    def __init__(self, message: str, *, location: str | None = None) -> None:
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)


class ListenError(ConfigError):
    """A listening address the config names cannot be bound: the port is in use, or not
    ours to take. The message names the address and the setting to change."""

    def __init__(self, setting: str, host: str, port: int, reason: str) -> None:
        self.setting = setting
        self.host = host
        self.port = port
        super().__init__(f"cannot listen on {host}:{port} ({setting}): {reason}")

    @classmethod
    def from_os_error(cls, exc: OSError, setting: str, host: str, port: int,
                      *, fix: str | None = None) -> ListenError:
        """Translate the ``OSError`` of a bind into one line saying what to do; ``fix`` says
        what to change (default: ``<setting> in the config``)."""
        fix = fix or f"{setting} in the config"
        if exc.errno == errno.EADDRINUSE:
            reason = (f"the port is already in use (another callroute? `ss -ltnp` shows "
                      f"which program): change {fix}, or stop that program")
        elif exc.errno == errno.EACCES:
            reason = f"permission denied (ports below 1024 need privileges): change {fix}"
        elif exc.errno == errno.EADDRNOTAVAIL:
            reason = f"no such address on this machine: change {fix}"
        else:
            reason = f"{exc.strerror or exc}: change {fix}"
        return cls(setting, host, port, reason)


class ProtocolError(CallrouteError):
    """A peer (Asterisk over AGI or AMI) sent something the protocol does not allow."""


class AgiProtocolError(ProtocolError):
    """A FastAGI session was broken: too large, too slow, malformed, or closed early."""


class AgiHangup(AgiProtocolError):
    """The channel hung up: Asterisk sent ``HANGUP``, replied ``511``, or closed the socket."""


class AmiProtocolError(ProtocolError):
    """An AMI message was malformed or over the size limit; it is counted and skipped."""


class AmiError(CallrouteError):
    """The AMI connection could not be made or kept (refused, login rejected, lost)."""


class CrmError(CallrouteError):
    """The CRM did not give a usable answer.

    ``kind`` is a short stable label for logs and metrics; ``retryable`` says whether
    the same request may succeed later; ``may_have_acted`` whether the CRM may have
    carried the request out even so (a lost answer: timeout, dropped connection, 5xx,
    an unreadable 2xx), which a create must not simply repeat.
    """

    kind = "error"
    retryable = True
    may_have_acted = True


class CrmTimeout(CrmError):
    """The CRM did not answer within the per-request timeout."""

    kind = "timeout"


class CrmUnavailable(CrmError):
    """The CRM could not be reached: connection refused, dropped, or name not resolved."""

    kind = "unavailable"


class CrmHttpError(CrmError):
    """The CRM answered with an HTTP error status.

    ``detail`` is what the CRM said (its error body, compacted, truncated, secrets and
    personal data masked), already part of the message; empty when it said nothing.
    """

    kind = "http"

    def __init__(self, message: str, *, status: int, detail: str = "") -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{message}: {detail}" if detail else message)


class CrmClientError(CrmHttpError):
    """4xx other than 404/429: the request is wrong (credentials, URL, payload). Not retried."""

    kind = "4xx"
    retryable = False
    may_have_acted = False


class CrmRedirected(CrmHttpError):
    """3xx: the CRM sent the request elsewhere (``location``, without its query). A
    redirect is never followed: the credentials (an API key header, a token) would go
    along to that host, and a POST replayed as a GET loses its body. The configured
    address is wrong (http for https, an old domain, a login page): fix the URL. Not
    retried."""

    kind = "redirect"
    retryable = False
    may_have_acted = False

    def __init__(self, message: str, *, status: int, location: str = "") -> None:
        self.location = location
        super().__init__(message, status=status)


class CrmRateLimited(CrmHttpError):
    """429 Too Many Requests: wait ``retry_after`` seconds (None when not given)."""

    kind = "429"
    may_have_acted = False

    def __init__(
        self, message: str, *, status: int = 429, retry_after: float | None = None,
        detail: str = "",
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status, detail=detail)


class CrmServerError(CrmHttpError):
    """5xx: the CRM is failing on its side; the request is retried later."""

    kind = "5xx"


class CrmBadResponse(CrmError):
    """The CRM's body is not valid JSON (or not the JSON shape that was promised)."""

    kind = "bad_json"
    retryable = False


class CrmMappingError(CrmError):
    """The CRM's JSON does not fit the configured field mapping: fix the mapping."""

    kind = "mapping"
    retryable = False


class CircuitOpen(CrmError):
    """The circuit breaker is open after repeated failures; the CRM is not being asked."""

    kind = "circuit_open"
    may_have_acted = False


class CrmUnconfirmed(CrmError):
    """A create was sent, its answer was lost, and neither the CRM's idempotency nor a
    configured find-by-key can tell whether it was made: sending again could duplicate
    it, so the record waits for a person (``outbox replay --force`` once checked)."""

    kind = "unconfirmed"
    retryable = False


class WebhookError(CallrouteError):
    """An inbound webhook is refused: ``status`` is the HTTP answer (400 wrong shape,
    401 signature, 409 replay, 413 too large, 503 not configured or Redis down) and
    ``outcome`` the short label of ``callroute_webhooks{outcome}``."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        self.status = status
        self.outcome = outcome
        super().__init__(message)


class CacheError(CallrouteError):
    """Redis is unreachable, slow, or returned a value that cannot be read."""


class OutboxError(CallrouteError):
    """A call record could be stored neither in Redis nor in the on-disk spool."""


class AuthError(CallrouteError):
    """A user or token operation was refused (unknown user, bad role, store unreadable)."""


class CryptoError(CallrouteError):
    """A value encrypted at rest cannot be read: unknown key id, or it was altered."""
