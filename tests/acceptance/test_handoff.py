"""Hand-off between real leaderrun processes: woken by the release, or at expiry.

The holder's lease here is 30 s, so a waiter that merely slept until the
holder's expiry would start about 30 s after it; one woken by the release
notification starts at once. The bounds below sit far between the two, so they
test which path ran, not how fast the machine is.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from leaderrun.stores.postgres import PostgresLeaseStore
from leaderrun.stores.postgres_sql import setup_sql
from tests.acceptance.conftest import FAST, Leaderrun, child, read_rest, wait_for_line

# NOTIFY is PostgreSQL's: a SQLite waiter sleeps until the expiry, as it always did.
pytestmark = [pytest.mark.pg, pytest.mark.slow, pytest.mark.stores("postgres")]

Admin = Callable[[], psycopg.Connection[TupleRow]]

LEASE = ("--lease-duration", "30s")
NOTIFIED_WITHIN_S = 10.0
"""A waiter woken by the release starts well within this; one polling, at ~30 s."""
RUN_TIMEOUT_S = 60.0


def intervals(events: Path) -> list[tuple[int, float, float]]:
    """(token, start, stop) of every child that wrote to ``events``, by token."""
    starts: dict[int, float] = {}
    stops: dict[int, float] = {}
    for line in events.read_text().splitlines():
        what, token, _pid, stamp = line.split()
        (starts if what == "start" else stops)[int(token)] = float(stamp)
    assert starts.keys() == stops.keys(), events.read_text()
    return sorted((token, starts[token], stops[token]) for token in starts)


def test_a_waiter_starts_when_the_holder_releases_not_at_expiry(leaderrun, tmp_path):
    events = tmp_path / "events"
    holder = leaderrun.start(
        *LEASE, "--", *child("--events", str(events), "--exit-after", "1.5")
    )
    wait_for_line(holder.stdout, "ready")
    waiter = leaderrun.start(
        *LEASE,
        "--wait",
        "-vv",
        "--",
        *child("--events", str(events), "--exit-after", "0"),
    )
    assert waiter.wait(timeout=RUN_TIMEOUT_S) == 0
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0
    (_, _, held_until), (_, waited_from, _) = intervals(events)
    assert 0 <= waited_from - held_until < NOTIFIED_WITHIN_S
    log = read_rest(waiter.stderr)
    assert "listening for releases" in log
    assert "was released; trying now" in log


def test_each_waiter_tries_once_per_hand_off(leaderrun, tmp_path):
    """Waiters queue up; every release wakes each of them for one attempt only."""
    events = tmp_path / "events"
    holder = leaderrun.start(
        *LEASE, "--", *child("--events", str(events), "--exit-after", "2")
    )
    wait_for_line(holder.stdout, "ready")
    waiters = [
        leaderrun.start(
            *LEASE,
            "--wait",
            "-vv",
            "--",
            *child("--events", str(events), "--exit-after", "0.3"),
        )
        for _ in range(3)
    ]
    # Every waiter is asleep on its LISTEN before the first release.
    logs = ["".join(wait_for_line(w.stderr, "is held; retrying")) for w in waiters]
    assert [w.wait(timeout=RUN_TIMEOUT_S) for w in waiters] == [0, 0, 0]
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0
    runs = intervals(events)
    assert len(runs) == 4
    for (_, _, before), (_, after, _) in itertools.pairwise(runs):
        assert 0 <= after - before < NOTIFIED_WITHIN_S
    tokens = [token for token, _, _ in runs]
    for proc, early in zip(waiters, logs, strict=True):
        log = early + read_rest(proc.stderr)
        token = int(log.split("fencing token ")[1].split(")")[0])
        # The waiter with the k-th token after the holder's saw k releases, and
        # woke once for each: one acquire statement per hand-off.
        assert log.count("was released; trying now") == tokens.index(token)


@pytest.fixture
def one_connection_role(pg_dsn: str, pg_admin: Admin) -> Iterator[str]:
    """A DSN for a role allowed a single connection: its LISTEN cannot connect."""
    PostgresLeaseStore(pg_dsn).init()
    role = f"lr_one_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    with pg_admin() as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1 PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        # The grants `init --print-sql` prints: the lease and the run tables.
        for line in setup_sql("public", role).splitlines():
            if line.startswith("GRANT"):
                admin.execute(line.encode())
    yield make_conninfo(pg_dsn, user=role, password=password)
    with pg_admin() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (role,),
        )
        admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_without_listen_a_waiter_sleeps_until_expiry_without_error(
    leaderrun, one_connection_role, lock_name, tmp_path
):
    """The server refuses the LISTEN connection; the waiter polls the expiry."""
    events = tmp_path / "events"
    holder = leaderrun.start(
        *FAST, "--", *child("--events", str(events), "--exit-after", "1")
    )
    wait_for_line(holder.stdout, "ready")
    limited = Leaderrun(one_connection_role, lock_name)
    try:
        waiter = limited.start(
            "--wait", "-vv", "--", *child("--events", str(events), "--exit-after", "0")
        )
        assert waiter.wait(timeout=RUN_TIMEOUT_S) == 0
        assert waiter.stderr is not None
        log = read_rest(waiter.stderr)
    finally:
        limited.kill_all()
    assert holder.wait(timeout=RUN_TIMEOUT_S) == 0
    assert "waiting without notifications for now" in log
    assert "too many connections" in log
    assert "was released" not in log
    assert "listening for releases" not in log
    (_, _, held_until), (_, waited_from, _) = intervals(events)
    assert waited_from >= held_until
