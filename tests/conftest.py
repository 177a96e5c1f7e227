"""Shared fixtures: a real Redis, the recorded Asterisk traffic; and the check that no
log line of the whole run shows a fixture's phone number or customer name unmasked."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from router import log
from tests.redis_server import RedisServer

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk-22"


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """A test that runs `callroute`'s `main()` configures the root logger as the console
    script would: undo that after every test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests get a flushed database each."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared test Redis, flushed before the test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may stop and start again."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def fixtures_dir() -> Path:
    """The recorded Asterisk 22.10.1 traffic (copied from shared/fixtures)."""
    return FIXTURES


#: The national significant numbers of the fixtures' callers (the sample CRM's seed, the
#: test CRMs, the recorded calls): any of them in a log line, in any format that keeps
#: the digits together (E.164, national, with a country code), is a leak.
FIXTURE_NUMBERS = (
    "13800138000", "13800138001", "13900139000", "13900139001", "13700137000",
    "13600136000", "13500135000", "13300133000", "18600990001", "18600980007",
    "4155550100", "2161234567", "2150501234",
)
#: Customers' names of the fixtures (full names: a first name alone may be a user name).
FIXTURE_NAMES = ("Li Lei", "Han Meimei", "Zhang Wei", "Sarah Connor", "Wang Fang",
                 "Alice Smith", "Alice Renamed", "Slow Case")


class LogTap(logging.Handler):
    """Every log record of the run, formatted by the project's own handler set-up."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        template = log.make_handler()
        self.filters = list(template.filters)
        self.setFormatter(template.formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is logging's own error
            self.lines.append(f"<unformattable record from {record.name}>")

    def leaks(self) -> list[str]:
        """The lines that show a fixture number or name."""
        return [line for line in self.lines
                if any(n in line for n in FIXTURE_NUMBERS)
                or any(name in line for name in FIXTURE_NAMES)]


@pytest.fixture(scope="session", autouse=True)
def log_tap() -> Iterator[LogTap]:
    """Masking on (as ``callroute`` runs by default) and every record of the whole run,
    DEBUG included, collected; at the end, no line may show a fixture's number or name."""
    log.install_masking()
    tap = LogTap()
    root = logging.getLogger()
    level = root.level
    root.addHandler(tap)
    root.setLevel(logging.DEBUG)
    logging.getLogger("tests.log_tap").debug("log tap attached")
    assert tap.lines, "no log line was collected: the tap is not attached"
    yield tap
    root.removeHandler(tap)
    root.setLevel(level)
    leaks = tap.leaks()
    assert not leaks, (f"{len(leaks)} of {len(tap.lines)} log lines show personal data "
                       "unmasked:\n" + "\n".join(leaks[:20]))
