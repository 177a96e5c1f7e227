"""On-disk spool for call records while Redis is unreachable.

One file per record, written atomically (write ``.tmp`` + fsync + rename + fsync of
the directory), so a crash leaves either the whole record or nothing. File names
start with a nanosecond timestamp and a sequence number, so :meth:`Spool.items`
returns records in the order they were spooled. The spool is bounded in record
count and bytes: when full, :meth:`Spool.put` raises :class:`OutboxError` instead of
filling the disk. Files that cannot be read back are moved to ``bad/`` (never
deleted) and logged.

The methods do blocking file I/O; async callers run them in a thread
(``asyncio.to_thread``) so the event loop never stalls on fsync.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.crypto import KeyRing, key_id_of
from router.errors import CryptoError, OutboxError

log = logging.getLogger(__name__)

SUFFIX = ".json"
#: What each encrypted spool file is bound to (its record key is inside it).
SPOOL_CONTEXT = "callroute-spool"
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class SpoolItem:
    """One spooled record: its file and decoded content."""

    path: Path
    record: dict[str, Any]


class Spool:
    """A bounded directory of records, one atomically written file each."""

    def __init__(self, directory: Path, *, max_records: int, max_bytes: int,
                 crypto: KeyRing | None = None) -> None:
        self.dir = directory
        #: encrypts each file at rest (router.crypto); off without a key
        self.crypto = crypto or KeyRing()
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._usage: list[int] | None = None  # [records, bytes], counted once then tracked

    def _ensure_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"spool directory {self.dir} unusable: {exc}") from exc

    def _files(self) -> list[Path]:
        try:
            return sorted(p for p in self.dir.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise OutboxError(f"cannot list spool {self.dir}: {exc}") from exc

    def files(self) -> list[Path]:
        """The spooled records' files, oldest first."""
        return self._files()

    def usage(self) -> tuple[int, int]:
        """(records, bytes) currently spooled (counted from disk once, then tracked)."""
        if self._usage is None:
            files = self._files()
            size = 0
            for path in files:
                try:
                    size += path.stat().st_size
                except OSError:
                    continue
            self._usage = [len(files), size]
        return self._usage[0], self._usage[1]

    def put(self, record_key: str, record: dict[str, Any]) -> Path:
        """Store one record durably; raise OutboxError if the spool is full or unwritable."""
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        data = self.crypto.seal(text, SPOOL_CONTEXT).encode()
        with self._lock:
            self._ensure_dir()
            count, size = self.usage()
            if count >= self.max_records or size + len(data) > self.max_bytes:
                raise OutboxError(
                    f"spool {self.dir} is full ({count} records, {size} bytes)"
                )
            digest = hashlib.sha256(record_key.encode()).hexdigest()[:16]
            name = f"{time.time_ns():020d}-{next(self._seq):08d}-{digest}"
            final = self.dir / f"{name}{SUFFIX}"
            tmp = self.dir / f"{name}{TMP_SUFFIX}"
            try:
                self._write_atomic(tmp, final, data)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise OutboxError(f"cannot write spool file {final}: {exc}") from exc
            if self._usage is not None:  # else reset meanwhile (a quarantine): recounted
                self._usage[0] += 1
                self._usage[1] += len(data)
        return final

    def _write_atomic(self, tmp: Path, final: Path, data: bytes) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def items(self, limit: int = 1000) -> list[SpoolItem]:
        """Up to ``limit`` spooled records, oldest first; unreadable files go to ``bad/``."""
        out: list[SpoolItem] = []
        for path in self._files():
            if len(out) >= limit:
                break
            try:
                record = self.read(path)
            except FileNotFoundError:
                continue  # drained meanwhile by another task
            except (OSError, ValueError, CryptoError) as exc:
                self.quarantine(path, exc)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("record_key"), str):
                self.quarantine(path, ValueError("not a record with a record_key"))
                continue
            out.append(SpoolItem(path, record))
        return out

    def read(self, path: Path) -> Any:
        """The decoded content of one spool file (decrypted when encrypted)."""
        return json.loads(self.crypto.open(path.read_bytes().decode(), SPOOL_CONTEXT))

    def rewrite(self, path: Path) -> bool:
        """Re-encrypt one file with the current key (``callroute keys rotate``); False
        when it was already under the current key or is gone."""
        with self._lock:
            try:
                raw = path.read_bytes().decode()
            except FileNotFoundError:
                return False
            if key_id_of(raw) == self.crypto.current:
                return False
            text = self.crypto.open(raw, SPOOL_CONTEXT)
            tmp = path.with_name(path.name.removesuffix(SUFFIX) + TMP_SUFFIX)
            data = self.crypto.seal(text, SPOOL_CONTEXT).encode()
            try:
                self._write_atomic(tmp, path, data)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise OutboxError(f"cannot rewrite spool file {path}: {exc}") from exc
            self._usage = None
            return True

    def quarantine(self, path: Path, exc: Exception) -> None:
        """Move an unreadable file to ``bad/`` (kept for a human), with an ERROR log."""
        bad = self.dir / "bad"
        self._usage = None
        log.error("spool file %s is unreadable (%s): moved to %s, NOT delivered", path, exc, bad)
        try:
            bad.mkdir(exist_ok=True)
            os.rename(path, bad / path.name)
        except OSError as err:
            log.error("cannot move %s to %s: %s", path, bad, err)

    def remove(self, path: Path) -> None:
        """Forget one record (after it reached Redis)."""
        with self._lock:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise OutboxError(f"cannot remove spool file {path}: {exc}") from exc
            if self._usage is not None:
                self._usage[0] = max(0, self._usage[0] - 1)
                self._usage[1] = max(0, self._usage[1] - size)

    def clean_tmp(self, older_than_s: float = 60.0) -> int:
        """Remove leftover ``.tmp`` files of writes interrupted by a crash."""
        removed = 0
        now = time.time()
        try:
            candidates = [p for p in self.dir.iterdir() if p.name.endswith(TMP_SUFFIX)]
        except OSError:
            return 0
        for path in candidates:
            try:
                if now - path.stat().st_mtime >= older_than_s:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed
