"""``leaderrun run`` end to end: real processes, real signals, real stores.

Every test that uses the ``leaderrun`` fixture runs on PostgreSQL and on SQLite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from leaderrun import procfs
from tests.acceptance.conftest import (
    FAST,
    child,
    read_rest,
    readline,
    wait_for_line,
    wait_gone,
)
from tests.helpers.command import run as leaderrun_cli
from tests.helpers.processes import pid_gone
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.slow]


def test_runs_the_command_and_exits_with_its_status(leaderrun):
    """The command's output passes through untouched, and its status is leaderrun's."""
    result = leaderrun.run("--", "echo", "hello")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello\n", "")


def test_three_contenders_exactly_one_runs(leaderrun):
    """Of three leaderruns started together, one runs the command and two exit 75."""
    script = "echo ran; sleep 2"
    procs = [leaderrun.start("--", "sh", "-c", script) for _ in range(3)]
    results = [(p.wait(timeout=30), read_rest(p.stdout)) for p in procs]
    assert sorted(code for code, _ in results) == [0, 75, 75]
    assert [out for _, out in results].count("ran\n") == 1


@pytest.mark.parametrize("status", [0, 1, 3, 42, 255])
def test_exit_status_is_passed_through(leaderrun, status):
    """leaderrun exits with the child's own status, never a collapsed one."""
    assert leaderrun.run("--", "sh", "-c", f"exit {status}").returncode == status


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_death_by_signal_exits_128_plus_n(leaderrun, signum):
    """A child killed by signal N makes leaderrun exit 128+N, as a shell would."""
    result = leaderrun.run("--", "sh", "-c", f"kill -{signum.name[3:]} $$")
    assert result.returncode == 128 + signum


