"""Faults of the holder's own host, each of which once broke the guarantee.

A stalled stderr froze both kill paths (the supervisor and the watchdog logged
before they signalled); a SIGTERM could not cancel an acquire stuck behind a row
lock; ``pkill leaderrun`` killed the watchdog too; a failure just after the child
started left it running with the lease held; a setuid child that leaderrun may
not signal made its kill loop spin silently while the lease ran out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leaderrun.lease import make_timing
from tests.faults.conftest import LEASE_S, WAIT_S, boottime, record_figure
from tests.faults.local.host import (
    STORES,
    SYSCALL_WRITE,
    Local,
    stalled_pipe,
    store_dsn,
    threads_in_syscall,
    watchdog_of,
)
from tests.helpers.processes import pid_gone
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(180)]

TIMING = make_timing(LEASE_S)
KILLED_BY_S = TIMING.renew_interval_s + TIMING.jitter_s + TIMING.kill_grace_s + 1.0
"""From a revocation to the holder's child being gone, at worst: the next renewal
finds the loss, then SIGTERM, the grace, SIGKILL; plus a second for a loaded host."""

POSTSPAWN = str(Path(__file__).with_name("postspawn.py"))


@pytest.fixture(params=STORES)
def local(request, lock_name, tmp_path):
    made = Local(store_dsn(request, request.param, tmp_path), lock_name, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def pg_local(pg_dsn, lock_name, tmp_path):
    made = Local(pg_dsn, lock_name, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


# --- a stalled stderr -----------------------------------------------------------------


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "captured"])
def test_a_stalled_stderr_does_not_delay_the_supervisor_s_kill(local, capture):
    """With its stderr a full pipe nobody reads, a holder whose lease is revoked
    still stops its child at once; the waiting node then runs alone. Captured
    (--capture-output), the child chatters on both streams, and leaderrun's
    stdout is stalled too: the relay must not hold up the kill either."""
    with stalled_pipe() as stderr, stalled_pipe() as stdout:
        holder, token = local.holder(
            *(("--capture-output", "64k") if capture else ()),
            stderr=stderr,
            stdout=stdout if capture else subprocess.DEVNULL,
            job=("--chatter",) if capture else (),
        )
        contender = local.start("--wait", "-vv")
        wait_until(lambda: "is held; retrying" in local.stderr(contender), "waits")
        fault_s = boottime()
        revoked = local.operator("release", "--force")
        assert revoked.returncode == 0, revoked.stderr
        wait_until(lambda: not local.timeline.running(token), "holder's child ends")
        stopped_s = boottime() - fault_s
        local.timeline.wait_start(token)
        local.timeline.check()
        assert stopped_s < KILLED_BY_S
        # Its own messages go nowhere, yet it finishes and says how it ended.
        assert holder.wait(WAIT_S) == 122
    captured = ", --capture-output, stdout stalled too" if capture else ""
    record_figure(
        f"L1 stalled stderr{captured}, lease revoked ({local.kind})",
        f"child stopped in {stopped_s:.2f}s, leaderrun exited 122",
        None,
    )


def test_a_stalled_stderr_does_not_delay_the_watchdog_s_kill(local):
    """A holder that is stopped (SIGSTOP) past its deadline with a stalled stderr:
    its watchdog still stops the child before anyone else may start one."""
    with stalled_pipe() as stderr:
        holder, token = local.holder(stderr=stderr)
        contender = local.start("--wait", "-vv")
        wait_until(lambda: "is held; retrying" in local.stderr(contender), "waits")
        fault_s = boottime()
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            nxt = local.timeline.wait_start(token)
            local.timeline.check()
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        assert holder.wait(WAIT_S) == 122
    record_figure(
        f"L2 stalled stderr, SIGSTOP ({local.kind})",
        "watchdog stopped the child; one new holder",
        nxt.start_s - fault_s,
    )


def test_a_stalled_stderr_leaves_leaderrun_writing_from_no_thread_but_one(pg_local):
    """Even at -vv on a stalled pipe, at most one thread of leaderrun (its log
    writer) waits in write(2): the main thread and the renewal thread never do."""
    with stalled_pipe() as stderr:
        holder, _ = pg_local.holder("-vv", stderr=stderr)
        time.sleep(3 * TIMING.renew_interval_s)  # several renewals, each logged
        writers = threads_in_syscall(holder.pid, SYSCALL_WRITE)
        assert holder.poll() is None
        assert len(writers) <= 1, f"threads blocked writing: {writers}"
        assert holder.pid not in writers, "the main thread is blocked in write(2)"


# --- the watchdog ---------------------------------------------------------------------


def test_pkill_leaderrun_leaves_the_watchdog(pg_local):
    """The watchdog does not answer to leaderrun's name, and TERM, INT and HUP do
    not end it: `pkill leaderrun` cannot take it with leaderrun; only leaderrun's
    own end (the pipe closing) does, and a kill -9 of leaderrun still stops the
    job's whole group."""
    holder, token = pg_local.holder(job=("--grandchildren", "1"))
    watchdog = watchdog_of(holder)
    comm = Path(f"/proc/{watchdog}/comm").read_text().strip()
    assert "leaderrun" not in comm, f"pkill leaderrun would match {comm!r}"
    matched = subprocess.run(
        ["pgrep", "leaderrun"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert str(watchdog) not in matched
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(watchdog, signum)
    time.sleep(0.5)  # an ignored signal has no event to wait for
    assert not pid_gone(watchdog), "the watchdog died of a terminal signal"
    assert len(pg_local.timeline.running(token)) == 2
    os.kill(holder.pid, signal.SIGKILL)  # `pkill -9 leaderrun`
    wait_until(lambda: not pg_local.timeline.running(token), "the group is stopped")
    wait_until(lambda: pid_gone(watchdog), "the watchdog exits")
    record_figure(
        "L4 pkill leaderrun (TERM, INT, HUP)",
        f"watchdog ({comm}) lives on; after kill -9 it stopped the group",
        None,
    )


def test_leaderrun_says_loudly_when_its_watchdog_dies(pg_local):
    """A watchdog killed mid-run is noticed at once and reported; with the default
    mode the run goes on, with --watchdog required the command is stopped."""
    holder, token = pg_local.holder()
    os.kill(watchdog_of(holder), signal.SIGKILL)
    wait_until(lambda: "watchdog" in pg_local.stderr(holder), "the death reported")
    assert "died" in pg_local.stderr(holder)
    assert pg_local.timeline.running(token), "the default mode goes on without it"
    holder.send_signal(signal.SIGTERM)
    assert holder.wait(WAIT_S) == 128 + signal.SIGTERM

    strict, strict_token = pg_local.holder("--watchdog", "required")
    os.kill(watchdog_of(strict), signal.SIGKILL)
    assert strict.wait(WAIT_S) == 125, pg_local.stderr(strict)
    assert not pg_local.timeline.running(strict_token)
    assert "watchdog" in pg_local.stderr(strict)
    record_figure(
        "L5 the watchdog is killed",
        "reported at once; with --watchdog required the child is stopped, exit 125",
        None,
    )


# --- a failure just after the child started -------------------------------------------


def job_processes(local) -> list[int]:
    """Every process of this test's job, whether or not it recorded its start yet."""
    mark = str(local.timeline.path).encode()
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and mark in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


@pytest.mark.parametrize("fault", ["pidfd", "thread"])
def test_a_failure_after_the_child_started_stops_it_and_releases(local, fault):
    """pidfd_open failing (EMFILE) or the renewal thread unable to start, just
    after the command started: its group is stopped, the lease released, exit 125."""
    proc = local.start(
        job=("--grandchildren", "1"), launcher=(sys.executable, POSTSPAWN, fault)
    )
    assert proc.wait(WAIT_S) == 125, local.stderr(proc)
    wait_until(lambda: not job_processes(local), "the job's processes are gone")
    status = local.operator("status")
    assert status.returncode == 3, f"the lease is still held:\n{status.stdout}"
    assert "after the command started" in local.stderr(proc)
    record_figure(
        f"L6 {fault} fails after spawn ({local.kind})",
        "group stopped, lease released, exit 125",
        None,
    )


# --- a setuid child -------------------------------------------------------------------

SETUID_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <unistd.h>
int main(void) {
    uid_t u = geteuid();
    if (setresuid(u, u, u) != 0) { perror("setresuid"); return 1; }
    printf("ready %d\n", (int) getpid());
    fflush(stdout);
    for (;;) pause();
}
"""


@pytest.fixture
def setuid_program(tmp_path):
    """A program that is setuid `nobody` and drops every uid to it, like sudo's
    command: a process that a leaderrun without CAP_KILL may not signal."""
    gcc = shutil.which("gcc")
    if gcc is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("gcc is missing: CI machines have it")
        pytest.skip("gcc is missing")
    if os.geteuid() != 0:
        pytest.skip("making a setuid program needs root")
    source = tmp_path / "setuid.c"
    source.write_text(SETUID_C)
    program = tmp_path / "setuid-nobody"
    subprocess.run([gcc, "-o", str(program), str(source)], check=True)
    shutil.chown(program, "nobody")
    program.chmod(0o4755)
    return program


def test_a_child_leaderrun_may_not_signal_is_reported_in_one_line(
    pg_dsn, lock_name, setuid_program, tmp_path
):
    """A setuid child that leaderrun (root without CAP_KILL here, like a non-root
    user under sudo) may not signal: leaderrun warns at start, and when its lease
    is revoked it says in one line which process it cannot stop and exits 125
    instead of spinning while the lease runs out."""
    argv = [
        "setpriv",
        "--bounding-set=-kill",
        "--inh-caps=-kill",
        str(Path(sys.executable).with_name("leaderrun")),
        "--dsn",
        pg_dsn,
        "--lock-id",
        lock_name,
        "--lease-duration",
        "4s",
        "--",
        str(setuid_program),
    ]
    # stderr to a file: the child, which outlives leaderrun, keeps a pipe open.
    stderr_path = tmp_path / "leaderrun.stderr"
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
        )
    child = None
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        child = int(ready[1])
        revoke = subprocess.run(
            [
                str(Path(sys.executable).with_name("leaderrun")),
                "release",
                "--force",
                "--dsn",
                pg_dsn,
                "--lock-id",
                lock_name,
            ],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
        assert revoke.returncode == 0, revoke.stderr
        status = proc.wait(WAIT_S)
        stderr = stderr_path.read_text()
        assert status == 125, stderr
        assert "setuid" in stderr
        assert f"pid {child}" in stderr
        cannot = [line for line in stderr.splitlines() if "cannot stop" in line]
        assert len(cannot) == 1, stderr
        record_figure(
            "L7 setuid child leaderrun may not signal",
            "warned at start; one line naming it; exit 125, lease left to expire",
            None,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        if child is not None:  # the test itself has CAP_KILL
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
