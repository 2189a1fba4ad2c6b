"""The watchdog process as a user sees it: on by default, off by flag or variable,
and right when leaderrun is PID 1 of a container and so adopts its own watchdog."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.acceptance.conftest import FAST, child, descendants, readline
from tests.helpers.processes import pid_gone

pytestmark = [pytest.mark.pg, pytest.mark.slow]

# The child counts the processes with leaderrun's own command line, leaderrun
# excluded: the watchdog is a fork of it. It also checks that the watchdog is in
# a session of its own and is not leaderrun's child.
COUNT_WATCHDOGS = """
import os
parent = os.getppid()
def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None
def stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3])  # ppid, session
mine = cmdline(parent)
found = [int(p) for p in os.listdir("/proc") if p.isdigit()
         and int(p) != parent and cmdline(int(p)) == mine]
for pid in found:
    ppid, session = stat(pid)
    assert ppid != parent and session != stat(parent)[1], (ppid, session)
print(len(found))
"""


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, "1"),
        (("--no-watchdog",), {}, "0"),
        ((), {"LEADERRUN_WATCHDOG": "false"}, "0"),
        (("--watchdog",), {"LEADERRUN_WATCHDOG": "false"}, "1"),
        (("--watchdog", "off"), {}, "0"),
        (("--watchdog", "required"), {}, "1"),
        ((), {"LEADERRUN_WATCHDOG": "required"}, "1"),
    ],
    ids=["default", "flag-off", "env-off", "flag-wins", "off", "required", "env-req"],
)
def test_watchdog_is_on_by_default_and_can_be_turned_off(
    leaderrun, args, env, expected
):
    """One watchdog process runs beside leaderrun unless turned off; it is in its
    own session and not leaderrun's child; it leaves stdout to the child."""
    result = leaderrun.run(
        *FAST, *args, "--", sys.executable, "-c", COUNT_WATCHDOGS, env=env
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{expected}\n", "")


def as_pid_1(leaderrun, *args: str) -> subprocess.Popen[str]:
    """Start leaderrun as PID 1 of a new PID namespace, as a container's entrypoint.

    Needs root (CI runs as root); elsewhere the test skips, but never under CI.
    """
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("CI must run the PID-1 tests: needs root and unshare(1)")
        pytest.skip("needs root and unshare(1) for a PID namespace")
    proc = subprocess.Popen(
        [unshare, "--fork", "--pid", "--mount-proc", *leaderrun.argv(*args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    leaderrun.procs.append(proc)
    return proc


def test_as_pid_1_the_watchdog_is_not_taken_for_a_leftover(leaderrun):
    """PID 1 adopts the orphaned watchdog; the supervisor must not count it among
    the command's leftovers (it once warned and killed it after every run)."""
    proc = as_pid_1(leaderrun, *FAST, "--", "sh", "-c", "echo ran")
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, "ran\n", "")


def test_as_pid_1_a_paused_leaderrun_is_still_stopped_on_time(leaderrun):
    """SIGSTOP of a PID-1 leaderrun past its deadline, with a command (and its
    child) that ignore SIGTERM: the watchdog, a descendant of leaderrun here, must
    not SIGTERM itself with them and so miss the SIGKILL after the grace."""
    proc = as_pid_1(leaderrun, *FAST, "--", *child("--ignore-term", "--grandchild"))
    assert proc.stdout is not None
    for _ in range(2):
        readline(proc.stdout)  # the command and its child are ready
    [supervisor] = [p for p in descendants(proc.pid) if _ppid(p) == proc.pid]
    command = [p for p in descendants(supervisor) if _comm(p) != _comm(supervisor)]
    os.kill(supervisor, signal.SIGSTOP)
    try:
        stopped_s = time.monotonic()
        # Kill deadline 2.33 s after the last renewal, SIGKILL 0.67 s later;
        # the watchdog acts 0.1 s after each. Allow a loaded machine 3 s more.
        while not all(pid_gone(p) for p in command):
            assert time.monotonic() - stopped_s < 2.33 + 0.67 + 0.2 + 3.0, (
                "the command outlived the deadline of a stopped leaderrun"
            )
            time.sleep(0.02)
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert proc.wait(timeout=30) == 122


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
