"""Failover: ``kill -9`` of the holder until the waiter's child starts, x the lease.

The holder is killed at a random point of its renewal cycle; the waiter can
only take over once the lease has expired in the database, so the baseline is
the lease's end: 1.0.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
import uuid

from bench.common import leaderrun_argv, readline, start_holder, stop, wait_for
from bench.report import Goal, Results

WORST = Goal("", 1.1)
"""The slowest failover, as a multiple of its lease."""


def run(dsn: str, leases_s: list[float], out: Results) -> None:
    """One failover for each lease in ``leases_s``."""
    print(f"failover after kill -9: leases {leases_s}")
    ratios = [
        failover(dsn, f"bench-failover-{n}-{uuid.uuid4().hex[:6]}", lease_s) / lease_s
        for n, lease_s in enumerate(leases_s)
    ]
    worst = max(ratios)
    out.check(
        f"failover after `kill -9` of the holder, x lease ({len(ratios)} runs, "
        f"leases {', '.join(f'{s:g} s' for s in leases_s)})",
        ", ".join(f"{r:.3f}" for r in ratios),
        "lease end: 1.0",
        WORST,
        worst,
        shown=f"worst {worst:.3f}",
    )


def failover(dsn: str, lock: str, lease_s: float) -> float:
    """From ``kill -9`` of the holder to the waiter's child's start, in s."""
    lease = f"{lease_s:g}s"
    holder = start_holder(dsn, lock, lease, "exec sleep 1000")
    waiter = subprocess.Popen(
        # The same lease as the holder's, as a fleet's nodes share settings:
        # the waiter's retry jitter (lease/30) follows its own lease.
        [
            *leaderrun_argv(dsn, lock, "--lease-duration", lease, "--wait", "-vv"),
            "--",
            "date",
            "+%s%N",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stderr is not None
        assert waiter.stdout is not None
        wait_for(waiter.stderr, "is held; retrying")
        # Kill at a random point of the renewal cycle.
        time.sleep(random.uniform(0.5, 0.5 + lease_s / 3))
        killed_ns = time.time_ns()
        holder.send_signal(signal.SIGKILL)
        started_ns = int(readline(waiter.stdout, lease_s * 3 + 30))
        return (started_ns - killed_ns) / 1e9
    finally:
        stop(waiter)
        holder.kill()
        holder.communicate()
