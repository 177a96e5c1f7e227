"""callroute on a real Asterisk 22: decision time, record delay, record accuracy.

The harness of ``tests/asterisk/`` (the shared kit with callroute's own asterisk-conf/
installed as its README says, Asterisk's clock in UTC+8, a real Redis, the sample CRM)
with ``callroute serve`` as a child process, as in production. Two phases, one run:

* ``floor``: the dialplan's AGI points at a bare asyncio responder writing the ten
  variables callroute writes for a known customer (``bench.bench_agi_floor``), no lookup:
  the decision time Asterisk itself shows for the same work on the wire.
* ``callroute``: calls of every kind (owner answers, queue, voicemail, rejected,
  abandoned, unknown caller on the sales line, a CRM slower than the deadline), placed by
  AMI Originate at ``--rate`` calls/s, several at once.

Per phase it prints, from Asterisk's own full.log, the decision time per call (the AGI
step to the dialplan's next line: connect, every SET VARIABLE round trip, close); for
callroute, the delay from the call's end (its last Hangup, as the test's AMI connection
saw it) to the CRM receiving the call record, beside Asterisk's own share of it (the last
Cdr event after that hangup), and the share of records whose every field matches what
Asterisk did (Cdr events, queue_log, full.log, voicemail file, recording), as the
real-Asterisk suite checks them. Targets: p99 delay <= 1 s, 100 % of records matching.

Run: ``.venv/bin/python -m bench.bench_asterisk [--calls 60] [--rate 4] [--floor 20]``.
Needs the kit (``../shared/asterisk`` or ``$CALLROUTE_ASTERISK_KIT``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.bench_agi_floor import floor_session
from bench.common import percentile
from tests.asterisk.harness import CallView, kit_problem
from tests.asterisk.lab import Lab, open_lab
from tests.asterisk.truth import compare, decision_ms, truth_of


@dataclass(frozen=True)
class Kind:
    """One kind of call in the mix."""

    name: str
    did: str
    callerid: str
    hold_s: float = 4
    patience_s: float = 30
    talk_s: float = 1


#: The mix, in the order calls are placed (cycled): mostly calls that ring an owner
#: (any number at once), a few that need the shared queues and mailbox.
MIX = (
    Kind("owner answers", "4008001000", '"Li Lei" <+8613800138000>'),
    Kind("owner busy, vip queue", "4008001000", '"Han Meimei" <13900139000>'),
    Kind("owner answers", "4008001000", '"Li Lei" <+8613800138000>'),
    Kind("voicemail", "4008003000", '"New Caller" <13100131000>', hold_s=4),
    Kind("owner answers", "4008001000", '"Li Lei" <+8613800138000>'),
    Kind("rejected", "4008001000", '"Blocked" <+8613300133000>'),
    Kind("owner answers", "4008001000", '"Li Lei" <+8613800138000>'),
    Kind("abandoned in queue", "4008001000", '"Impatient" <+8613600136000>',
         patience_s=3),
    Kind("unknown, sales queue", "4008002000", '"Prospect" <13200132000>'),
    Kind("slow CRM, default queue", "4008001000", '"Slow Case" <+8613700137000>'),
)


@dataclass
class Call:
    kind: Kind
    view: CallView


async def place(lab: Lab, kinds: Sequence[Kind], rate: float) -> list[Call]:
    """Place the calls open-loop: call i at t0 + i/rate, whatever happened before."""
    t0 = time.monotonic()

    async def one(i: int, kind: Kind) -> Call:
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        view = await lab.observer.originate(kind.did, kind.callerid, hold_s=kind.hold_s,
                                            patience_s=kind.patience_s, talk_s=kind.talk_s)
        return Call(kind, view)

    return list(await asyncio.gather(*(one(i, k) for i, k in enumerate(kinds))))


def stats(values: Sequence[float], unit: str, digits: int = 1) -> str:
    """``p50 / p99 / max`` of ``values`` (n)."""
    if not values:
        return "no values"
    return (f"p50 {percentile(values, 50):.{digits}f} {unit}, "
            f"p99 {percentile(values, 99):.{digits}f} {unit}, "
            f"max {max(values):.{digits}f} {unit} (n={len(values)})")


async def floor_phase(lab: Lab, calls: int, rate: float) -> list[float]:
    """Decision times (ms, from full.log) with the floor responder answering the AGI."""
    known = frozenset({b"+8613800138000"})
    server = await asyncio.start_server(functools.partial(floor_session, known=known),
                                        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lab.asterisk.rx(f"dialplan set global CALLROUTE_PORT {port}")
    try:
        placed = await place(lab, [MIX[0]] * calls, rate)
        await lab.observer.wait_ended([c.view for c in placed], timeout=120)
    finally:
        lab.asterisk.rx(f"dialplan set global CALLROUTE_PORT {lab.asterisk.agi_port}")
        server.close()
        await server.wait_closed()
    return [ms for c in placed if (ms := decision_ms(lab.asterisk, c.view)) is not None]


async def run(calls: int, rate: float, floor: int) -> int:
    """Both phases; prints the figures; returns 0 when the targets are met."""
    with tempfile.TemporaryDirectory(prefix="bench-asterisk-") as tmp:
        async with open_lab(Path(tmp), tz="Asia/Shanghai") as lab:
            zone = "UTC+8 (Asia/Shanghai)" if lab.zone_problem is None else \
                f"this host's zone ({lab.zone_problem})"
            print(f"Asterisk 22 from the kit, its clock in {zone}; callroute serve as a "
                  f"child process; {calls} calls at {rate:g}/s, floor {floor} calls")
            await lab.spawn()
            try:
                floor_ms = await floor_phase(lab, floor, rate) if floor else []
                kinds = list(itertools.islice(itertools.cycle(MIX), calls))
                placed = await place(lab, kinds, rate)
                await lab.observer.wait_ended([c.view for c in placed], timeout=180)
                return await report(lab, placed, floor_ms)
            finally:
                await lab.end_process(signal.SIGTERM)


async def report(lab: Lab, placed: list[Call], floor_ms: list[float]) -> int:
    """Collect the records, compare them with Asterisk, print the tables."""
    decisions: list[float] = []
    late_crm: list[float] = []
    delays: list[float] = []
    cdr_lags: list[float] = []
    mismatched: list[tuple[str, str, list[str]]] = []
    for call in placed:
        record = await lab.record(call.view, timeout=30)
        truth = truth_of(lab.asterisk, call.view, lab.zone)
        if truth.decision_ms is not None:
            slow = truth.route.get("reason") == "deadline"
            (late_crm if slow else decisions).append(truth.decision_ms)
        ended = call.view.ended_at
        assert ended is not None
        posted = datetime.fromisoformat(record["created_at"].replace("Z", "+00:00"))
        delays.append((posted.timestamp() - ended) * 1000)
        if call.view.last_cdr_at is not None:
            cdr_lags.append(max(0.0, call.view.last_cdr_at - ended) * 1000)
        problems = compare(record, truth)
        if problems:
            mismatched.append((call.kind.name, call.view.linkedid, problems))
    print()
    print("| phase | decision time per call (Asterisk's full.log) |")
    print("|---|---|")
    if floor_ms:
        print(f"| floor (bare responder, same variables) | {stats(floor_ms, 'ms')} |")
    print(f"| callroute | {stats(decisions, 'ms')} |")
    if late_crm:
        print(f"| callroute, CRM slower than the deadline (300 ms) | {stats(late_crm, 'ms')} |")
    print()
    print("| call end -> record at the CRM | |")
    print("|---|---|")
    print(f"| Asterisk's last Cdr event after the last hangup (baseline) | "
          f"{stats(cdr_lags, 'ms', 0)} |")
    print(f"| callroute's record received by the CRM | {stats(delays, 'ms', 0)} |")
    share = 100.0 * (len(placed) - len(mismatched)) / len(placed)
    print()
    print(f"records whose every field matches what Asterisk did: "
          f"{len(placed) - len(mismatched)}/{len(placed)} ({share:.1f} %)")
    kinds: dict[str, int] = {}
    for call in placed:
        kinds[call.kind.name] = kinds.get(call.kind.name, 0) + 1
    print("calls: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    for name, lid, problems in mismatched[:10]:
        print(f"  {name} {lid}: " + "; ".join(problems))
    ok_delay = bool(delays) and percentile(delays, 99) <= 1000.0
    ok_match = not mismatched
    print()
    print(f"{'PASS' if ok_delay else 'FAIL'}: record delay p99 <= 1 s with a healthy CRM")
    print(f"{'PASS' if ok_match else 'FAIL'}: 100 % of records match what Asterisk did")
    return 0 if ok_delay and ok_match else 1


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=60, help="calls of the mix (default 60)")
    parser.add_argument("--rate", type=float, default=4.0, help="calls placed per second")
    parser.add_argument("--floor", type=int, default=20, help="floor calls (0: no floor)")
    args = parser.parse_args(argv)
    problem = kit_problem()
    if problem is not None:
        print(problem.replace("real-Asterisk tests skipped", "bench_asterisk skipped"))
        return
    sys.exit(asyncio.run(run(args.calls, args.rate, args.floor)))


if __name__ == "__main__":
    main()
