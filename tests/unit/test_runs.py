"""The cron guards' pure core and their options; the stores' are in tests/contract.

Which slot a start belongs to is tests/unit/test_slots.py's.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from leaderrun.config import RawRunOptions, RunSettings, run_settings
from leaderrun.errors import ConfigError
from leaderrun.runs import DEFAULT_HISTORY_KEEP, RunEnd, RunOutcome, classify
from leaderrun.slots import OncePer, Schedule, Window

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
    return run_settings(raw, ("true",), {}, now_s=NOW_S)


NOW_S = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()


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
    assert s.once_per == OncePer(Window(86400.0, 7200.0), retry_failed=True)
    assert (s.max_runtime_s, s.history_keep) == (90, 7)


def test_schedule_zone_tolerance_and_splay_parse():
    s = settings_of(
        schedule="@daily",
        tz=" Europe/Berlin ",
        early_tolerance="30s",
        splay="1m",
    )
    assert s.once_per == OncePer(Schedule("0 0 * * *"), tz="Europe/Berlin", early_s=30)
    assert s.splay_s == 60
    assert settings_of(splay="10m").splay_s == 600  # no slot to stay inside


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"once_per": "0"}, "--once-per must be longer than zero"),
        ({"once_per": "1h", "once_per_offset": "1h"}, "must be shorter than"),
        ({"once_per_offset": "2h"}, "--once-per-offset needs --once-per or --sch"),
        ({"retry_failed": True}, "--retry-failed needs --once-per"),
        ({"tz": "Europe/Berlin"}, "--tz needs --once-per or --schedule"),
        ({"early_tolerance": "1m"}, "--early-tolerance needs --once-per"),
        ({"once_per": "1d", "schedule": "0 2 * * *"}, "both given; use one"),
        ({"schedule": "0 2 * *"}, "--schedule '0 2 * *': has 4 fields"),
        ({"schedule": "0 25 * * *"}, "--schedule '0 25 * * *': bad hour"),
        ({"schedule": "@reboot"}, "--schedule '@reboot': has no slots"),
        (
            {"schedule": "0 2 * * *", "once_per_offset": "1h"},
            "--once-per-offset is for --once-per; put the time in the schedule",
        ),
        (
            {"schedule": "0 2 * * *", "tz": "Europe/Berlln"},
            "--tz 'Europe/Berlln': unknown time zone; use an IANA name",
        ),
        (
            {"once_per": "36h", "tz": "Europe/Berlin"},
            "--once-per '36h': in Europe/Berlin, a window of a day or longer must",
        ),
        (
            {"schedule": "0 2 * * *", "early_tolerance": "-1s"},
            "--early-tolerance '-1s' is not a duration",
        ),
        ({"splay": "later"}, "--splay 'later' is not a duration"),
        (
            {"schedule": "*/5 * * * *", "splay": "4m"},
            "--splay '4m' could start a run after its slot ends: with --schedule "
            "'*/5 * * * *' a start may come at most 225s late",
        ),
        (
            {"once_per": "1h", "splay": "1h"},
            "--splay '1h' could start a run after its slot ends",
        ),
        ({"max_runtime": "0s"}, "--max-runtime must be longer than zero"),
        ({"max_runtime": "soon"}, "--max-runtime 'soon' is not a duration"),
        ({"min_hold": "-1s"}, "--min-hold '-1s' is not a duration"),
        ({"history_keep": 0}, "--history-keep 0 must be at least 1"),
    ],
)
def test_bad_guards_are_usage_errors(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        settings_of(**options)
    assert caught.value.exit_code == 64


def test_an_option_from_the_environment_is_named_by_its_variable():
    with pytest.raises(ConfigError, match="LEADERRUN_ONCE_PER must"):
        settings_of(once_per="0", labels={"once_per": "LEADERRUN_ONCE_PER"})


def test_a_zone_for_the_whole_crontab_does_not_break_its_plain_lines():
    """LEADERRUN_TZ set for every line: a line without a schedule ignores it;
    the same as a flag on that line is a mistake, and said so."""
    from_env = settings_of(tz="Europe/Berlin", labels={"tz": "LEADERRUN_TZ"})
    assert from_env.once_per is None
    with pytest.raises(ConfigError, match="--tz needs --once-per or --schedule"):
        settings_of(tz="Europe/Berlin")
