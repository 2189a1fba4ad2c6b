"""Cron guards end to end: --once-per, --min-hold, --max-runtime and the history.

Several real leaderrun processes against the real PostgreSQL, as identical cron
lines on several nodes would start them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from leaderrun.slots import OncePer, Window
from leaderrun.views import iso_utc
from tests.acceptance.conftest import (
    FAST,
    Leaderrun,
    child,
    read_rest,
    readline,
)
from tests.helpers.command import run as leaderrun_cli
from tests.helpers.processes import pid_gone

pytestmark = [pytest.mark.pg, pytest.mark.slow]

HOUR_S = 3600


def history(leaderrun: Leaderrun, *args: str) -> subprocess.CompletedProcess[str]:
    """``leaderrun history`` for this test's lock."""
    return leaderrun.operator("history", *args)


def runs(leaderrun, limit: int = 100) -> list[dict[str, Any]]:
    result = history(leaderrun, "--json", "--limit", str(limit))
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def mid_window_offset_s(period_s: int) -> int:
    """An offset that puts now in the middle of its window, far from both ends.

    A test that starts near a window boundary would otherwise see two windows.
    """
    return int(time.time() - period_s / 2) % period_s


def test_once_per_runs_the_job_once_across_skewed_starts(leaderrun, tmp_path):
    """Six nodes whose cron fires over several seconds: one run, five skips (75)."""
    ran = tmp_path / "ran"
    offset_s = mid_window_offset_s(HOUR_S)
    hourly = OncePer(Window(HOUR_S, offset_s))
    window = iso_utc(datetime.fromtimestamp(hourly.slot_at(time.time()).start_s, UTC))
    args = ("--once-per", "1h", "--once-per-offset", f"{offset_s}s", "--")
    job = ("sh", "-c", f'echo "$LEADERRUN_WINDOW" >> {ran}')
    procs = []
    for _ in range(6):
        procs.append(leaderrun.start(*args, *job))
        time.sleep(0.6)  # a late cron on each next node; every job is long done
    codes = sorted(proc.wait(timeout=60) for proc in procs)
    assert codes == [0, 75, 75, 75, 75, 75]
    assert ran.read_text().splitlines() == [window]
    # A node with --wait gives up at once too: the window cannot free up.
    started = time.monotonic()
    assert leaderrun.run(*args[:-1], "--wait", "--", *job).returncode == 75
    assert time.monotonic() - started < 10
    [run] = runs(leaderrun)
    assert (run["window"], run["outcome"]) == (window, "ok")


