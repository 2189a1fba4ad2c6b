"""``leaderrun check``'s verdicts, pure: a lock's status and runs, ``now`` given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from leaderrun.checks import CheckState, Expectation, cadence_of, check
from leaderrun.runs import RunRecord
from leaderrun.slots import OncePer, Schedule
from leaderrun.views import LockState, LockStatus

NOW = datetime(2026, 12, 6, 3, 0, 30, tzinfo=UTC)
DAILY = OncePer(Schedule("0 2 * * *"))
CADENCE = {
    "schedule": "0 2 * * *",
    "tz": "UTC",
    "early_s": 120.0,
    "retry_failed": False,
}


def status(cadence=CADENCE, last_ok_at=None) -> LockStatus:
    return LockStatus(
        lock="backup", name="backup", key=1, state=LockState.free, holder=None,
        host=None, pid=None, token=3, acquired_at=None, renewed_at=None,
        expires_at=None, expires_in_s=None, renewed_ago_s=None, command=None,
        cadence=cadence, last_ok_at=last_ok_at,
    )  # fmt: skip


def run(
    outcome: str,
    slot: datetime | None,
    *,
    exit_status=None,
    ago_s=3000.0,
    duration_s=60.0,
) -> RunRecord:
    started = NOW - timedelta(seconds=ago_s)
    finished = None if outcome == "running" else started + timedelta(seconds=duration_s)
    return RunRecord(
        lock_key=1, lock_name="backup", token=3, holder="h", host="node-b", pid=7,
        command="./backup.sh", window_start=slot, started_at=started,
        finished_at=finished,
        exit_status=exit_status, outcome=outcome, duration_s=duration_s,
    )  # fmt: skip


TODAY = datetime(2026, 12, 6, 2, 0, tzinfo=UTC)
YESTERDAY = TODAY - timedelta(days=1)


def verdict(
    found: LockStatus, runs: list[RunRecord], **expect
) -> tuple[CheckState, str]:
    result = check(found, runs, NOW, Expectation(**expect))
    return result.state, result.line()


def test_today_s_slot_ran_ok():
    state, line = verdict(
        status(last_ok_at=NOW - timedelta(minutes=50)), [run("ok", TODAY)]
    )
    assert state is CheckState.OK
    assert line == (
        "LEADERRUN OK - backup: the slot of 2026-12-06T02:00:00+00:00 ran ok"
        " | age=3000s;; duration=60.0s"
    )


def test_a_missed_slot_is_critical_and_named():
    state, line = verdict(
        status(last_ok_at=NOW - timedelta(days=1)), [run("ok", YESTERDAY)]
    )
    assert state is CheckState.CRITICAL
    assert "slot 2026-12-06T02:00:00+00:00 missed: no run started" in line


def test_within_the_grace_yesterday_s_run_still_counts():
    state, _ = verdict(
        status(last_ok_at=NOW - timedelta(days=1)), [run("ok", YESTERDAY)], grace_s=7200
    )
    assert state is CheckState.OK


@pytest.mark.parametrize(
    ("outcome", "exit_status", "text"),
    [
        ("failed", 2, "the last run failed (exit 2) on node-b"),
        ("lost", None, "the last run lost on node-b"),
        ("timeout", 143, "the last run timeout (exit 143) on node-b"),
    ],
)
def test_a_slot_whose_run_did_not_succeed_is_critical(outcome, exit_status, text):
    state, line = verdict(status(), [run(outcome, TODAY, exit_status=exit_status)])
    assert state is CheckState.CRITICAL
    assert f"slot 2026-12-06T02:00:00+00:00: {text}" in line


def test_running_is_ok_until_longer_than_expected():
    going = run("running", TODAY, ago_s=1800, duration_s=1800)
    assert verdict(status(), [going])[0] is CheckState.OK
    state, line = verdict(status(), [going], max_running_s=600)
    assert state is CheckState.WARNING
    assert "running on node-b for 30m00s, longer than the 10m00s expected" in line


def test_never_ran_is_critical():
    assert verdict(status(), [])[0] is CheckState.CRITICAL


def test_without_a_cadence_or_max_age_it_cannot_tell():
    state, line = verdict(status(cadence=None), [run("ok", None)])
    assert state is CheckState.UNKNOWN
    assert "give --max-age" in line


@pytest.mark.parametrize(
    ("age_h", "state"),
    [(20, CheckState.OK), (26.2, CheckState.WARNING), (27, CheckState.CRITICAL)],
)
def test_max_age_and_grace_set_warning_and_critical(age_h, state):
    ok_at = NOW - timedelta(hours=age_h)
    found, line = verdict(
        status(cadence=None, last_ok_at=ok_at), [run("ok", None, ago_s=age_h * 3600)],
        max_age_s=26 * 3600, grace_s=1800,
    )  # fmt: skip
    assert found is state
    assert f"age={age_h * 3600:.0f}s;93600;95400" in line


def test_max_age_with_a_failed_last_run_is_critical():
    found, line = verdict(
        status(cadence=None, last_ok_at=NOW - timedelta(hours=1)),
        [run("failed", None, exit_status=1)],
        max_age_s=86400,
    )
    assert found is CheckState.CRITICAL
    assert "the last run failed (exit 1)" in line


def test_the_recorded_cadence_reads_back():
    recorded = {"once_per_s": 86400.0, "offset_s": 7200.0, "tz": "Europe/Berlin",
                "early_s": 60.0, "retry_failed": True}  # fmt: skip
    once_per = cadence_of(recorded)
    assert once_per is not None
    assert once_per.flags() == "--once-per 1d --once-per-offset 2h --tz Europe/Berlin"
    assert (once_per.early_s, once_per.retry_failed) == (60.0, True)
    assert cadence_of(None) is None


def test_json_document():
    result = check(status(last_ok_at=NOW), [run("ok", TODAY)], NOW, Expectation())
    document = result.document()
    assert (document["state"], document["exit_code"]) == ("OK", 0)
    assert document["due_slot"] == "2026-12-06T02:00:00.000Z"
    assert document["last_run"]["slot"] == "2026-12-06T02:00:00.000Z"


@pytest.mark.parametrize("recorded", [{"schedule": "61 * * * *"}, {"offset_s": 1.0}])
def test_a_recorded_cadence_that_cannot_be_read_is_unknown(recorded):
    state, line = verdict(status(cadence=recorded), [run("ok", TODAY)])
    assert state is CheckState.UNKNOWN
    assert line.endswith("give --max-age | duration=60.0s")
