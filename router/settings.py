"""Typed settings, loaded from one YAML file (``callroute --config FILE``).

Each section is a pydantic model with defaults, so a minimal file works; only
``crm.base_url`` (where the CRM is) must be given. String values may use ``${VAR}``
or ``${VAR:-default}`` to take secrets from the environment: an unset ``${VAR}``
with no default is an error naming the variable and the field (``${VAR:-}`` says
"empty is fine"). Every secret (see :data:`SECRET_FIELDS`) may be read from a file
with ``<name>_file: PATH`` instead; secrets are ``SecretStr`` (shown as
``**********`` wherever settings are printed or logged). Paths (the rules file, the
spool directory) are relative to the config file. Every error is a
:class:`~router.errors.ConfigError` naming the file and the field.

Without ``--config`` the command line takes ``./config.yaml`` when there is one,
else the example config packaged with callroute (:func:`default_config`).
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from router.crm.config import SAMPLE_CRM_URL, CrmSettings
from router.errors import ConfigError
from router.models import ZoneName
from router.phone import DEFAULT_INTERNAL, valid_region


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PhoneSettings(_Section):
    """How caller numbers are read."""

    default_region: str = "CN"
    internal_pattern: str = DEFAULT_INTERNAL

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not valid_region(value):
            raise ValueError(f"unknown region {value!r} (use an ISO 3166 code such as CN, US)")
        return value.upper()

    @field_validator("internal_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class AgiSettings(_Section):
    """The FastAGI server."""

    host: str = "127.0.0.1"
    port: int = Field(4573, ge=0, le=65535)
    max_sessions: int = Field(512, ge=1)
    env_timeout_s: float = Field(2.0, gt=0, description="deadline to read the agi_* environment")
    command_timeout_s: float = Field(2.0, gt=0, description="deadline for each command's reply")
    session_timeout_s: float = Field(
        5.0, gt=0, le=300,
        description="deadline for a whole session, from accept to close (environment, "
        "decision and every command): a peer that stops answering frees its slot then",
    )
    max_env_bytes: int = Field(16384, ge=1024)
    max_line_bytes: int = Field(4096, ge=256)
    max_env_lines: int = Field(128, ge=16)
    shutdown_grace_s: float = Field(10.0, ge=0)


class AmiSettings(_Section):
    """The Asterisk Manager Interface connection."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(5038, ge=0, le=65535)
    username: str = "callroute"
    secret: SecretStr = SecretStr("")
    connect_timeout_s: float = Field(5.0, gt=0)
    reconnect_min_s: float = Field(0.5, gt=0)
    reconnect_max_s: float = Field(30.0, gt=0)
    ping_interval_s: float = Field(20.0, gt=0)
    max_message_bytes: int = Field(65536, ge=1024)
    max_line_bytes: int = Field(8192, ge=256, description="longest header line accepted")
    action_timeout_s: float = Field(5.0, gt=0, description="deadline for an action's response")
    cdr_grace_s: float = Field(
        2.0, ge=0, description="after a call's last hangup, wait this long for its Cdr events"
    )
    max_open_calls: int = Field(10_000, ge=1, description="bound on calls tracked at once")
    cdr_timezone: ZoneName | None = Field(
        None, description="zone of the Cdr times Asterisk writes; normally unset: each call's "
        "times are dated by its Uniqueid and the server's offset (AMI), this is only the "
        "fallback for calls that carry neither",
    )


class RedisSettings(_Section):
    """The shared Redis (cache and outbox)."""

    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "callroute:"
    key_secret: SecretStr = Field(
        SecretStr("change-me"), description="HMAC secret for hashing numbers in keys")
    socket_timeout_s: float = Field(0.05, gt=0)
    connect_timeout_s: float = Field(0.2, gt=0)
    down_backoff_s: float = Field(
        1.0, ge=0, description="after a Redis failure, skip Redis this long, then probe again"
    )
    max_connections: int = Field(32, ge=1, description="connection pool bound of the cache")

    @field_validator("key_secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("is empty: numbers in Redis keys are hashed with it (HMAC); "
                             "set a long random string, e.g. ${CALLROUTE_KEY_SECRET}")
        return value


