"""How long RuleSet.decide() takes: the example rules, and 20 rules that all have to be
tried, against a baseline of an empty rule set (default only), in the same run.

Prints per-decision times (best and median of batches) and the ratio to the baseline.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from router.models import Customer
from router.phone import normalize
from router.rules.compiler import CallContext
from router.rules.decide import RuleSet, load_rules
from router.rules.presence import Presence

ROOT = Path(__file__).resolve().parents[1]
AT = datetime(2026, 11, 23, 10, 30, tzinfo=ZoneInfo("Asia/Shanghai"))


def twenty_rules() -> RuleSet:
    """20 rules whose conditions fail only at the last check, so all are tried."""
    return RuleSet.from_mapping({
        "agents": {"7001": "PJSIP/7001"},
        "schedules": {"office": {"timezone": "Asia/Shanghai", "hours": {"mon-fri": "09:00-18:00"}}},
        "rules": [{"name": f"r{i}", "when": {"known": True, "did_pattern": "_999X.",
                                             "schedule": "office", "tags_any": ["a"]},
                   "owner": {"fallback": {"queue": "vip"}}} for i in range(20)],
    })


def per_decision_us(rs: RuleSet, ctx: CallContext, batches: int = 30, n: int = 2000) -> list[float]:
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(n):
            rs.decide(ctx)
        times.append((time.perf_counter() - start) / n * 1e6)
    return times


def main() -> None:
    customer = Customer(id="C-1", name="Li Lei", tier="gold", owner="7001", tags=("x",))
    ctx = CallContext(number=normalize("13800138000"), did="4008001000", at=AT,
                      customer=customer, lookup_source="lru", presence=Presence())
    cases = [
        ("baseline: default only", RuleSet.default_only()),
        ("examples/rules.yaml", load_rules(ROOT / "examples" / "rules.yaml")),
        ("20 rules, all tried", twenty_rules()),
    ]
    base = None
    print(f"{'rule set':<26} {'best µs':>9} {'median µs':>10} {'x baseline':>11}")
    for name, rs in cases:
        t = per_decision_us(rs, ctx)
        best, median = min(t), statistics.median(t)
        base = base or median
        print(f"{name:<26} {best:>9.1f} {median:>10.1f} {median / base:>11.1f}")


if __name__ == "__main__":
    main()
