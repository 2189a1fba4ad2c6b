"""Hand-off: from the holder's child exiting to the waiter's child starting.

The holder's child prints the time as it exits; the waiter's child (``date
+%s%N``) prints it as it starts. The baseline is the same hand-off with LISTEN
impossible (a role limited to one connection), so the waiter sleeps until the
holder's lease would have expired, as behind PgBouncer in transaction mode.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql

from bench.common import (
    LINE_TIMEOUT_S,
    admin,
    leaderrun_argv,
    let_go,
    median_ms,
    readline,
    start_holder,
    stop,
    wait_for,
)
from bench.report import Goal, Results
from leaderrun.stores.postgres_sql import setup_sql

MEDIAN = Goal("median", 50, "<", "ms")
"""The hand-off with notifications, in milliseconds."""

FALLBACK_LEASE_S = 4.0


def run(dsn: str, rounds: int, fallback_rounds: int, out: Results) -> None:
    """Hand-offs woken by the release, then as many without LISTEN."""
    print(f"hand-off: {rounds} rounds with NOTIFY, {fallback_rounds} without")
    notified = []
    for i in range(rounds):
        latency_s, log = handoff(dsn, dsn, f"bench-handoff-{i}", "30s")
        if "was released; trying now" not in log:
            raise RuntimeError(f"the waiter was not woken by the release: {log}")
        notified.append(latency_s)
    polled = []
    with one_connection_role(dsn) as limited:
        for i in range(fallback_rounds):
            latency_s, log = handoff(
                dsn, limited, f"bench-poll-{i}", f"{FALLBACK_LEASE_S:g}s"
            )
            if "waiting without notifications" not in log:
                raise RuntimeError(f"the fallback waiter listened after all: {log}")
            polled.append(latency_s)
    out.check(
        f"hand-off: holder's child exits -> waiter's child starts (median of {rounds})",
        f"{median_ms(notified):.1f} ms (min {min(notified) * 1000:.1f}, "
        f"max {max(notified) * 1000:.1f})",
        f"without LISTEN: {median_ms(polled):.0f} ms (median of {fallback_rounds}, "
        f"lease {FALLBACK_LEASE_S:g} s; scales with the lease)",
        MEDIAN,
        median_ms(notified),
    )


def handoff(
    dsn: str,
    waiter_dsn: str,
    lock: str,
    lease: str,
    waiter_args: tuple[str, ...] = (),
) -> tuple[float, str]:
    """Holder's child exits -> waiter's child starts, in s; and the waiter's log.

    ``waiter_args`` are more options for the waiter (``--listen-dsn``).
    """
    holder = start_holder(dsn, lock, lease, "read x; exec date +%s%N")
    waiter = None
    try:
        assert holder.stdout is not None
        waiter = subprocess.Popen(
            leaderrun_argv(
                waiter_dsn, lock, "--wait", "-vv", *waiter_args, "--", "date", "+%s%N"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert waiter.stdout is not None
        assert waiter.stderr is not None
        early = wait_for(waiter.stderr, "retrying in")
        let_go(holder)
        ended_ns = int(readline(holder.stdout))
        started_ns = int(readline(waiter.stdout))
        _, log = waiter.communicate(timeout=LINE_TIMEOUT_S)
        if waiter.returncode != 0 or holder.wait(timeout=LINE_TIMEOUT_S) != 0:
            raise RuntimeError(f"hand-off run failed: {log}")
        return (started_ns - ended_ns) / 1e9, early + log
    finally:
        stop(holder)
        if waiter is not None:
            stop(waiter)


@contextlib.contextmanager
def one_connection_role(dsn: str) -> Iterator[str]:
    """A role allowed one connection: its LISTEN connection is always refused."""
    role = f"bench_one_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with admin(dsn) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1 PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        for line in setup_sql("public", role).splitlines():
            if line.startswith("GRANT"):  # what `init --print-sql` grants
                conn.execute(line.encode())
    try:
        yield psycopg.conninfo.make_conninfo(dsn, user=role, password=password)
    finally:
        with admin(dsn) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