class CacheSettings(_Section):
    """The two-level customer cache."""

    lru_size: int = Field(50_000, ge=0)
    positive_ttl_s: float = Field(900.0, gt=0)
    negative_ttl_s: float = Field(120.0, gt=0)
    stale_max_age_s: float = Field(
        86_400.0, ge=0, description="how long past its TTL an entry may still be served"
    )
    lru_recheck_s: float = Field(
        5.0, ge=0, description="trust an in-process entry this long before re-reading Redis, "
        "while the invalidation feed is down"
    )
    lru_trust_s: float = Field(
        60.0, ge=0, description="trust an in-process entry this long before re-reading Redis, "
        "while the invalidation feed (Redis pub/sub) is up"
    )
    max_background: int = Field(
        1000, ge=1, description="bound on CRM lookups running in the background"
    )
    max_crm_inflight: int = Field(
        32, ge=1, description="CRM lookup requests on the wire at once (others queue)"
    )
    sync_interval_s: float = Field(
        0.0, ge=0, description="pre-warm sync period for serve (0: off)"
    )


class BreakerSettings(_Section):
    """The circuit breaker in front of the CRM."""

    failures: int = Field(5, ge=1, description="consecutive failures that open it")
    cooldown_s: float = Field(10.0, gt=0)


class RoutingSettings(_Section):
    """Routing rules and the decision deadline."""

    rules: Path = Path("rules.yaml")
    deadline_ms: int = Field(300, ge=10, le=10_000)
    apply_reserve_ms: int = Field(
        25, ge=0, le=1000,
        description="part of the deadline kept for writing the variables to Asterisk",
    )
    default_queue: str = "support"
    queues: list[str] = Field(
        default_factory=list,
        description="the Asterisk queues that exist (optional): when listed, a rule or "
        "default_queue naming any other is an error (callroute check --asterisk asks "
        "Asterisk itself)",
    )
    timezone: ZoneName | None = Field(
        None, description="time zone of a time given without an offset (explain --at); "
        "default: the time zone of the rules' schedules",
    )

    @model_validator(mode="after")
    def _default_listed(self) -> RoutingSettings:
        if self.queues and self.default_queue not in self.queues:
            raise ValueError(f"default_queue {self.default_queue!r} is not in routing.queues "
                             f"({', '.join(self.queues)})")
        return self


class OutboxSettings(_Section):
    """Durable delivery of call records."""

    enabled: bool = True
    spool_dir: Path = Path("var/spool")
    max_attempts: int = Field(12, ge=1)
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    rate_per_s: float = Field(20.0, gt=0, description="client-side rate limit per CRM")
    claim_idle_s: float = Field(60.0, gt=0, description="reclaim entries idle this long")
    group: str = Field("delivery", min_length=1, description="consumer group of the workers")
    concurrency: int = Field(16, ge=1, le=1024, description="records in flight per worker")
    poll_interval_s: float = Field(0.2, gt=0, le=10, description="XREADGROUP block time")
    rate_burst: float = Field(10.0, ge=1, description="token bucket size of the rate limit")
    rate_shared: bool = Field(True, description="share the rate limit across instances (Redis)")
    dedupe_ttl_s: float = Field(7 * 86_400.0, gt=0, description="how long a key stays enqueued")
    delivered_ttl_s: float = Field(7 * 86_400.0, gt=0, description="delivered markers' life")
    sent_keep: int = Field(10_000, ge=0, description="delivered records kept for replay")
    spool_max_records: int = Field(100_000, ge=1)
    spool_max_bytes: int = Field(512 * 1024 * 1024, ge=4096)
    spool_drain_interval_s: float = Field(1.0, gt=0)
    max_record_bytes: int = Field(256 * 1024, ge=1024)
    redis_timeout_s: float = Field(2.0, gt=0, description="outbox Redis socket timeout")
    create_leads: bool = Field(
        True, description="an unknown caller with a number becomes a lead (never a rejected one)")
    create_tasks: bool = Field(
        True, description="a call nobody answered becomes a call-back task (callers with a number)")
    task_outcomes: list[str] = Field(
        default_factory=lambda: ["missed", "abandoned", "voicemail", "busy", "failed"],
        description="record outcomes that get a follow-up task (every call nobody took but "
                    "a rejected one)",
    )


