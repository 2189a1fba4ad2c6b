"""The watchdog process as a user sees it: on by default, off by flag or variable."""

from __future__ import annotations

import sys

import pytest

from tests.acceptance.conftest import FAST

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
    ],
    ids=["default", "flag-off", "env-off", "flag-wins"],
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
