"""Benchmark: AMI parse + call tracking throughput on one core.

Replays ami-basic.raw and ami-abandon.raw many times at full speed (each copy with its
Uniqueids/Linkedids rewritten so every copy is a distinct set of calls), in 64 KiB
reads as a socket would deliver them, through :class:`ami.protocol.AmiParser` and
:class:`ami.tracker.CallTracker`. As a baseline in the same run it measures bare
``bytes.split(b"\\r\\n\\r\\n")`` framing of the same bytes. Target: >= 20,000 events/s
parsed and tracked.

    .venv/bin/python bench/bench_ami.py [--copies 300]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

from ami.protocol import AmiParser
from ami.records import CallRecord
from ami.tracker import CallTracker, extension_agent
from router.rules.presence import Presence

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "asterisk-22"
CHUNK = 65536
TARGET = 20_000


def build_stream(copies: int) -> tuple[bytes, int]:
    """Banner once, then ``copies`` rewritten copies of each recording's messages."""
    bodies = []
    for name in ("ami-basic.raw", "ami-abandon.raw"):
        data = (FIXTURES / name).read_bytes()
        banner, _, body = data.partition(b"\r\n")
        bodies.append(body)
    parts = [banner + b"\r\n"]
    for k in range(copies):
        tag = b"%06d" % k  # same length as the "179533" prefix of every Uniqueid
        parts.extend(body.replace(b"179533", tag) for body in bodies)
    stream = b"".join(parts)
    return stream, stream.count(b"\r\n\r\n")


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    gc.collect()
    start = time.perf_counter()
    count = fn()
    return time.perf_counter() - start, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=300, help="copies of each recording")
    args = ap.parse_args()
    copies = max(1, min(args.copies, 10_000))
    stream, messages = build_stream(copies)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]

    def split_only() -> int:
        return len(stream.split(b"\r\n\r\n")) - 1

    def parse_only() -> int:
        parser = AmiParser()
        n = sum(len(parser.feed(c)) for c in chunks)
        parser.feed_eof()
        return n

    records: list[CallRecord] = []

    def parse_and_track() -> int:
        parser = AmiParser()
        tracker = CallTracker(records.append, presence=Presence(),
                              agent_for_device=extension_agent)
        n = 0
        for c in chunks:
            for msg in parser.feed(c):
                tracker.handle(msg)
                n += 1
        parser.feed_eof()
        tracker.flush()
        return n

    rows = []
    for label, fn in (("bytes.split framing (baseline)", split_only),
                      ("AmiParser.feed", parse_only),
                      ("AmiParser + CallTracker", parse_and_track)):
        best = min((timed(fn) for _ in range(3)), key=lambda r: r[0])
        rows.append((label, best[1], best[0]))
    base_rate = rows[0][1] / rows[0][2]
    print(f"stream: {len(stream) / 1e6:.1f} MB, {messages} messages, {copies} copies of "
          f"each recording ({5 * copies} calls), read in {CHUNK // 1024} KiB chunks")
    print(f"{'stage':34} {'messages':>10} {'seconds':>8} {'msg/s':>12} {'vs split':>9}")
    for label, n, secs in rows:
        rate = n / secs
        print(f"{label:34} {n:10d} {secs:8.3f} {rate:12,.0f} {rate / base_rate:9.4f}")
    tracked = rows[2][1] / rows[2][2]
    expected_records = 5 * copies
    emitted = len(records) // 3
    lost = "" if emitted == expected_records else " -> RECORDS LOST"
    print(f"records emitted per run: {emitted} (expected {expected_records}){lost}")
    print(f"{'PASS' if tracked >= TARGET and not lost else 'FAIL'}: parse+track "
          f"{tracked:,.0f} events/s (target {TARGET:,}, every record emitted)")


if __name__ == "__main__":
    main()