class RecordingsSettings(_Section):
    """Links to call recordings, served by the admin API (``GET /recordings/<file>``)."""

    dir: Path | None = Field(
        None, description="where Asterisk writes the recordings (MixMonitor), as this host "
        "sees it; unset: records carry no recording link from callroute (nor when "
        "crm.recordings uploads or links them its own way)",
    )
    url: str = Field(
        "", description="the link's base, as the CRM's users reach the admin API, e.g. "
        "https://pbx.example.com:8074/recordings (default: http://<admin host:port>/recordings)",
    )
    key: SecretStr = Field(
        SecretStr(""), description="HMAC key signing the links (default: redis.key_secret)")


class AdminSettings(_Section):
    """The admin HTTP API (health, metrics, webhook, outbox)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8074, ge=0, le=65535)
    token: SecretStr = Field(
        SecretStr(""), description="bearer token of user admin on the admin API; left out: "
        "none (written but empty is an error: an unset variable?)")
    webhook_secret: SecretStr = SecretStr("")
    webhook_tolerance_s: float = Field(300.0, gt=0)
    webhook_max_bytes: int = Field(262_144, ge=1024, description="largest webhook body")
    tls_cert: Path | None = Field(None, description="PEM certificate: serve over TLS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")

    @model_validator(mode="after")
    def _tls_pair(self) -> AdminSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("admin.tls_cert and admin.tls_key go together")
        return self

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr) -> SecretStr:
        # runs only when the setting is written (a default is not validated)
        if not value.get_secret_value().strip():
            raise ValueError("is empty (an unset variable?): set a token, or leave the "
                             "setting out for none")
        return value


class AuthSettings(_Section):
    """Users and sign-in (router.auth): where users are kept, how sessions are signed."""

    users_file: Path | None = Field(
        None, description="keep users in this JSON file instead of Redis")
    session_secret: SecretStr = Field(
        SecretStr(""), description="HMAC key of sign-in cookies; empty: random per process")
    session_ttl_s: float = Field(12 * 3600.0, gt=0, le=7 * 86400)
    refresh_s: float = Field(
        2.0, gt=0, le=300, description="how often the users are re-read from their store")


class Disposition(_Section):
    """A reason code an agent can give a finished call, with its label per language."""

    code: str = Field(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    en: str = Field(min_length=1, max_length=60)
    zh: str = Field(min_length=1, max_length=60)


def _default_dispositions() -> list[Disposition]:
    return [Disposition(code="resolved", en="Resolved", zh="已解决"),
            Disposition(code="follow-up", en="Needs follow-up", zh="需要跟进"),
            Disposition(code="sale", en="Sale", zh="成交"),
            Disposition(code="complaint", en="Complaint", zh="投诉"),
            Disposition(code="wrong-number", en="Wrong number", zh="打错电话")]


class WebSettings(_Section):
    """The agent's screen pop and the supervisor's live view (served by the admin API;
    users and sign-in are the ``auth`` section's)."""

    enabled: bool = True
    crm_url: str = Field("", description="link to a customer in the CRM, e.g. "
                         "https://crm.example.com/contacts/{id}")
    dispositions: list[Disposition] = Field(default_factory=_default_dispositions)
    wrapup_s: float = Field(
        120.0, ge=0, le=3600, description="how long an answered call's record waits for the "
        "agent's disposition before it is sent without one (0: never wait)")
    late_disposition_s: float = Field(
        86400.0, ge=0, le=30 * 86400, description="how long after an answered call its agent "
        "may still give a disposition once the record was sent: it updates the CRM's activity "
        "(needs an `update` request on the crm.records call step; 0: refused)")
    last_calls: int = Field(5, ge=0, le=20, description="earlier calls shown on the card")
    history_days: int = Field(8, ge=1, le=400, description="days of figures kept in Redis")
    timezone: ZoneName = Field("UTC", description="the day of the supervisor's daily figures")
    language: Literal["en", "zh"] = "zh"
    alert_success_rate: float = Field(0.99, ge=0, le=1)
    alert_window_s: float = Field(900.0, gt=0)
    alert_oldest_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _unique(self) -> WebSettings:
        codes = [d.code for d in self.dispositions]
        if len(set(codes)) != len(codes):
            raise ValueError("web.dispositions: codes must be unique")
        return self


class AuditSettings(_Section):
    """The audit trail (router.audit): who changed or read what, kept in a Redis Stream."""

    retention_days: float = Field(180.0, gt=0, description="entries older are trimmed")
    file: Path | None = Field(
        None, description="also append each entry to this JSON-lines file (for a SIEM)")


class EncryptionSettings(_Section):
    """Encryption at rest (router.crypto): on when a key is given, off otherwise."""

    keys: SecretStr = Field(
        SecretStr(""), description="<id>:<base64 32 bytes>, comma or line separated, the "
        "current (writing) key first; usually ${CALLROUTE_KEYS} or keys_file")

    @field_validator("keys")
    @classmethod
    def _parse(cls, value: SecretStr) -> SecretStr:
        from router.crypto import KeyRing

        try:
            KeyRing.parse(value.get_secret_value())
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value


class Settings(_Section):
    """The whole configuration file."""

    phone: PhoneSettings = Field(default_factory=PhoneSettings)
    agi: AgiSettings = Field(default_factory=AgiSettings)
    ami: AmiSettings = Field(default_factory=AmiSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    crm: CrmSettings = Field(default_factory=CrmSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    recordings: RecordingsSettings = Field(default_factory=RecordingsSettings)
    log_level: str = "INFO"
    log_personal_data: bool = Field(
        False, description="debugging only: log phone numbers and names unmasked")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="auto: uvloop when installed, else asyncio's own loop"
    )
    #: Directory of the config file; relative paths are resolved against it.
    base_dir: Path = Field(default=Path("."), exclude=True)

    def path(self, value: Path) -> Path:
        """``value`` resolved against the config file's directory."""
        return value if value.is_absolute() else self.base_dir / value

    @model_validator(mode="after")
    def _session_outlives_decision(self) -> Settings:
        if self.agi.session_timeout_s * 1000 <= self.routing.deadline_ms:
            raise ValueError(
                f"agi.session_timeout_s ({self.agi.session_timeout_s:g} s) must be longer "
                f"than routing.deadline_ms ({self.routing.deadline_ms} ms)")
        return self


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}")


def expand_env(value: Any, where: str = "", problems: dict[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a YAML tree.

    ``${VAR:-default}`` takes the default when VAR is unset or empty (as the shell
    does). ``${VAR}`` with VAR unset is a problem naming the variable and ``where`` it is
    (the dotted field path): put in ``problems`` (field path -> message) when given, and
    replaced by "", else raised as a :class:`ConfigError`."""
    if isinstance(value, str):
        return _ENV.sub(lambda m: _variable(m, where, problems), value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k), problems)
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _variable(match: re.Match[str], where: str, problems: dict[str, str] | None) -> str:
    name, has_default, default = match.group(1), match.group(2), match.group(3)
    value = os.environ.get(name)
    if has_default is not None:
        return value if value else default
    if value is None:
        problem = (f"{where or '(top level)'}: ${{{name}}} is not set in the environment "
                   f"(set it, or give a default: ${{{name}:-value}})")
        if problems is None:
            raise ConfigError(problem)
        problems[where] = problem
        return ""
    return value


#: Settings that hold secrets: each may instead be given as ``<name>_file: PATH`` (the
#: file's content, without its trailing newline; relative to the config file), the way
#: container secrets are mounted. They are ``SecretStr``: printed as ``**********``.
SECRET_FIELDS = frozenset({"secret", "key_secret", "token", "webhook_secret",
                           "session_secret", "key", "password", "keys",
                           "client_secret", "refresh_token"})
#: Mappings whose every value is a secret (``crm.secrets``): any ``<name>_file`` in them.
SECRET_MAPS = frozenset({"crm.secrets"})


def read_secret_files(value: Any, base_dir: Path, where: str = "") -> Any:
    """Replace every ``<secret>_file: PATH`` of a YAML tree by ``<secret>: <content>``
    (ConfigError naming the field when the file is unreadable or both are given)."""
    if isinstance(value, list):
        return [read_secret_files(v, base_dir, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out: dict[Any, Any] = {}
    for key, item in value.items():
        name = str(key)
        field = f"{where}.{name}" if where else name
        base = name.removesuffix("_file")
        if name.endswith("_file") and (base in SECRET_FIELDS or where in SECRET_MAPS) \
                and isinstance(item, str):
            if base in value:
                raise ConfigError(f"give {base} or {name}, not both", location=field)
            path = Path(item) if Path(item).is_absolute() else base_dir / item
            try:
                out[base] = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read the secret file {path}: {exc}",
                                  location=field) from exc
        else:
            out[key] = read_secret_files(item, base_dir, field)
    return out


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, translating I/O and syntax errors into ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", location=str(path)) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"not valid YAML: {exc}", location=where) from exc


def validation_message(exc: ValidationError, skip: set[str] | None = None) -> str:
    """One line per problem: ``field.path: message`` (none for the paths in ``skip``)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if skip and loc in skip:
            continue
        lines.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


#: The host names that stand for "yours" in the presets of CRMs each customer runs at an
#: address of their own (``yourcompany.odoo.com``, ``crm.example.com``): not an address.
_PLACEHOLDER_HOST = re.compile(r"(^|\.)example\.(com|org|net)$|^yourcompany\.")


def _crm_address_missing(crm: Any) -> str | None:
    """The field to name when the config does not say where the CRM is (no ``crm:``
    section, or no ``base_url`` in it nor a ``preset`` to take one from), else None."""
    if not isinstance(crm, dict):
        return "crm"
    return None if crm.get("base_url") or crm.get("preset") else "crm.base_url"


def _preset_address_missing(raw: Any, crm: CrmSettings) -> bool:
    """True when the address came from a preset (none in the config) and is only the
    preset's placeholder: HubSpot's preset has the one address of its API, Odoo's
    ``yourcompany.odoo.com`` stands for yours."""
    if not isinstance(raw, dict) or raw.get("base_url") or not crm.preset:
        return False
    host = urlsplit(crm.base_url).hostname or ""
    return not host or bool(_PLACEHOLDER_HOST.search(host))


def load_settings(path: str | Path) -> Settings:
    """Load and validate the config file at ``path``; every problem found is in the one
    :class:`ConfigError` raised (``; `` between them)."""
    file = Path(path)
    data = read_yaml(file) or {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", location=str(file))
    problems: list[str] = []

    def missing(field: str) -> None:
        problems.append(
            f"{field}: missing: say where the CRM's REST API is (crm.base_url, e.g. "
            "https://crm.example.com; examples/crm-*.yaml show real CRMs, and "
            f"`callroute sample-crm` serves a sample one at {SAMPLE_CRM_URL})")

    field = _crm_address_missing(data.get("crm"))
    if field is not None:
        missing(field)
    unset: dict[str, str] = {}
    expanded = expand_env(data, problems=unset)
    problems += unset.values()
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(read_secret_files(expanded, file.resolve().parent))
    except ConfigError as exc:  # a secret file that cannot be read
        problems.append(str(exc))
    except ValidationError as exc:
        # a field whose variable is unset is reported once, for that
        message = validation_message(exc, skip=set(unset))
        if message:
            problems.append(message)
    if settings is not None and _preset_address_missing(data.get("crm"), settings.crm):
        missing("crm.base_url")
    if problems or settings is None:
        raise ConfigError("; ".join(problems), location=str(file))
    settings.base_dir = file.resolve().parent
    return settings


#: Where the files packaged with callroute live, by name: in an installed wheel they are
#: inside the package (router/_data/<package>, see pyproject.toml); in a source checkout
#: (and an editable install), at the repository's root.
_DATA = {"examples": "examples", "asterisk-conf": "asterisk_conf"}


def data_dir(name: Literal["examples", "asterisk-conf"]) -> Path:
    """The directory of the example files (``examples``: config, rules, CRM examples) or of
    the Asterisk snippets (``asterisk-conf``) that come with callroute."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / _DATA[name], here.parent / name):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"the {name} files packaged with callroute are missing: reinstall it")


#: The ``--config`` help of every command (none of them defaults to a path of its own).
CONFIG_HELP = ("config file (default: ./config.yaml if there is one, else the example config "
               "that comes with callroute)")


def config_option(parser: argparse.ArgumentParser) -> None:
    """``--config/-c FILE`` as every command takes it."""
    parser.add_argument("--config", "-c", default=None, metavar="FILE", help=CONFIG_HELP)


def cli_time(text: str) -> datetime:
    """An ISO 8601 time given on the command line (argparse's error when it is not one).
    Without a UTC offset it stays naive: the command says which zone it reads it in."""
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc


def cli_local_time(text: str) -> datetime:
    """:func:`cli_time`, a time without a UTC offset read in this machine's zone."""
    value = cli_time(text)
    return value if value.tzinfo else value.astimezone()


def default_config() -> Path:
    """The config file used without ``--config``: ``./config.yaml`` when it exists, else the
    example config packaged with callroute (what ``callroute demo`` runs)."""
    local = Path("config.yaml")
    return local if local.is_file() else data_dir("examples") / "config.yaml"
