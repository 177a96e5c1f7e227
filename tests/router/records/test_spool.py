"""The on-disk spool: atomic files, order, bounds, restart, unreadable files."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.errors import OutboxError
from router.records.spool import Spool


def test_records_survive_a_restart_in_order(tmp_path: Path) -> None:
    """Records put by one Spool are read back, oldest first, by a new Spool on the same
    directory (a restarted process), and removal updates the usage."""
    first = Spool(tmp_path, max_records=100, max_bytes=1_000_000)
    for n in range(5):
        first.put(f"k{n}", {"record_key": f"k{n}", "n": n})
    again = Spool(tmp_path, max_records=100, max_bytes=1_000_000)
    items = again.items()
    assert [i.record["record_key"] for i in items] == [f"k{n}" for n in range(5)]
    assert again.usage()[0] == 5
    again.remove(items[0].path)
    assert again.usage()[0] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_full_spool_refuses_with_outbox_error(tmp_path: Path) -> None:
    """Beyond max_records (or max_bytes) put raises OutboxError instead of filling the disk."""
    spool = Spool(tmp_path, max_records=2, max_bytes=1_000_000)
    spool.put("a", {"record_key": "a"})
    spool.put("b", {"record_key": "b"})
    with pytest.raises(OutboxError, match="full"):
        spool.put("c", {"record_key": "c"})
    small = Spool(tmp_path / "small", max_records=100, max_bytes=4096)
    with pytest.raises(OutboxError, match="full"):
        small.put("big", {"record_key": "big", "pad": "x" * 5000})


def test_unwritable_directory_raises_outbox_error(tmp_path: Path) -> None:
    """A spool path that cannot be a directory gives OutboxError, not OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutboxError):
        Spool(blocker / "spool", max_records=10, max_bytes=100_000).put("a", {"record_key": "a"})


def test_unreadable_file_is_quarantined_not_deleted(tmp_path: Path) -> None:
    """A corrupt spool file is moved to bad/ (kept for a human) and skipped."""
    spool = Spool(tmp_path, max_records=10, max_bytes=100_000)
    spool.put("good", {"record_key": "good"})
    (tmp_path / "00000000000000000001-00000000-x.json").write_text("{broken")
    items = spool.items()
    assert [i.record["record_key"] for i in items] == ["good"]
    assert (tmp_path / "bad" / "00000000000000000001-00000000-x.json").exists()


def test_a_quarantine_while_a_record_is_spooled_costs_no_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drainer's thread may quarantine a bad file (which resets the usage count)
    while another thread spools a record: the record is stored all the same, not lost
    to an internal error, and the count is right after."""
    spool = Spool(tmp_path, max_records=10, max_bytes=100_000)
    bad = tmp_path / "00000000000000000001-00000000-x.json"
    bad.write_text("{broken")
    write = spool._write_atomic

    def racing(tmp: Path, final: Path, data: bytes) -> None:
        spool.quarantine(bad, ValueError("broken"))  # the drainer, at that very moment
        write(tmp, final, data)

    monkeypatch.setattr(spool, "_write_atomic", racing)
    path = spool.put("k", {"record_key": "k"})
    assert spool.read(path) == {"record_key": "k"}
    assert spool.usage() == (1, path.stat().st_size)


def test_interrupted_writes_are_cleaned(tmp_path: Path) -> None:
    """Leftover .tmp files (a crash mid-write) are not read as records and are removed."""
    spool = Spool(tmp_path, max_records=10, max_bytes=100_000)
    (tmp_path / "1-2-x.tmp").write_text('{"record_key": "half"')
    assert spool.items() == []
    assert spool.clean_tmp(older_than_s=0) == 1
