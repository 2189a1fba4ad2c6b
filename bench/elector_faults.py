"""Measure the library's fault behaviour on a real PostgreSQL; assert nothing.

    .venv/bin/python -m bench.elector_faults [--dsn DSN] [--trials 3]

Without --dsn it starts a throwaway local cluster, as the test suite does.
It prints, for a 6 s lease (deadline 3.99 s, kill grace 1 s, margin 0.5 s):

- blocked renewals (a row lock on the lease row): how long the lease still had
  to run in the database when is_leader() turned false, and how long after that
  on_lost was called;
- failover: the time from kill -9 of the leading process to the first sample in
  which another process leads (at most the lease plus jitter is expected).
"""

import argparse
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

from bench.cluster import postgres
from leaderrun import LeaderElector
from leaderrun.clock import boottime

ROOT = Path(__file__).resolve().parents[1]
LEASE_S = 6.0


def blocked_renewals(dsn: str) -> tuple[float, float]:
    lock = f"bench-{uuid.uuid4().hex[:8]}"
    lost_at: list[float] = []
    elector = LeaderElector(
        lock, dsn=dsn, lease_s=LEASE_S, on_lost=lambda _: lost_at.append(boottime())
    )
    with elector, psycopg.connect(dsn, autocommit=True) as blocker:
        assert elector.wait_for_leadership(60)
        with psycopg.connect(dsn, autocommit=True) as observer:
            blocker.execute("BEGIN")
            blocker.execute(
                "SELECT 1 FROM leader_lease WHERE lock_key = %s FOR UPDATE",
                (elector.lock.key,),
            )
            while elector.is_leader():
                time.sleep(0.002)
            false_at = boottime()
            row = observer.execute(
                "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8"
                "  FROM leader_lease WHERE lock_key = %s",
                (elector.lock.key,),
            ).fetchone()
            assert row is not None
            while not lost_at:
                time.sleep(0.002)
            blocker.execute("ROLLBACK")
    return float(row[0]), lost_at[0] - false_at


def failover(dsn: str) -> float:
    lock = f"bench-{uuid.uuid4().hex[:8]}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.elector_proc", dsn, lock, "6"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    lines: queue.Queue[tuple[int, str]] = queue.Queue()

    def pump(i: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((i, line))

    for i, proc in enumerate(procs):
        threading.Thread(target=pump, args=(i, proc), daemon=True).start()
    try:
        while True:
            i, line = lines.get(timeout=60)
            if line.startswith("lead "):
                leader = i
                break
        procs[leader].send_signal(signal.SIGKILL)
        killed_at = boottime()
        while True:
            i, line = lines.get(timeout=60)
            if i != leader and line.startswith("lead "):
                return float(line.split()[2]) - killed_at
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    with postgres(args.dsn) as (dsn, _):
        for trial in range(1, args.trials + 1):
            left_s, on_lost_s = blocked_renewals(dsn)
            print(
                f"blocked renewals #{trial}: is_leader() false with {left_s:.3f}s "
                f"of lease left in the database; on_lost after {on_lost_s * 1000:.1f}ms"
            )
        for trial in range(1, args.trials + 1):
            print(f"failover #{trial}: new leader {failover(dsn):.3f}s after kill -9")


if __name__ == "__main__":
    main()
