"""Hand-off: from the holder's child exiting to the waiter's child starting.

Both children are the stamper (bench/stamp.c): the holder's prints the time as
it exits, the waiter's as it starts. :func:`stamped_handoff` measures one
hand-off for any lock tool; the peers figure (bench/peers.py) uses it too.

The baseline is the same hand-off with LISTEN impossible (a role limited to one
connection), so the waiter sleeps until the holder's lease would have expired,
as behind PgBouncer in transaction mode.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

import psycopg
from psycopg import sql

from bench.common import (
    LINE_TIMEOUT_S,
    admin,
    leaderrun_argv,
    median_ms,
    read_ns,
    start_job,
    stop,
    wait_for,
)
from bench.report import Goal, Results
from bench.stamp import Stamper, StamperError
from leaderrun.stores.postgres_sql import setup_sql

MEDIAN = Goal("median", 50, "<", "ms")
"""The hand-off with notifications, in milliseconds."""

FALLBACK_LEASE_S = 4.0
"""The holder's lease when the waiter cannot LISTEN: it sleeps until its end."""

FIGURE = "hand-off: holder's child exits -> waiter's child starts"
"""The row's name in RESULTS.md."""


def run(
    dsn: str, rounds: int, fallback_rounds: int, stamper: Stamper, out: Results
) -> None:
    """Hand-offs woken by the release, then as many without LISTEN."""
    print(f"hand-off: {rounds} rounds with NOTIFY, {fallback_rounds} without")
    try:
        stamper.path  # noqa: B018 (built now, so that a missing compiler is one row)
    except StamperError as exc:
        out.add(FIGURE, f"not measured: {exc}", "-")
        return
    notified = []
    for i in range(rounds):
        done = handoff(dsn, dsn, f"bench-handoff-{i}", "30s", stamper)
        if "was released; trying now" not in done.log:
            raise RuntimeError(f"the waiter was not woken by the release: {done.log}")
        notified.append(done.latency_s)
    polled = []
    with one_connection_role(dsn) as limited:
        for i in range(fallback_rounds):
            done = handoff(
                dsn, limited, f"bench-poll-{i}", f"{FALLBACK_LEASE_S:g}s", stamper
            )
            if "waiting without notifications" not in done.log:
                raise RuntimeError(f"the fallback waiter listened: {done.log}")
            polled.append(done.latency_s)
    out.check(
        f"{FIGURE} (median of {rounds})",
        f"{median_ms(notified):.1f} ms (min {min(notified) * 1000:.1f}, "
        f"max {max(notified) * 1000:.1f})",
        f"without LISTEN: {median_ms(polled):.0f} ms (median of {fallback_rounds}, "
        f"lease {FALLBACK_LEASE_S:g} s; scales with the lease)",
        MEDIAN,
        median_ms(notified),
    )


def handoff(
    dsn: str, waiter_dsn: str, lock: str, lease: str, stamper: Stamper
) -> Handoff:
    """One leaderrun hand-off; the waiter uses ``--wait`` and ``waiter_dsn``."""
    return stamped_handoff(
        leaderrun_argv(dsn, lock, "--lease-duration", lease, "--"),
        leaderrun_argv(waiter_dsn, lock, "--wait", "-vv", "--"),
        stamper,
        # -vv says when the waiter found the lock held: it waits from then on.
        waiting=lambda waiter: wait_for(_stderr(waiter), "is held; retrying"),
    )


@dataclass(frozen=True)
class Handoff:
    """One hand-off: the holder's child's end to the waiter's child's start."""

    latency_s: float
    log: str
    """The waiter's stderr."""


def stamped_handoff(
    holder: list[str],
    waiter: list[str],
    stamper: Stamper,
    waiting: Callable[[subprocess.Popen[str]], str],
    env: dict[str, str] | None = None,
) -> Handoff:
    """One hand-off between two lock tools' processes, stamped at both ends.

    ``holder`` and ``waiter`` are a tool's argv up to its command; the stamper
    is appended. ``waiting(waiter)`` returns once the waiter waits for the lock
    (with what it read of the waiter's stderr); only then does the holder's
    job end, so the figure never includes the waiter's own start-up.
    """
    held, job = start_job(holder, stamper, env)
    second = None
    try:
        second = subprocess.Popen(
            [*waiter, *stamper.start()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        early = waiting(second)
        job.end()
        assert held.stdout is not None
        assert second.stdout is not None
        ended_ns = read_ns(held.stdout, "the holder's job's end")
        started_ns = read_ns(second.stdout, "the waiter's child's start")
        _, log = second.communicate(timeout=LINE_TIMEOUT_S)
        if second.returncode != 0 or held.wait(timeout=LINE_TIMEOUT_S) != 0:
            raise RuntimeError(
                f"hand-off failed: holder {held.returncode}, "
                f"waiter {second.returncode}: {early}{log}"
            )
        return Handoff((started_ns - ended_ns) / 1e9, early + log)
    finally:
        job.kill()
        stop(held)
        if second is not None:
            stop(second)


def _stderr(proc: subprocess.Popen[str]) -> IO[str]:
    assert proc.stderr is not None
    return proc.stderr


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
