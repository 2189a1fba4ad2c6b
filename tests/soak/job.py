"""The soak's job: record its start, then increment two shared counters until done.

Usage: ``python -m tests.soak.job EVENTS LOG NODE DSN SCHEMA JOB SECONDS SEED``

It appends its start to EVENTS in the fault suite's format (the timeline opens a
pidfd on it from there) and ``start``/``end``/``stale`` lines of its own to LOG,
each one ``write`` on an ``O_APPEND`` file. A job that never writes ``end`` was
stopped; when it really died is the timeline's business, not its own.

For SECONDS it increments the counters ``unfenced`` and ``fenced`` in SCHEMA, in
a random order each round, the way Jepsen's etcd test did: read the value, sleep
a few milliseconds, write value + 1. Both in one transaction, the fenced one
starting with ``SELECT fence(JOB, token)`` exactly as docs/safety.md shows. The
write and its COMMIT travel in one message, so a write that is in flight when
the job is killed lands whole or not at all, and every increment that lands
also inserts its row in ``soak_increment``: the checker counts lost updates as
rows minus the counter, from the database alone.

Exit status: 0 when done, 3 when the database failed it (a reset, a restart).
It never writes to stderr, which a nemesis may have stalled.
"""

from __future__ import annotations

import os
import random
import sys
import time

import psycopg
from psycopg import sql

from tests.faults.job import append, record

SLEEP_S = (0.001, 0.010)
"""Between the read and the write: the window a stale writer needs."""

IDLE_IN_TRANSACTION_S = 12
"""Longer than any network delay the nemesis injects, so that a held write still
meets its transaction, but a session whose client vanished behind a partition
gives its row lock back eventually."""


def note(path: str, what: str, node: str, token: int) -> None:
    stamp = time.clock_gettime(time.CLOCK_BOOTTIME)
    append(path, f"{what} {node} {token} {os.getpid()} {stamp:.6f}\n")


def increment(
    conn: psycopg.Connection[tuple[int]],
    kind: str,
    job: str,
    token: int,
    rng: random.Random,
) -> bool:
    """One read-sleep-write of counter ``kind``; False if the fence refused it."""
    conn.execute("BEGIN")
    if kind == "fenced":
        try:
            conn.execute("SELECT fence(%s, %s)", (job, token))
        except psycopg.errors.SerializationFailure:
            conn.execute("ROLLBACK")
            return False
    row = conn.execute(
        "SELECT value FROM soak_counter WHERE kind = %s", (kind,)
    ).fetchone()
    assert row is not None
    time.sleep(rng.uniform(*SLEEP_S))
    # No parameters: psycopg sends it with the simple protocol, all three
    # statements in one message.
    write = sql.SQL(
        "UPDATE soak_counter SET value = {value} WHERE kind = {kind}; "
        "INSERT INTO soak_increment (kind, token, pid) VALUES ({kind}, {token}, "
        "{pid}); COMMIT"
    ).format(value=row[0] + 1, kind=kind, token=token, pid=os.getpid())
    conn.execute(write)
    return True


def main() -> None:
    if "LD_PRELOAD" in os.environ:
        # libfaketime, meant for leaderrun: our stamps stay on the real clock.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        argv = [sys.executable, "-m", "tests.soak.job", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    events, log, node, dsn, schema, job, seconds, seed = sys.argv[1:]
    token = int(os.environ["LEADERRUN_FENCING_TOKEN"])
    record(events)
    note(log, "start", node, token)
    rng = random.Random(f"{seed}:{token}")
    options = (
        f"-c search_path={schema} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_S}s "
        # A client that died while its statement waits for a lock is noticed.
        "-c client_connection_check_interval=1s"
    )
    until = time.monotonic() + float(seconds)
    try:
        with psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, options=options
        ) as conn:
            while time.monotonic() < until:
                for kind in rng.sample(["unfenced", "fenced"], 2):
                    if not increment(conn, kind, job, token, rng):
                        note(log, "stale", node, token)
    except psycopg.Error:
        sys.exit(3)
    note(log, "end", node, token)


if __name__ == "__main__":
    main()
