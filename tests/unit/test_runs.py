"""The cron guards' pure core and their options; the stores' are in tests/contract."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from leaderrun.config import RawRunOptions, RunSettings, run_settings
from leaderrun.errors import ConfigError
from leaderrun.runs import (
    DEFAULT_HISTORY_KEEP,
    OncePer,
    RunEnd,
    RunOutcome,
    RunRecord,
    classify,
    format_duration_s,
    history_lines,
    iso_utc,
    window_start_s,
)

# --- windows ----------------------------------------------------------------------

periods = st.sampled_from([1.0, 60.0, 3600.0, 86400.0, 0.5, 7 * 86400.0])


@given(now_s=st.floats(0, 4e9), period_s=periods, fraction=st.floats(0, 0.999))
def test_the_window_contains_now_and_is_aligned(now_s, period_s, fraction):
    offset_s = math.floor(period_s * fraction)
    start_s = window_start_s(now_s, period_s, offset_s)
    assert start_s <= now_s < start_s + period_s
    assert (start_s - offset_s) % period_s == pytest.approx(0, abs=1e-6)


@given(now_s=st.floats(0, 4e9), period_s=periods, step_s=st.floats(0, 1e6))
def test_two_instants_share_a_window_iff_their_starts_agree(now_s, period_s, step_s):
    later_s = now_s + step_s
    same = window_start_s(now_s, period_s) == window_start_s(later_s, period_s)
    assert same == (later_s < window_start_s(now_s, period_s) + period_s)


def test_windows_with_an_offset():
    """A daily window from 02:00 UTC: 01:59 belongs to yesterday's."""
    day, two_h = 86400.0, 7200.0
    at_0159 = datetime(2026, 11, 27, 1, 59, tzinfo=UTC).timestamp()
    at_0200 = datetime(2026, 11, 27, 2, 0, tzinfo=UTC).timestamp()
    assert window_start_s(at_0200, day, two_h) == at_0200
    assert window_start_s(at_0159, day, two_h) == at_0200 - day
    assert window_start_s(at_0200 - 1e-6, day, two_h) == at_0200 - day


@pytest.mark.parametrize(
    ("period_s", "offset_s"), [(0, 0), (-1, 0), (10, 10), (10, -1)]
)
def test_window_refuses_nonsense(period_s, offset_s):
    with pytest.raises(ValueError, match="must"):
        window_start_s(100.0, period_s, offset_s)


# --- outcomes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returncode", "timed_out", "lost", "outcome"),
    [
        (0, False, False, RunOutcome.ok),
        (1, False, False, RunOutcome.failed),
        (255, False, False, RunOutcome.failed),
        (-9, False, False, RunOutcome.killed),
        (None, False, False, RunOutcome.killed),
        (-15, True, False, RunOutcome.timeout),
        (0, True, False, RunOutcome.timeout),
        (-15, False, True, RunOutcome.lost),
        (-15, True, True, RunOutcome.lost),
    ],
)
def test_classify(returncode, timed_out, lost, outcome):
    assert classify(returncode, timed_out=timed_out, lease_lost=lost) is outcome


def test_window_ok_only_for_a_window_run():
    assert RunEnd(RunOutcome.ok, 0, in_window=True).window_ok is True
    assert RunEnd(RunOutcome.timeout, 143, in_window=True).window_ok is False
    assert RunEnd(RunOutcome.ok, 0).window_ok is None


def test_iso_utc():
    assert iso_utc(None) is None
    assert iso_utc(datetime(2026, 11, 27, 2, tzinfo=UTC)) == "2026-11-27T02:00:00Z"
    assert iso_utc(datetime.fromtimestamp(0.25, UTC)) == "1970-01-01T00:00:00.250000Z"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.42, "0.42s"), (12.4, "12s"), (185, "3m05s"), (7800, "2h10m")],
)
def test_format_duration(seconds, text):
    assert format_duration_s(seconds) == text


