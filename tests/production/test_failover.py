"""Failover of the primary to a streaming standby, with the real pieces.

A primary and a standby made by ``pg_basebackup`` (tests/production/cluster.py),
asynchronous and synchronous. leaderrun is given both hosts and
``target_session_attrs=read-write``; the primary crashes and the standby is
promoted while the job runs. The lease row was replicated (synchronous commit
waits for it; in the asynchronous case the test waits for replay, as a careful
failover tool does), so the holder's compare-and-swap still matches on the new
primary: it reconnects within its deadline and the job is never stopped.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.acceptance.conftest import Leaderrun, read_rest, readline, wait_for_line

pytestmark = [pytest.mark.production, pytest.mark.pg, pytest.mark.slow]

LEASE = ("--lease-duration", "12s")
"""Renewals every 2 s; the job is stopped 9 s after the last acknowledged one."""

JOB_S = 16
"""Longer than the lease: the job can only finish if renewals reach the new primary."""


def lease_row(conn: Any, lock: str) -> tuple[Any, ...]:
    """(holder, token, renewed_at) of the lock's row."""
    row = conn.execute(
        "SELECT holder, token, renewed_at FROM leader_lease WHERE lock_name = %s",
        (lock,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_holder_keeps_leading_across_a_failover(pair, lock_name):
    """Primary crashes, standby promoted: same holder and token, job runs to the end."""
    runner = Leaderrun(pair.multi_host_dsn(), lock_name)
    try:
        proc = runner.start(
            *LEASE, "-v", "--", "sh", "-c", f"echo started; sleep {JOB_S}; echo done"
        )
        out, err = proc.stdout, proc.stderr
        assert out is not None
        assert err is not None
        assert readline(out, 30) == "started\n"
        with pair.connect(pair.primary) as conn:
            holder, token, _ = lease_row(conn, lock_name)
        if pair.replication_state() == "async":
            pair.wait_caught_up()
        crashed_at = time.monotonic()
        pair.primary.stop("immediate")  # a crash: no shutdown checkpoint
        pair.promote()
        promoted_s = time.monotonic() - crashed_at
        with pair.connect(pair.standby) as conn:
            if pair.synchronous:
                # The copied setting would make the lone new primary wait forever
                # for a synchronous standby; a failover manager clears it.
                conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
                conn.execute("SELECT pg_reload_conf()")
            # The last renewal the standby received; any later one is new.
            replicated_renewal = lease_row(conn, lock_name)[2]

            def renewed_there() -> bool:
                return bool(lease_row(conn, lock_name)[2] > replicated_renewal)

            pair.wait_for(renewed_there, "a renewal on the new primary", timeout_s=15)
            assert lease_row(conn, lock_name)[:2] == (holder, token)
        assert proc.wait(timeout=60) == 0, read_rest(err)
        assert readline(out) == "done\n"
        stderr = read_rest(err)
        assert "renewal failed" in stderr  # it did notice the primary go
        assert "lost" not in stderr
        with pair.connect(pair.standby) as conn:
            assert lease_row(conn, lock_name)[:2] == (None, token)  # released
        assert promoted_s < 9, "the promotion itself took longer than the lease allows"
    finally:
        runner.kill_all()


@pytest.mark.parametrize("pair", ["async"], indirect=True)
def test_a_read_only_standby_is_retried_not_fatal(pair, lock_name):
    """Pointed at a standby, leaderrun retries (or exits 69), and runs once promoted."""
    standby_only = Leaderrun(pair.standby.dsn, lock_name)
    read_write = Leaderrun(
        f"{pair.standby.dsn} target_session_attrs=read-write", lock_name
    )
    try:
        once = standby_only.run("--", "echo", "ran")
        assert once.returncode == 69, once.stderr
        assert "read-only" in once.stderr
        assert len(once.stderr.splitlines()) == 1
        assert once.stdout == ""

        waiters = [
            runner.start("--wait", "--wait-timeout", "60s", "-v", "--", "echo", "ran")
            for runner in (standby_only, read_write)
        ]
        wait_for_line(waiters[0].stderr, "read-only")  # the INSERT was refused
        wait_for_line(waiters[1].stderr, "retrying")  # libpq refused the session
        assert all(w.poll() is None for w in waiters)  # both still trying
        pair.primary.stop("immediate")
        pair.promote()
        outcomes = [(w.wait(timeout=60), w.communicate()[0]) for w in waiters]
        assert sorted(outcomes) == [(0, "ran\n"), (0, "ran\n")]
    finally:
        standby_only.kill_all()
        read_write.kill_all()


@pytest.mark.parametrize("pair", ["sync"], indirect=True)
def test_synchronous_standby_gone_stops_the_job_and_exits_122(pair, lock_name):
    """Commits wait for a standby that is gone: renewals hang, the job is stopped.

    The release then hangs as well; it is given up after its statement bound
    (and cancelled) instead of waiting forever, and leaderrun exits 122.
    """
    runner = Leaderrun(pair.primary.dsn, lock_name)
    try:
        proc = runner.start(
            "--lease-duration", "6s", "--", "sh", "-c", "echo go; sleep 60"
        )
        out, err = proc.stdout, proc.stderr
        assert out is not None
        assert err is not None
        assert readline(out, 30) == "go\n"
        pair.standby.stop("immediate")
        began = time.monotonic()
        assert proc.wait(timeout=60) == 122
        # Kill deadline about 4 s after the last renewal, plus the bounded release.
        assert time.monotonic() - began < 15
        stderr = read_rest(err)
        assert "no renewal succeeded before the kill deadline" in stderr
        assert "could not release (the lease will expire): the release of" in stderr
    finally:
        runner.kill_all()
