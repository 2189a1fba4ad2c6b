"""A SIGTERM cancels an acquire stuck behind a row lock, on either store.

An operator's forgotten transaction on the lease row (PostgreSQL) or on the file's
write lock (SQLite) once made the acquire wait with SIGTERM recorded and ignored:
cron runs piled up and systemd waited for its SIGKILL.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3

import pytest

from tests.faults.conftest import WAIT_S, boottime, record_figure
from tests.faults.local.host import STORES, Local, store_dsn
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(180)]


# --- a blocked acquire ----------------------------------------------------------------


@contextlib.contextmanager
def row_locked(kind, local, pg_admin):
    """Hold the lock's row (PostgreSQL) or the file's write lock (SQLite) open,
    as an operator's forgotten transaction would."""
    if kind == "postgres":
        with pg_admin() as conn:
            conn.execute("BEGIN")
            conn.execute(
                "SELECT 1 FROM leader_lease WHERE lock_name = %s FOR UPDATE",
                (local.lock,),
            )
            yield
            conn.execute("COMMIT")
        return
    path = local.dsn.removeprefix("sqlite://")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("COMMIT")
    finally:
        conn.close()


def blocked(kind, local, proc, pg_admin) -> bool:
    """Whether leaderrun's acquire waits: on the row lock (PostgreSQL, as the
    server shows it), or for the file's write lock (SQLite: it said it is
    acquiring, and cannot get past that while the lock is held)."""
    if kind == "postgres":
        with pg_admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                " 'leaderrun' AND wait_event_type = 'Lock'"
            ).fetchone()
        return bool(row and row[0])
    return "acquiring" in local.stderr(proc)


@pytest.mark.parametrize("store", STORES)
def test_sigterm_during_a_blocked_acquire_exits_at_once_with_nothing_run(
    request, store, lock_name, tmp_path
):
    """An acquire stuck behind a row lock is cancelled by SIGTERM: leaderrun exits
    143 within 2 s, its command never ran, and no lease is granted afterwards."""
    local = Local(store_dsn(request, store, tmp_path), lock_name, tmp_path)
    pg_admin = request.getfixturevalue("pg_admin") if store == "postgres" else None
    try:
        # A first run makes the lock's row, for the operator's transaction to lock.
        first = local.start(job=("--exit-after", "0"))
        assert first.wait(WAIT_S) == 0, local.stderr(first)
        tokens_before = local.timeline.tokens()
        with row_locked(store, local, pg_admin):
            waiter = local.start("-vv")
            wait_until(
                lambda: blocked(store, local, waiter, pg_admin), "acquire blocked"
            )
            sent_s = boottime()
            waiter.send_signal(signal.SIGTERM)
            status = waiter.wait(WAIT_S)
            took_s = boottime() - sent_s
            if pg_admin is not None:
                # The statement was cancelled in the server, not merely dropped.
                wait_until(
                    lambda: not blocked(store, local, waiter, pg_admin), "cancelled"
                )
        assert status == 128 + signal.SIGTERM, local.stderr(waiter)
        assert took_s < 2.0
        assert local.timeline.tokens() == tokens_before, "the command ran"
        status_after = local.operator("status")
        assert status_after.returncode == 3, "a lease was granted after the cancel"
    finally:
        local.cleanup()
    record_figure(
        f"L3 SIGTERM during a blocked acquire ({store})",
        f"exited 143 in {took_s:.2f}s, nothing ran",
        None,
    )
