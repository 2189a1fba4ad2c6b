"""Once per slot, end to end: early starts, --schedule on a skewed fleet, --tz, --splay.

Real leaderrun processes on the real stores, as a fleet's identical crontabs
start them. The slot arithmetic itself is tests/unit/test_slots.py's.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from leaderrun.slots import OncePer, Schedule
from tests.acceptance.conftest import Leaderrun, LeaseAdmin, read_rest, wait_for_line

pytestmark = [pytest.mark.pg, pytest.mark.slow]

DAY_S = 86400


def slot_job(path: Path, node: str = "") -> tuple[str, ...]:
    """A job that appends its slot (and the node's name) to ``path``."""
    return ("sh", "-c", f'echo "$LEADERRUN_SLOT {node}" >> {path}')


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def runs(leaderrun: Leaderrun) -> list[dict[str, Any]]:
    result = leaderrun.operator("history", "--json")
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def test_a_start_just_before_the_day_s_edge_runs_for_the_new_day(
    leaderrun, lease_admin: LeaseAdmin, tmp_path
):
    """Yesterday's slot ran; today's firing reaches the store a moment before
    today's edge (a node clock a little ahead, a fast start). By the edge alone
    it fell into yesterday's window, already run: every node skipped and the
    day's job did not run. It counts for today's slot: it runs, exactly once."""
    ran = tmp_path / "ran"
    # A real run leaves the lock's row; its slot is then set to yesterday's
    # edge, as if the run had happened then.
    assert leaderrun.run("--once-per", "1d", "--", "true").returncode == 0
    edge_s = math.ceil(time.time()) + 2  # what the store's now is a moment from now
    args = ("--once-per", "1d", "--once-per-offset", f"{edge_s % DAY_S}s", "--")
    lease_admin.set_slot(leaderrun.lock, edge_s - DAY_S)

    early = leaderrun.run(*args, *slot_job(ran))
    assert early.returncode == 0, early.stderr
    today = datetime.fromtimestamp(edge_s, UTC)
    assert lines(ran) == [f"{today.isoformat()} "]
    started = datetime.fromisoformat(runs(leaderrun)[0]["started_at"])
    assert started < today, "the start must reach the store before the edge"

    # After the edge, a late node's firing belongs to the same slot: it skips.
    time.sleep(max(0.0, edge_s + 0.3 - time.time()))
    late = leaderrun.run(*args, *slot_job(ran))
    assert late.returncode == 75, late.stderr
    assert len(lines(ran)) == 1


@pytest.mark.stores("postgres")
@pytest.mark.timeout(300)  # waits for three minute boundaries of the clock
def test_a_schedule_runs_once_per_slot_on_a_fleet_with_a_clock_2_minutes_ahead(
    leaderrun, faketime, tmp_path
):
    """Two nodes fire ``*/1 * * * *`` at each minute: one with a true clock (its
    cron a moment early), one whose clock is 2 minutes ahead, which also fires
    again late. Three slots: one run in each, on the database's minutes."""
    ran = tmp_path / "ran"
    ahead = faketime("+120")
    args = ("--schedule", "*/1 * * * *", "--")
    slots = []
    for _ in range(3):
        minute_s = (math.floor(time.time() / 60) + 1) * 60
        slots.append(datetime.fromtimestamp(minute_s, UTC).isoformat())
        time.sleep(max(0.0, minute_s - 0.3 - time.time()))
        on_time = leaderrun.start(*args, *slot_job(ran, "true-clock"))
        skewed = leaderrun.start(*args, *slot_job(ran, "ahead"), env=ahead)
        codes = sorted(p.wait(timeout=60) for p in (on_time, skewed))
        assert codes == [0, 75]
        time.sleep(max(0.0, minute_s + 10 - time.time()))
        again = leaderrun.run(*args, *slot_job(ran, "ahead"), env=ahead)
        assert again.returncode == 75, again.stderr
    assert [line.split()[0] for line in lines(ran)] == slots
    assert [r["window"] for r in runs(leaderrun)] == [
        datetime.fromisoformat(s).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        for s in reversed(slots)
    ]


def test_the_slot_is_given_in_the_zone_and_the_lock_records_its_cadence(
    leaderrun, tmp_path
):
    """``--schedule '0 3 * * *' --tz Europe/Berlin``: the child gets the slot as
    03:00 Berlin time with its offset; status --json shows the cadence."""
    ran = tmp_path / "ran"
    flags = ("--schedule", "0 3 * * *", "--tz", "Europe/Berlin", "--retry-failed")
    assert leaderrun.run(*flags, "--", *slot_job(ran)).returncode == 0
    berlin = OncePer(Schedule("0 3 * * *"), tz="Europe/Berlin")
    expected = berlin.local(berlin.slot_at(time.time()).start_s)
    assert lines(ran) == [f"{expected.isoformat()} "]
    assert (expected.hour, expected.minute) == (3, 0)

    status = leaderrun.operator("status", "--json")
    assert status.returncode == 3, status.stderr  # free: the run is over
    (lock,) = json.loads(status.stdout)["locks"]
    assert lock["cadence"] == {
        "schedule": "0 3 * * *",
        "tz": "Europe/Berlin",
        "early_s": 120.0,
        "retry_failed": True,
    }
    # A plain run of the lock keeps the cadence of its last slotted run.
    assert leaderrun.run("--", "true").returncode == 0
    status = leaderrun.operator("status", "--json")
    assert json.loads(status.stdout)["locks"][0]["cadence"]["tz"] == "Europe/Berlin"


def test_splay_spreads_a_fleet_s_starts_over_the_interval(leaderrun, tmp_path):
    """Ten nodes started in the same instant, each on its own lock so none
    waits for another: without --splay their jobs start together; with
    ``--splay 3s`` each pauses a different time below 3 s, and the jobs'
    starts spread over about that much more."""

    def start(*flags: str) -> tuple[list[float], list[float]]:
        """The jobs' start times after the launch, and the pauses leaderrun took."""
        stamps = tmp_path / f"stamps{len(flags)}"
        job = ("sh", "-c", f"date +%s.%N >> {stamps}")
        launched_s = time.time()
        procs = [
            subprocess.Popen(
                leaderrun.argv(*flags, "-vv", "--", *job, lock=f"{leaderrun.lock}-{n}"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(10)
        ]
        errs = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 10, errs
        pauses = [
            float(m) for m in re.findall(r"splay: trying \S+ in (\S+)s", "".join(errs))
        ]
        return sorted(float(t) - launched_s for t in lines(stamps)), pauses

    together, no_pauses = start()
    splayed, pauses = start("--splay", "3s")
    assert no_pauses == []
    assert len(pauses) == 10
    # Below 3 s; the log's three significant digits may round 2.9996 up to 3.
    assert all(0 <= p <= 3 for p in pauses)
    assert max(pauses) - min(pauses) > 1.0
    assert splayed[-1] - splayed[0] > (together[-1] - together[0]) + 1.0


def test_splay_is_cancelled_by_sigterm_with_nothing_run(
    leaderrun, store_kind, tmp_path
):
    ran = tmp_path / "ran"
    proc = leaderrun.start("--splay", "1h", "-vv", "--", "touch", str(ran))
    wait_for_line(proc.stderr, "splay: trying")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 2.0
    assert "during --splay; nothing ran" in read_rest(proc.stderr)
    assert not ran.exists()
    # It never reached the store: the lock was never taken (the SQLite file
    # was not even given its tables).
    status = leaderrun.operator("status", "--json")
    if store_kind == "sqlite":
        assert status.returncode == 69
        assert "has no leader_lease table" in status.stderr
    else:
        assert status.returncode == 3, status.stderr
        assert json.loads(status.stdout)["locks"][0]["token"] is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--schedule", "0 2 * * *", "--tz", "Europe/Berlln"),
            "leaderrun: --tz 'Europe/Berlln': unknown time zone; use an IANA name",
        ),
        (
            ("--schedule", "0 2 * * *", "--once-per", "1d"),
            "leaderrun: --once-per and --schedule both given; use one",
        ),
        (
            ("--schedule", "*/5 * * * *", "--splay", "5m"),
            "leaderrun: --splay '5m' could start a run after its slot ends",
        ),
    ],
)
def test_bad_slot_flags_are_one_line_and_exit_64(leaderrun, flags, message):
    result = leaderrun.run(*flags, "--", "true")
    assert result.returncode == 64
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_a_bad_schedule_from_the_environment_is_named_by_its_variable(leaderrun):
    result = leaderrun.run("--", "true", env={"LEADERRUN_SCHEDULE": "0 2 * *"})
    assert result.returncode == 64
    assert result.stderr == (
        "leaderrun: LEADERRUN_SCHEDULE '0 2 * *': has 4 fields; give the crontab "
        "line's five (minute hour day-of-month month day-of-week), e.g. "
        "'30 2 * * *'\n"
    )
