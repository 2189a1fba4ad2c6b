"""``leaderrun check`` against the real stores: the dead-man's switch's verdicts.

A monitoring plugin: exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, and one line
on stdout with performance data after ``|``.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.acceptance.conftest import FAST, Leaderrun, LeaseAdmin, readline

pytestmark = [pytest.mark.pg, pytest.mark.slow]

MINUTELY = ("--schedule", "*/1 * * * *")


def check(leaderrun: Leaderrun, *args: str) -> tuple[int, str]:
    result = leaderrun.operator("check", *args)
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1
    return result.returncode, result.stdout.strip()


def test_ok_after_a_success_then_critical_once_a_slot_is_missed(
    leaderrun, lease_admin: LeaseAdmin
):
    assert leaderrun.run(*MINUTELY, "--", "true").returncode == 0
    code, line = check(leaderrun)
    assert code == 0, line
    assert line.startswith(f"LEADERRUN OK - {leaderrun.lock}: the slot of ")
    assert " | age=" in line
    # As if that run had happened two minutes ago: the slots since went by.
    lease_admin.age_run(leaderrun.lock, 120)
    code, line = check(leaderrun, "--grace", "1s")
    assert code == 2, line
    assert line.startswith(f"LEADERRUN CRITICAL - {leaderrun.lock}: slot ")
    assert "missed: no run started" in line
    document = json.loads(leaderrun.operator("check", "--grace", "1s", "--json").stdout)
    assert (document["state"], document["exit_code"]) == ("CRITICAL", 2)


def test_critical_after_a_failed_run(leaderrun):
    assert leaderrun.run(*MINUTELY, "--", "sh", "-c", "exit 3").returncode == 3
    code, line = check(leaderrun)
    assert code == 2, line
    assert "the last run failed (exit 3) on " in line


def test_critical_after_the_holder_was_killed(leaderrun):
    """kill -9 of the running node: its run is lost once its lease runs out."""
    proc = leaderrun.start(*FAST, *MINUTELY, "--", "sh", "-c", "echo up; sleep 60")
    assert readline(proc.stdout) == "up\n"
    assert check(leaderrun)[0] == 0  # running
    os.kill(proc.pid, signal.SIGKILL)
    deadline_s = time.monotonic() + 20
    while (found := check(leaderrun))[0] == 0 and time.monotonic() < deadline_s:
        time.sleep(0.5)
    code, line = found
    assert code == 2, line
    assert "the last run lost on " in line


def test_max_age_warns_then_is_critical(leaderrun, lease_admin: LeaseAdmin):
    assert leaderrun.run("--", "true").returncode == 0
    assert check(leaderrun)[0] == 3  # no cadence recorded: say what to give
    code, line = check(leaderrun, "--max-age", "1h", "--grace", "30m")
    assert code == 0, line
    assert ";3600;5400" in line


def test_unknown_when_the_database_is_down(leaderrun):
    result = leaderrun.operator(
        "check", "--dsn", "host=127.0.0.1 port=1 connect_timeout=2"
    )
    assert result.returncode == 3
    assert result.stdout.startswith(
        f"LEADERRUN UNKNOWN - {leaderrun.lock}: cannot connect"
    )
