"""What the run history and --once-per cost one acquire and one release.

Usage: ``python -m bench.history_overhead [DSN] [ROUNDS]``. Without a DSN it
starts a throwaway cluster as the tests do (tests/pg.py). It prints the median
and 95th percentile of acquire + release round trips on one connection, for the
plain statements (what the library uses) and with history and a window (what
``leaderrun run --once-per`` sends).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid

from bench.cluster import postgres
from leaderrun.lease import parse_lock_id
from leaderrun.runs import RunEnd, RunOutcome
from leaderrun.slots import OncePer, Window
from leaderrun.stores.base import Claim
from leaderrun.stores.postgres import PostgresLeaseStore


def measure(dsn: str, rounds: int) -> None:
    store = PostgresLeaseStore(dsn)
    store.init()
    session = store.connect()
    claim = Claim(holder="bench:1:x", host="bench", pid=1, command="true")
    # Per variant: history_keep and once_per. A 1 ms window with --retry-failed:
    # every round computes and checks the window, and two rounds in one window
    # are still both let in.
    variants: dict[str, tuple[int | None, OncePer | None]] = {
        "plain": (None, None),
        "history": (100, None),
        "history+once-per": (100, OncePer(Window(1e-3), retry_failed=True)),
    }
    try:
        for name, (keep, once_per) in variants.items():
            lock = parse_lock_id(f"bench-{uuid.uuid4().hex[:8]}")
            times_ms = []
            for _ in range(rounds):
                began = time.perf_counter()
                result = session.acquire(
                    lock, claim, 30.0, history_keep=keep, once_per=once_per
                )
                assert result.lease is not None, result
                session.release(result.lease, RunEnd(RunOutcome.ok, 0))
                times_ms.append((time.perf_counter() - began) * 1000)
            times_ms.sort()
            p95 = times_ms[int(len(times_ms) * 0.95)]
            median = statistics.median(times_ms)
            print(
                f"{name:18} acquire+release: median {median:.3f} ms,"
                f" p95 {p95:.3f} ms ({rounds} rounds)"
            )
    finally:
        session.close()


def main() -> None:
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    with postgres(sys.argv[1] if len(sys.argv) > 1 else None) as (dsn, _):
        measure(dsn, rounds)


if __name__ == "__main__":
    main()