# SQLite's clock is the host's as each process sees it: faketime moves the
# "database" clock along with the node's, so there is nothing to ignore there.
@pytest.mark.stores("postgres")
@pytest.mark.parametrize("skew", ["-2h", "+1d", "+59m"])
def test_once_per_ignores_a_node_whose_clock_is_off(
    leaderrun, faketime, tmp_path, skew
):
    """A node whose clock is hours off still sees the database's window: 75."""
    ran = tmp_path / "ran"
    offset = f"{mid_window_offset_s(HOUR_S)}s"
    args = ("--once-per", "1h", "--once-per-offset", offset, "--")
    job = ("sh", "-c", f"date -u +%FT%TZ >> {ran}")
    assert leaderrun.run(*args, *job).returncode == 0
    skewed_env = {**os.environ, **faketime(skew)}
    skewed = subprocess.run(
        leaderrun.argv(*args, *job),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=skewed_env,
    )
    assert skewed.returncode == 75, skewed.stderr
    assert len(ran.read_text().splitlines()) == 1
    # The shifted clock is real for the child: a skewed node that did run
    # would have written another date.
    probe = subprocess.run(
        ["date", "-u", "+%s"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=skewed_env,
    )
    assert abs(int(probe.stdout) - time.time()) > 3000


def test_once_per_skip_says_why_with_v(leaderrun):
    offset = f"{mid_window_offset_s(HOUR_S)}s"
    args = ("--once-per", "1h", "--once-per-offset", offset)
    assert leaderrun.run(*args, "--", "true").returncode == 0
    result = leaderrun.run(*args, "-v", "--", "true")
    assert result.returncode == 75
    assert "already ran on " in result.stderr
    assert "in the slot of " in result.stderr
    assert "(--once-per 1h --once-per-offset " in result.stderr


def test_once_per_retry_failed_reruns_a_failed_window(leaderrun):
    offset = f"{mid_window_offset_s(HOUR_S)}s"
    args = ("--once-per", "1h", "--once-per-offset", offset)
    assert leaderrun.run(*args, "--", "false").returncode == 1
    assert leaderrun.run(*args, "--", "true").returncode == 75
    assert leaderrun.run(*args, "--retry-failed", "--", "true").returncode == 0
    assert leaderrun.run(*args, "--retry-failed", "--", "true").returncode == 75
    assert [r["outcome"] for r in runs(leaderrun)] == ["ok", "failed"]


def test_min_hold_keeps_a_late_node_from_rerunning_a_short_job(leaderrun, tmp_path):
    """A 1 s job with --min-hold 6s: a node 3 s later skips; after the hold, runs."""
    ran = tmp_path / "ran"
    job = ("sh", "-c", f"echo $LEADERRUN_FENCING_TOKEN >> {ran}; echo go; sleep 1")
    first = leaderrun.start("--min-hold", "6s", "--", *job)
    assert readline(first.stdout) == "go\n"
    began = time.monotonic()
    assert first.wait(timeout=30) == 0  # the holder is gone: nothing keeps it alive
    time.sleep(max(0.0, began + 3 - time.monotonic()))
    late = leaderrun.run("--min-hold", "6s", "-v", "--", *job)
    assert late.returncode == 75
    assert "is held by" in late.stderr
    assert ran.read_text().split() == ["1"]
    # The hold ends in database time; a waiting node then gets the lock.
    after = leaderrun.run("--wait", "--wait-timeout", "30s", "--", *job)
    assert after.returncode == 0
    assert ran.read_text().split() == ["1", "2"]
    newest, oldest = runs(leaderrun)
    gap_s = (
        datetime.fromisoformat(newest["started_at"])
        - datetime.fromisoformat(oldest["started_at"])
    ).total_seconds()
    assert gap_s >= 6


@pytest.mark.timing
@pytest.mark.parametrize("ignore_term", [False, True])
def test_max_runtime_stops_the_group_and_exits_124(leaderrun, ignore_term):
    """After --max-runtime the whole group is stopped (SIGKILL if need be): 124."""
    flags = ["--grandchild", *(["--ignore-term"] if ignore_term else [])]
    # From before leaderrun starts, so that a slow read of the child's first
    # lines cannot make the stop look early.
    started = time.monotonic()
    proc = leaderrun.start(*FAST, "--max-runtime", "1s", "--", *child(*flags))
    pids = [int(readline(proc.stdout).split()[1]) for _ in range(2)]
    assert proc.wait(timeout=30) == 124
    took_s = time.monotonic() - started
    assert all(pid_gone(pid) for pid in pids)
    # 1 s, plus the kill grace (lease/6 = 0.67 s) when SIGTERM is ignored, plus
    # leaderrun's start.
    assert 1.0 <= took_s < 1 + 0.67 + 4
    err = read_rest(proc.stderr)
    assert "--max-runtime" in err
    # Once the stop began, renewing ended: no renewal was sent (and refused) in a
    # loop through the kill grace, which once filled this very pipe and hung.
    assert "after the kill deadline" not in err
    [run] = runs(leaderrun)
    expected = 128 + (signal.SIGKILL if ignore_term else signal.SIGTERM)
    assert (run["outcome"], run["exit_status"]) == ("timeout", expected)
    # The lease was released: the next run needs no wait.
    assert leaderrun.run(*FAST, "--", "true").returncode == 0


def test_history_records_every_outcome_including_lost(leaderrun):
    """ok, failed, killed, timeout, and lost for a holder killed with kill -9."""
    assert leaderrun.run(*FAST, "--", "true").returncode == 0
    assert leaderrun.run(*FAST, "--", "sh", "-c", "exit 3").returncode == 3
    assert leaderrun.run(*FAST, "--", "sh", "-c", "kill -KILL $$").returncode == 137
    timed_out = leaderrun.run(*FAST, "--max-runtime", "0.5s", "--", "sleep", "30")
    assert timed_out.returncode == 124
    holder = leaderrun.start(*FAST, "--", *child())
    child_pid = int(readline(holder.stdout).split()[1])
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not pid_gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    # Before anyone takes the lock again, history already calls the run lost
    # once its lease has run out (4 s).
    time.sleep(4.5)
    assert runs(leaderrun, 1)[0]["outcome"] == "lost"
    assert leaderrun.run(*FAST, "--", "true").returncode == 0
    found = runs(leaderrun)
    assert [(r["token"], r["outcome"], r["exit_status"]) for r in found] == [
        (6, "ok", 0),
        (5, "lost", None),
        (4, "timeout", 143),
        (3, "killed", 137),
        (2, "failed", 3),
        (1, "ok", 0),
    ]
    lost = found[1]
    assert lost["finished_at"] is not None  # closed by the next holder
    assert lost["duration_s"] < 4  # its last renewal, not when it was noticed
    assert {r["host"] for r in found} == {found[0]["host"]}
    assert all(r["lock"] == leaderrun.lock for r in found)
    text = history(leaderrun)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["STARTED", "(UTC)", "LOCK"]
    assert [line.split()[6] for line in lines[1:]] == [
        "ok",
        "lost",
        "timeout",
        "killed",
        "failed",
        "ok",
    ]


def test_history_is_pruned_to_history_keep(leaderrun, lease_admin):
    for _ in range(5):
        assert leaderrun.run(*FAST, "--history-keep", "3", "--", "true").returncode == 0
    assert [r["token"] for r in runs(leaderrun)] == [5, 4, 3]
    assert lease_admin.runs_recorded(leaderrun.lock) == 3


def test_window_is_in_the_child_environment_only_with_once_per(leaderrun):
    plain = leaderrun.run("--", "env")
    assert "LEADERRUN_WINDOW=" not in plain.stdout
    offset_s = mid_window_offset_s(60)
    windowed = leaderrun.run(
        "--once-per", "1m", "--once-per-offset", f"{offset_s}s", "--", "env"
    )
    assert windowed.returncode == 0, windowed.stderr
    [line] = [
        x for x in windowed.stdout.splitlines() if x.startswith("LEADERRUN_WINDOW=")
    ]
    window = datetime.fromisoformat(line.split("=", 1)[1])
    assert window.tzinfo is not None
    assert window.timestamp() % 60 == offset_s
    assert window.timestamp() <= time.time() < window.timestamp() + 60 + 5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--once-per-offset", "2h"], "--once-per-offset needs --once-per"),
        (["--once-per", "1h", "--once-per-offset", "1h"], "must be shorter than"),
        (["--max-runtime", "never"], "--max-runtime 'never' is not a duration"),
        (["--history-keep", "0"], "--history-keep 0 must be at least 1"),
    ],
)
def test_bad_guards_exit_64_in_one_line(args, needle):
    result = leaderrun_cli("--lock-id", "x", *args, "--", "true")
    assert result.returncode == 64
    assert needle in result.stderr
    assert result.stderr.count("\n") == 1


def test_history_of_an_unreachable_database_exits_69():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "leaderrun",
            "history",
            "--dsn",
            "host=127.0.0.1 port=1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 69
    assert result.stderr.startswith("leaderrun: cannot connect")
    assert "Traceback" not in result.stderr


def test_status_shows_the_last_run(leaderrun):
    """status (text and JSON) carries each lock's newest run: when, where, how."""
    assert leaderrun.run(*FAST, "--", "sh", "-c", "exit 4").returncode == 4
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "leaderrun",
            "status",
            "--dsn",
            leaderrun.dsn,
            "--lock-id",
            leaderrun.lock,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stderr  # free again
    [lock] = json.loads(result.stdout)["locks"]
    run = lock["last_run"]
    assert (run["token"], run["outcome"], run["exit_status"]) == (1, "failed", 4)
    assert run["host"] == os.uname().nodename
    assert run["duration_s"] >= 0
    text = leaderrun.operator("status")
    header, row = text.stdout.splitlines()
    assert "LAST RUN (UTC)" in header
    assert " failed " in row
