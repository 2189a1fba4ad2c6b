"""The watchdog process, driven directly in a fresh interpreter per scenario.

A fresh interpreter, because a watchdog that fires signals every descendant of
the process that started it: that must not be pytest. Each scenario starts a
process group (``sleep``), a watchdog armed on it, does one thing, and prints
what happened to the group as JSON. The end-to-end case (leaderrun SIGSTOPped
for two leases) is in tests/faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from leaderrun.watchdog import _MESSAGE, Watchdog

pytestmark = pytest.mark.slow

SCENARIO = textwrap.dedent(
    """
    import json, os, select, signal, subprocess, sys, time
    from leaderrun.clock import boottime
    from leaderrun.procfs import descendants
    from leaderrun.watchdog import Watchdog

    how = sys.argv[1]
    watchdog = Watchdog(kill_grace_s=0.5)
    watchdog.start()
    ignore = how == "ignores-term"
    script = "import signal, time\\n"
    if ignore:
        script += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    script += "print('ready', flush=True)\\ntime.sleep(60)\\n"
    child = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE
    )
    child.stdout.readline()
    started = boottime()
    watchdog.arm(child.pid, started + 60)
    result = {"watchdog_is_not_our_child": True}
    result["watchdog_is_not_our_child"] = descendants(os.getpid()) == [child.pid]
    if how in ("deadline", "ignores-term"):
        watchdog.feed(started + 0.3)
        child.wait(timeout=10)  # we do not feed it again: as if we were stopped
    elif how == "fed":
        for _ in range(10):
            watchdog.feed(boottime() + 0.3)
            time.sleep(0.1)
    elif how == "disarmed":
        watchdog.feed(started + 0.3)
        watchdog.disarm()
        time.sleep(1.0)
    elif how == "closed":
        watchdog.feed(started + 60)
        watchdog.close()  # as when leaderrun is killed: EOF without a disarm
        child.wait(timeout=10)
    result["returncode"] = child.poll()
    result["after_s"] = boottime() - started
    if child.poll() is None:
        child.kill()
        child.wait()
    watchdog.close()
    print(json.dumps(result))
    """
)


def run(how: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO, how],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_an_unfed_deadline_stops_the_group_with_sigterm():
    """Not moved, the deadline passes: SIGTERM, just after it (WATCHDOG_LATE_S)."""
    result = run("deadline")
    assert result["returncode"] == -15
    assert 0.3 <= float(str(result["after_s"])) < 5.0
    assert result["watchdog_is_not_our_child"] is True
    assert "missed its kill deadline" in str(result["stderr"])


def test_a_group_ignoring_sigterm_gets_sigkill_after_the_grace():
    """SIGTERM ignored: SIGKILL after the kill grace (0.5 s here)."""
    result = run("ignores-term")
    assert result["returncode"] == -9
    assert 0.8 <= float(str(result["after_s"])) < 6.0


def test_a_deadline_kept_moving_never_fires():
    """Fed every 0.1 s with now + 0.3 s, the watchdog leaves the group alone."""
    result = run("fed")
    assert result["returncode"] is None
    assert result["stderr"] == ""


def test_disarmed_it_never_fires():
    """After disarm, a passed deadline means nothing."""
    result = run("disarmed")
    assert result["returncode"] is None


def test_the_pipe_closing_without_a_disarm_kills_the_group():
    """leaderrun died (EOF, no disarm): the group is SIGKILLed at once."""
    result = run("closed")
    assert result["returncode"] == -9
    assert float(str(result["after_s"])) < 5.0


def test_a_watchdog_that_stopped_reading_never_blocks_the_supervisor():
    """With the pipe full (the watchdog stopped), feeding returns at once; only
    the newest deadline waits, and goes out, after what was sent before, as soon
    as there is room."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    filler = 0
    try:
        while True:
            os.write(write_fd, _MESSAGE.pack(2, 0, 1.0))
            filler += 1
    except BlockingIOError:
        pass
    watchdog = Watchdog(kill_grace_s=0.5)
    watchdog._write_fd = write_fd
    started = time.monotonic()
    for deadline_s in (10.0, 11.0, 12.0):
        watchdog.feed(deadline_s)
    watchdog.stopping(20.0)
    assert time.monotonic() - started < 0.5
    for _ in range(filler):
        os.read(read_fd, _MESSAGE.size)
    watchdog.feed(12.0)  # the same deadline: only what waited goes out
    sent = [_MESSAGE.unpack(os.read(read_fd, _MESSAGE.size)) for _ in range(2)]
    assert sent == [(2, 0, 12.0), (3, 0, 20.0)]
    watchdog.close()
    os.close(read_fd)


def test_without_pidfds_the_watchdog_still_runs_and_its_death_is_seen(monkeypatch):
    """On a kernel without pidfds (ENOSYS) the watchdog is not given up: whether
    it died is read from /proc instead."""

    def no_pidfds(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    watchdog = Watchdog(kill_grace_s=0.5)
    watchdog.start()
    try:
        assert watchdog.pid is not None
        assert watchdog.pidfd == -1
        assert not watchdog.died()
        os.kill(watchdog.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not watchdog.died():
            assert time.monotonic() < deadline, "the death was never seen"
            time.sleep(0.01)
    finally:
        watchdog.close()