def test_stdin_belongs_to_the_child(leaderrun):
    """What is piped into leaderrun reaches the child."""
    result = leaderrun.run("--", "cat", stdin=subprocess.PIPE, timeout_s=30)
    assert result.returncode == 0
    proc = leaderrun.start("--", "cat", stdin=subprocess.PIPE)
    out, _ = proc.communicate("line one\nline two\n", timeout=30)
    assert (proc.returncode, out) == (0, "line one\nline two\n")


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        (["no-such-command-xyz"], 127, "command not found: 'no-such-command-xyz'"),
        (["/etc/passwd"], 126, "not executable: '/etc/passwd'"),
        (["/no/such/file"], 127, "no such file: '/no/such/file'"),
    ],
)
def test_bad_command_is_refused_before_touching_the_database(command, status, message):
    """127/126 come before any connection: an unreachable DSN is never tried."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "leaderrun",
            "--dsn",
            "host=127.0.0.1 port=1",
            "--lock-id",
            "x",
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == status
    assert result.stderr == f"leaderrun: {message}" + (
        "; check its mode (chmod +x) or run it through its interpreter\n"
        if status == 126
        else "\n"
    )


def test_unreachable_database_exits_69_in_one_line_without_the_password(tmp_path):
    """Database down at start: one line on stderr, exit 69, no password, nothing run."""
    marker = tmp_path / "ran"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "leaderrun",
            "--dsn",
            "postgresql://app:hunter2secret@127.0.0.1:1/db",
            "--lock-id",
            "x",
            "--",
            "touch",
            str(marker),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 69
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("leaderrun: cannot connect to app@127.0.0.1:1/db")
    assert "hunter2secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lock-id", "x", "--bogus", "--", "true"], "No such option: --bogus"),
        (
            ["--lock-id", "x", "--lease-duration", "soon", "--", "true"],
            "--lease-duration 'soon' is not a duration",
        ),
        (
            ["--lock-id", "x", "--lease-duration", "2s", "--", "true"],
            "unsafe timing: renew-interval + jitter + 2 x attempt budget",
        ),
        (
            ["--lock-id", "x", "-E", "300", "--", "true"],
            "--busy-exit-code 300 must be between 0 and 255",
        ),
        (["--lock-id", "x"], "no command given"),
        (["--", "true"], "no --lock-id given"),
    ],
)
def test_usage_errors_exit_64_with_one_line(args, needle):
    """Bad flags and values exit 64 (not click's 2) with one line and no traceback."""
    result = leaderrun_cli(*args)
    assert result.returncode == 64
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("leaderrun: ")


def test_busy_exit_code_can_be_overridden(leaderrun):
    """-E sets what a node that did not get the lock exits with."""
    holder = leaderrun.start(*FAST, "--", *child())
    assert readline(holder.stdout).startswith("ready")
    assert leaderrun.run("-E", "0", "--", "true").returncode == 0
    assert leaderrun.run("--", "true").returncode == 75


def test_child_environment(leaderrun, store_kind):
    """The child gets the lease in its environment, and no inherited LEADERRUN_*."""
    # A libpq DSN can carry a password; a SQLite one has none to hide.
    secret = " password=sekrit-in-dsn" if store_kind == "postgres" else ""
    secret_dsn = f"{leaderrun.dsn}{secret}"
    proc = subprocess.run(
        [sys.executable, "-m", "leaderrun", "--lock-id", leaderrun.lock, "--", "env"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={
            **os.environ,
            "LEADERRUN_DSN": secret_dsn,
            "LEADERRUN_STALE": "x",
            "LEADERRUN_FENCING_TOKEN": "999999",
        },
    )
    assert proc.returncode == 0, proc.stderr
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert env["LEADERRUN_HELD"] == "1"
    assert env["LEADERRUN_LOCK_ID"] == leaderrun.lock
    assert int(env["LEADERRUN_FENCING_TOKEN"]) == 1
    host, pid, nonce = env["LEADERRUN_HOLDER"].split(":")
    assert int(pid) > 0
    assert (host, len(nonce)) == (os.uname().nodename, 16)
    assert "LEADERRUN_STALE" not in env
    assert "LEADERRUN_DSN" not in env
    assert "sekrit-in-dsn" not in proc.stdout + proc.stderr


def test_release_frees_the_lock_and_tokens_increase(leaderrun, lease_admin):
    """After a run the row stays with no holder; each run gets a larger token."""
    tokens = []
    for _ in range(3):
        out = leaderrun.run("--", "sh", "-c", "echo $LEADERRUN_FENCING_TOKEN").stdout
        tokens.append(int(out))
    assert tokens == [1, 2, 3]
    assert lease_admin.row(leaderrun.lock) == (None, 3, True)


def test_signals_are_forwarded_to_the_whole_group(leaderrun):
    """Each forwarded signal reaches the child and its grandchild, once each."""
    proc = leaderrun.start("--", *child("--grandchild"))
    pids = {readline(proc.stdout).split()[1] for _ in range(2)}
    assert len(pids) == 2
    for signum in (
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGWINCH,
    ):
        proc.send_signal(signum)
        lines = {readline(proc.stdout).strip() for _ in range(2)}
        assert lines == {f"{signum.name} {pid}" for pid in pids}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 128 + signal.SIGTERM


def test_second_interrupt_escalates_to_sigkill(leaderrun):
    """A child that ignores SIGINT is killed by the second Ctrl-C: exit 137."""
    proc = leaderrun.start("--", *child("--ignore-term", "--grandchild"))
    pids = [int(readline(proc.stdout).split()[1]) for _ in range(2)]
    proc.send_signal(signal.SIGINT)
    assert {readline(proc.stdout).split()[0] for _ in range(2)} == {"SIGINT"}
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 128 + signal.SIGKILL
    assert all(pid_gone(pid) for pid in pids)


def test_signal_while_waiting_cancels_cleanly(leaderrun, tmp_path):
    """SIGTERM to a leaderrun waiting for the lock: exit 143, the command never ran."""
    holder = leaderrun.start(*FAST, "--", *child())
    assert readline(holder.stdout).startswith("ready")
    marker = tmp_path / "ran"
    waiter = leaderrun.start(*FAST, "--wait", "-vv", "--", "touch", str(marker))
    wait_for_line(waiter.stderr, "is held; retrying")
    waiter.send_signal(signal.SIGTERM)
    assert waiter.wait(timeout=15) == 128 + signal.SIGTERM
    assert not marker.exists()
    assert holder.poll() is None


def test_wait_timeout_gives_up_with_75(leaderrun):
    """--wait-timeout bounds the wait; then leaderrun exits with the busy code."""
    holder = leaderrun.start(*FAST, "--", *child())
    assert readline(holder.stdout).startswith("ready")
    start = time.monotonic()
    result = leaderrun.run(*FAST, "--wait-timeout", "1.5s", "--", "true")
    waited_s = time.monotonic() - start
    assert result.returncode == 75
    assert 1.5 <= waited_s < 10


@pytest.mark.timing
def test_kill_9_kills_the_child_and_a_waiter_takes_over(leaderrun, tmp_path):
    """kill -9 of the holder: its child dies at once; a waiter runs after expiry."""
    events = tmp_path / "events"
    holder = leaderrun.start(*FAST, "--", *child("--events", str(events)))
    child_pid = int(readline(holder.stdout).split()[1])
    waiter = leaderrun.start(
        *FAST, "--wait", "--", *child("--events", str(events), "--exit-after", "0.2")
    )
    time.sleep(0.5)  # let the waiter find the lock held (not a handshake: a head start)
    killed_at = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    assert wait_gone(child_pid, 1.0) < 1.0  # PR_SET_PDEATHSIG
    assert readline(waiter.stdout).startswith("ready")
    took_over_s = time.monotonic() - killed_at
    assert waiter.wait(timeout=15) == 0
    lines = [line.split() for line in events.read_text().splitlines()]
    starts = [
        (int(token), float(at)) for what, token, _, at in lines if what == "start"
    ]
    assert [token for token, _ in starts] == [1, 2]
    # The lease (4 s) had to run out in database time before anyone could take it.
    assert 1.0 < took_over_s < 4 + 2.0


@pytest.mark.timing
def test_lease_taken_by_an_admin_stops_the_child_with_122(leaderrun, lease_admin):
    """An admin UPDATE that takes the lease: the child is stopped, exit 122, in time."""
    proc = leaderrun.start(*FAST, "--", *child("--grandchild"))
    pids = [int(readline(proc.stdout).split()[1]) for _ in range(2)]
    expires_at = lease_admin.take_over(leaderrun.lock)
    assert proc.wait(timeout=15) == 122
    stopped_at = datetime.now(UTC)
    assert all(pid_gone(pid) for pid in pids)
    # Stopped before the lease it held could have run out (same host, same clock).
    assert stopped_at < expires_at
    assert "lease on" in read_rest(proc.stderr)


@pytest.mark.timing
@pytest.mark.stores("postgres")  # SQLite's equivalent: test_sqlite.py
def test_frozen_database_still_gets_the_child_killed_on_time(
    leaderrun, pg_admin, pg_cluster
):
    """With every renewal hung (backend and postmaster stopped), the deadline kills."""
    if not pg_cluster.local:
        pytest.skip("needs the local cluster: it freezes the server's processes")
    proc = leaderrun.start(*FAST, "--", *child("--grandchild"))
    pids = [int(readline(proc.stdout).split()[1]) for _ in range(2)]
    with pg_admin() as conn:
        backends = [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'leaderrun'"
            )
        ]
        postmaster = int((pg_cluster.datadir / "postmaster.pid").read_text().split()[0])
        frozen = [postmaster, *backends]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            # Our admin backend is not frozen; a plain SELECT ignores row locks.
            # A renewal caught mid-statement has not committed and never replied,
            # so the holder's deadline comes from the expiry read here.
            expires_at = conn.execute(
                "SELECT expires_at FROM leader_lease WHERE lock_name = %s",
                (leaderrun.lock,),
            ).fetchone()[0]
            for pid in pids:
                wait_gone(pid, 10)
            killed_after_s = time.monotonic() - frozen_at
            killed_at = datetime.now(UTC)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    # The last renewal was sent before the freeze, so its deadline (2.3 s after
    # it) plus the kill grace (0.67 s) and a tick bound the kill from above.
    assert killed_after_s < 2.33 + 0.67 + 0.5
    assert killed_at < expires_at
    assert proc.wait(timeout=30) == 122


def test_a_standby_stopped_while_waiting_never_runs_the_command_late(
    leaderrun, tmp_path
):
    """The command's process, forked ahead, is stopped from outside while its
    leaderrun waits: at the grant it cannot exec in time, so it is killed, the
    run exits 126, nothing ran, and the lease is given back at once."""
    marker = tmp_path / "ran"
    holder = leaderrun.start(*FAST, "--", *child("--exit-after", "1"))
    assert readline(holder.stdout).startswith("ready")
    waiter = leaderrun.start(*FAST, "--wait", "--", "touch", str(marker))

    def standby() -> int | None:
        for pid in procfs.children(waiter.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "lrun-standby":
                    return pid
        return None

    pid = wait_until(standby, "the waiter's standby")
    os.kill(pid, signal.SIGSTOP)
    assert holder.wait(timeout=60) == 0
    assert waiter.wait(timeout=60) == 126
    stderr = read_rest(waiter.stderr)
    assert "did not exec within" in stderr
    assert not marker.exists()
    assert pid_gone(pid)
    assert leaderrun.run("--", "true").returncode == 0  # given back, not expiring