def record(**fields) -> RunRecord:
    base = {
        "lock_key": 7,
        "lock_name": "nightly",
        "token": 3,
        "holder": "h:1:n",
        "host": "node-a",
        "pid": 1234,
        "command": "./backup.sh",
        "window_start": None,
        "started_at": datetime(2026, 11, 27, 2, 0, 1, tzinfo=UTC),
        "finished_at": datetime(2026, 11, 27, 2, 0, 3, tzinfo=UTC),
        "exit_status": 0,
        "outcome": "ok",
        "duration_s": 2.0,
    }
    return RunRecord(**{**base, **fields})


def test_history_lines_align_and_show_the_window_only_when_there_is_one():
    lines = history_lines([record(), record(token=2, outcome="lost", exit_status=None)])
    assert lines[0].split() == [
        "STARTED",
        "(UTC)",
        "LOCK",
        "TOKEN",
        "HOST",
        "PID",
        "OUTCOME",
        "EXIT",
        "DURATION",
        "COMMAND",
    ]
    assert lines[1].split() == [
        "2026-11-27",
        "02:00:01",
        "nightly",
        "3",
        "node-a",
        "1234",
        "ok",
        "0",
        "2.00s",
        "./backup.sh",
    ]
    assert lines[2].split()[6:8] == ["lost", "-"]
    assert len({line.index("./backup.sh") for line in lines[1:]}) == 1
    window = datetime(2026, 11, 27, tzinfo=UTC)
    assert "2026-11-27T00:00:00Z" in history_lines([record(window_start=window)])[1]
    assert history_lines([]) == ["no runs recorded"]


def test_record_json_shape():
    assert record(lock_name=None).to_json() == {
        "lock": "7",
        "lock_key": "7",
        "token": 3,
        "holder": "h:1:n",
        "host": "node-a",
        "pid": 1234,
        "command": "./backup.sh",
        "window": None,
        "started_at": "2026-11-27T02:00:01Z",
        "finished_at": "2026-11-27T02:00:03Z",
        "duration_s": 2.0,
        "exit_status": 0,
        "outcome": "ok",
    }


# --- options ----------------------------------------------------------------------


def settings_of(**options: Any) -> RunSettings:
    raw = RawRunOptions(lock_id="job", dsn="host=x", **options)
    return run_settings(raw, ("true",), {})


def test_guard_defaults():
    s = settings_of()
    assert (s.min_hold_s, s.once_per, s.max_runtime_s) == (0.0, None, None)
    assert s.history_keep == DEFAULT_HISTORY_KEEP


def test_guards_parse():
    s = settings_of(
        min_hold="5m",
        once_per="1d",
        once_per_offset="2h",
        retry_failed=True,
        max_runtime="90s",
        history_keep=7,
    )
    assert s.min_hold_s == 300
    assert s.once_per == OncePer(86400.0, 7200.0, retry_failed=True)
    assert (s.max_runtime_s, s.history_keep) == (90, 7)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"once_per": "0"}, "--once-per must be longer than zero"),
        ({"once_per": "1h", "once_per_offset": "1h"}, "must be shorter than"),
        ({"once_per_offset": "2h"}, "--once-per-offset needs --once-per"),
        ({"retry_failed": True}, "--retry-failed needs --once-per"),
        ({"max_runtime": "0s"}, "--max-runtime must be longer than zero"),
        ({"max_runtime": "soon"}, "--max-runtime 'soon' is not a duration"),
        ({"min_hold": "-1s"}, "--min-hold '-1s' is not a duration"),
        ({"history_keep": 0}, "--history-keep 0 must be at least 1"),
    ],
)
def test_bad_guards_are_usage_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        settings_of(**options)
    assert caught.value.exit_code == 64


def test_an_option_from_the_environment_is_named_by_its_variable():
    with pytest.raises(ConfigError, match="LEADERRUN_ONCE_PER must"):
        settings_of(once_per="0", labels={"once_per": "LEADERRUN_ONCE_PER"})
