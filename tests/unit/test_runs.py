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
    classify,
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
