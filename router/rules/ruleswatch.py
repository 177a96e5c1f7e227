"""Keeps the routing rules current while the service runs.

Telecom engineers edit the rules file in place. The watcher reloads it when its
modification time changes (checked every few seconds) or on SIGHUP. A file that no
longer validates is refused with a log line naming the rule and field, and the last
good rules stay in force: an editing mistake never takes routing down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from router.errors import ConfigError
from router.rules.decide import RuleSet, load_rules

log = logging.getLogger(__name__)

#: Told of every reload: ``(trigger, digest before, digest after, replaced)``; the
#: digests are SHA-256 of the rules file's bytes (the audit trail's before/after).
ReloadListener = Callable[[str, str, str, bool], None]


def summary(rules: RuleSet) -> str:
    """``4 rules, 5 agents, 1 schedules`` for log lines and ``callroute check``."""
    return f"{len(rules.rules)} rules, {len(rules.agents)} agents, {len(rules.schedules)} schedules"


class RulesWatcher:
    """The rules in force, reloaded from ``path`` when it changes."""

    def __init__(self, path: Path, *, default_queue: str = "support",
                 interval_s: float = 2.0) -> None:
        self.path = path
        self.default_queue = default_queue
        self.interval_s = interval_s
        #: SHA-256 of the rules file as loaded for the rules in force
        self.digest = ""
        self.listeners: list[ReloadListener] = []
        self._rules = self._load()  # at start-up an invalid file is fatal
        self._mtime = self._stat()
        self._task: asyncio.Task[None] | None = None

    def _load(self) -> RuleSet:
        try:
            digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            digest = ""
        rules = load_rules(self.path, default_queue=self.default_queue)
        self.digest = digest
        return rules

    def current(self) -> RuleSet:
        """The rules in force now."""
        return self._rules

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def reload(self, trigger: str = "signal") -> bool:
        """Load the file again; keep the old rules if it is invalid. True when replaced.
        ``trigger`` (signal, file-watch, api) is passed on to the listeners."""
        self._mtime = self._stat()
        before = self.digest
        try:
            rules = self._load()
        except ConfigError as exc:
            log.error("rules file rejected, keeping the previous rules: %s", exc)
            self._tell(trigger, before, before, False)
            return False
        self._rules = rules
        log.info("rules reloaded from %s (%s)", self.path, summary(rules))
        self._tell(trigger, before, self.digest, True)
        return True

    def _tell(self, trigger: str, before: str, after: str, replaced: bool) -> None:
        for listener in self.listeners:
            try:
                listener(trigger, before, after, replaced)
            except Exception:
                log.exception("a rules reload listener failed")

    def check(self) -> bool:
        """Reload when the file's modification time changed. True when replaced."""
        mtime = self._stat()
        if mtime is not None and mtime != self._mtime:
            return self.reload("file-watch")
        return False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()

    def start(self) -> None:
        """Start polling the file in the background."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
