"""Server settings a DBA may impose on leaderrun's role, each set with ALTER ROLE.

- ``idle_session_timeout`` shorter than the renewal interval: the server closes
  the idle lease connection between renewals; leaderrun reconnects and keeps
  leading (and a waiter keeps waiting).
- ``statement_timeout``: a renewal blocked behind a row lock is cancelled
  (57014); that is a failed attempt, retried until the deadline decides.
- ``synchronous_commit = off``: refused, because a crash could forget an
  acquire (a fencing token handed out twice) or a renewal (two leaders).
"""

from __future__ import annotations

import time

import pytest

from tests.acceptance.conftest import read_rest, readline, wait_for_line

pytestmark = [pytest.mark.production, pytest.mark.pg, pytest.mark.slow]


def test_idle_session_timeout_closes_the_connection_and_leaderrun_reconnects(
    operator, lock_name
):
    """Renewals every 2 s, idle sessions killed after 0.5 s: the job still finishes."""
    role = operator.role(idle_session_timeout="500ms")
    runner = operator.leaderrun(role, lock_name)
    try:
        holder = runner.start(
            "--lease-duration", "12s", "-v", "--", "sh", "-c", "sleep 7; echo done"
        )
        # The holder must win the start race, or it would be the one to skip.
        seen = "".join(wait_for_line(holder.stderr, "acquired"))
        waiter = runner.start(
            "--lease-duration", "12s", "--wait", "--", "echo", "waited"
        )
        assert holder.wait(timeout=60) == 0
        assert waiter.wait(timeout=60) == 0
        assert (read_rest(holder.stdout), read_rest(waiter.stdout)) == (
            "done\n",
            "waited\n",
        )
        stderr = seen + read_rest(holder.stderr)
        # The server did close it, and every renewal found a fresh connection.
        assert "idle-session timeout" in stderr
        assert "lost" not in stderr
    finally:
        runner.kill_all()


def test_statement_timeout_cancels_a_blocked_renewal_which_is_retried(
    operator, pg_admin, lock_name
):
    """A row lock held 3 s against a 500 ms statement_timeout: retried, job done."""
    role = operator.role(statement_timeout="500ms")
    runner = operator.leaderrun(role, lock_name)
    try:
        proc = runner.start(
            "--lease-duration",
            "12s",
            "-v",
            "--",
            "sh",
            "-c",
            "echo started; sleep 8; echo done",
        )
        assert readline(proc.stdout, 30) == "started\n"
        with pg_admin() as conn, conn.transaction():
            conn.execute(
                f'SELECT 1 FROM "{operator.schema}".leader_lease'
                " WHERE lock_name = %s FOR UPDATE",
                (lock_name,),
            )
            time.sleep(4)  # two renewals' worth
        assert proc.wait(timeout=60) == 0
        assert readline(proc.stdout) == "done\n"
        stderr = read_rest(proc.stderr)
        assert "statement timeout" in stderr
        assert "lost" not in stderr
    finally:
        runner.kill_all()


@pytest.mark.parametrize("wait", [False, True])
def test_synchronous_commit_off_is_refused(operator, lock_name, wait):
    """No command runs on a role whose commits a crash could forget."""
    role = operator.role(synchronous_commit="off")
    runner = operator.leaderrun(role, lock_name)
    args = ["--wait", "--wait-timeout", "2s"] if wait else []
    result = runner.run(*args, "--", "echo", "ran")
    assert result.returncode == 69
    assert result.stdout == ""
    assert "synchronous_commit is 'off'" in result.stderr
    assert f'ALTER ROLE "{role}" SET synchronous_commit = on' in result.stderr


def test_synchronous_commit_local_is_accepted(operator, lock_name):
    """``local`` is crash-safe on the primary; only ``off`` is refused."""
    role = operator.role(synchronous_commit="local")
    result = operator.leaderrun(role, lock_name).run("--", "echo", "ran")
    assert (result.returncode, result.stdout) == (0, "ran\n")
