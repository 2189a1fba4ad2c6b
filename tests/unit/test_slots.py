"""The slot a start belongs to: windows, cron schedules, time zones, DST, tolerance.

Pure, with ``now`` passed in. The DST cases are the two changes of 2026 in
Europe/Berlin (29 March 02:00 -> 03:00, 25 October 03:00 -> 02:00) and in
America/New_York (8 March 02:00 -> 03:00, 1 November 02:00 -> 01:00).
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from leaderrun.slots import (
    DEFAULT_EARLY_S,
    OncePer,
    Schedule,
    ScheduleError,
    Window,
    cron_expression,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def at(tz: tzinfo, *fields: int, fold: int = 0) -> float:
    """A wall-clock time in ``tz`` as epoch seconds."""
    return wall(tz, *fields, fold=fold).timestamp()


def slot(once_per: OncePer, now_s: float) -> datetime:
    """The start of ``now_s``'s slot, on the zone's wall clock."""
    return once_per.local(once_per.slot_at(now_s).start_s)


def wall(tz: tzinfo, *fields: int, fold: int = 0) -> datetime:
    """A wall-clock time in ``tz``."""
    year, month, day, hour, minute, second = (*fields, 0, 0, 0)[:6]
    return datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold)


# --- fixed windows (UTC, and shorter than a day anywhere) ---------------------------

periods = st.sampled_from([1.0, 60.0, 3600.0, 86400.0, 0.5, 7 * 86400.0, 5400.0])


@given(now_s=st.floats(0, 4e9), period_s=periods, fraction=st.floats(0, 0.999))
def test_a_window_slot_is_aligned_and_has_opened(now_s, period_s, fraction):
    offset_s = math.floor(period_s * fraction)
    once_per = OncePer(Window(period_s, offset_s))
    found = once_per.slot_at(now_s)
    assert found.opens_s <= now_s
    assert (found.start_s - offset_s) % period_s == pytest.approx(0, abs=1e-6)
    # The next window has not opened yet; its tolerance is capped by a quarter.
    next_start_s = found.start_s + period_s
    tolerance_s = min(DEFAULT_EARLY_S, period_s / 4)
    assert now_s < next_start_s - tolerance_s or math.isclose(
        now_s, next_start_s - tolerance_s
    )


def test_a_daily_window_from_0200_utc():
    """01:59 belongs to yesterday's window, 01:59:59.7 already to today's."""
    once_per = OncePer(Window(86400.0, 7200.0))
    today = wall(UTC, 2026, 11, 27, 2, 0)
    assert slot(once_per, at(UTC, 2026, 11, 27, 1, 57)) == today - timedelta(days=1)
    assert slot(once_per, at(UTC, 2026, 11, 27, 1, 59, 59) + 0.7) == today
    assert slot(once_per, at(UTC, 2026, 11, 27, 1, 58)) == today
    # Late by 23 hours 57 minutes is still today's; the next opens at 01:58.
    assert slot(once_per, at(UTC, 2026, 11, 28, 1, 57, 59)) == today


@pytest.mark.parametrize("tz", ["UTC", "Europe/Berlin", "Asia/Kolkata"])
def test_windows_shorter_than_a_day_are_elapsed_time_in_every_zone(tz):
    once_per = OncePer(Window(3600.0), tz=tz)
    now_s = at(UTC, 2026, 3, 29, 1, 30)  # across Berlin's spring change
    assert once_per.slot_at(now_s).start_s == at(UTC, 2026, 3, 29, 1, 0)


# --- early tolerance --------------------------------------------------------------


def test_a_start_300ms_before_the_edge_counts_for_the_new_slot():
    daily = OncePer(Schedule("0 2 * * *"))
    edge_s = at(UTC, 2026, 12, 6, 2, 0)
    assert once_start(daily, edge_s - 0.3) == edge_s


def test_a_start_5_minutes_late_stays_in_its_slot():
    daily = OncePer(Schedule("0 2 * * *"))
    edge_s = at(UTC, 2026, 12, 6, 2, 0)
    assert once_start(daily, edge_s + 300) == edge_s


def test_a_retry_firing_lands_in_the_slot_it_retries():
    """``*/10 2-5 * * *`` firing a ``0 2 * * *`` job: every firing is 02:00's."""
    daily = OncePer(Schedule("0 2 * * *"), retry_failed=True)
    edge_s = at(UTC, 2026, 12, 6, 2, 0)
    retries = CronSim("*/10 2-5 * * *", wall(UTC, 2026, 12, 6, 1, 0))
    firings = [next(retries).timestamp() for _ in range(24)]
    assert {once_start(daily, f) for f in firings} == {edge_s}


def test_every_five_minutes():
    """Tolerance at */5 is capped at 75 s: early by 0.3 s is the new slot,
    late by 3 minutes the old, and 4 minutes late is the next slot's."""
    five = OncePer(Schedule("*/5 * * * *"))
    edge_s = at(UTC, 2026, 12, 6, 10, 10)
    assert once_start(five, edge_s - 0.3) == edge_s
    assert once_start(five, edge_s - 74) == edge_s
    assert once_start(five, edge_s - 76) == edge_s - 300
    assert once_start(five, edge_s + 180) == edge_s
    assert once_start(five, edge_s + 240) == edge_s + 300
    assert five.late_limit_s(edge_s) == 300 - 75


def test_the_tolerance_can_be_set_and_zero_is_the_exact_edge():
    edge_s = at(UTC, 2026, 12, 6, 2, 0)
    strict = OncePer(Schedule("0 2 * * *"), early_s=0.0)
    assert once_start(strict, edge_s - 0.001) == edge_s - 86400
    wide = OncePer(Schedule("0 2 * * *"), early_s=3600.0)
    assert once_start(wide, edge_s - 3599) == edge_s


def once_start(once_per: OncePer, now_s: float) -> float:
    return once_per.slot_at(now_s).start_s


# --- time zones and daylight saving -------------------------------------------------

# (zone, the spring day, the autumn day)
CHANGES = [
    (BERLIN, (2026, 3, 29), (2026, 10, 25)),
    (NEW_YORK, (2026, 3, 8), (2026, 11, 1)),
]


@pytest.mark.parametrize(("tz", "spring", "autumn"), CHANGES)
def test_daily_at_0230_runs_once_on_both_change_days(tz, spring, autumn):
    """02:30 is skipped in spring: the slot is right after the change (03:00),
    as cron runs it; in autumn 01:30/02:30 is repeated in one zone or the
    other: one slot, the first."""
    once_per = OncePer(Schedule("30 2 * * *"), tz=tz.key)
    assert slot(once_per, at(tz, *spring, 12, 0)) == wall(tz, *spring, 3, 0)
    assert slot(once_per, at(tz, *spring, 3, 1)) == wall(tz, *spring, 3, 0)
    # The day before's slot is still current just before the change.
    day_before = wall(tz, *spring, 2, 30) - timedelta(days=1)
    assert slot(once_per, at(tz, *spring, 1, 0)) == day_before
    # Autumn: 02:30 exists once (Berlin repeats 02:00-03:00: the first one).
    repeated = once_per.slot_at(at(tz, *autumn, 12, 0)).start_s
    assert repeated == at(tz, *autumn, 2, 30, fold=0)
    assert slot(once_per, at(tz, *autumn, 2, 40, fold=1)).fold == 0


@pytest.mark.parametrize(("tz", "spring", "autumn"), CHANGES)
def test_daily_at_0300_is_23_and_25_hours_apart(tz, spring, autumn):
    once_per = OncePer(Schedule("0 3 * * *"), tz=tz.key)
    spring_s = once_start(once_per, at(tz, *spring, 12, 0))
    assert spring_s - once_start(once_per, spring_s - 3 * 3600) == 23 * 3600
    autumn_s = once_start(once_per, at(tz, *autumn, 12, 0))
    assert autumn_s - once_start(once_per, autumn_s - 3 * 3600) == 25 * 3600
    assert once_per.local(autumn_s).hour == 3


@pytest.mark.parametrize(("tz", "spring", "autumn"), CHANGES)
def test_hourly_follows_elapsed_time_through_both_changes(tz, spring, autumn):
    """``0 * * * *`` has a ``*`` hour: cron runs it every real hour, 23 slots on
    the spring day and 25 on the autumn day."""
    once_per = OncePer(Schedule("0 * * * *"), tz=tz.key)
    for day, hours in ((spring, 23), (autumn, 25)):
        start_s = at(tz, *day, 0, 0)
        end_s = (wall(tz, *day, 0, 0) + timedelta(days=1)).timestamp()
        starts = {once_start(once_per, t) for t in range(int(start_s), int(end_s), 600)}
        assert len(starts) == hours
        ordered = sorted(starts)
        assert {b - a for a, b in itertools.pairwise(ordered)} == {3600.0}


@pytest.mark.parametrize(("tz", "spring", "autumn"), CHANGES)
def test_a_daily_window_follows_the_local_calendar(tz, spring, autumn):
    """``--once-per 1d --once-per-offset 3h`` in a zone means 03:00 local."""
    once_per = OncePer(Window(86400.0, 3 * 3600.0), tz=tz.key)
    assert slot(once_per, at(tz, *spring, 12, 0)) == wall(tz, *spring, 3, 0)
    assert slot(once_per, at(tz, *autumn, 12, 0)) == wall(tz, *autumn, 3, 0)
    the_day_before = wall(tz, *autumn, 3, 0) - timedelta(days=1)
    assert slot(once_per, at(tz, *autumn, 2, 0)) == the_day_before


def test_the_issue_s_berlin_example_no_longer_skips_sunday():
    """``0 3 * * *`` in Berlin fired Saturday at 02:00 UTC and Sunday (after the
    spring change) at 01:00 UTC: two slots, where UTC windows saw one."""
    saturday_s, sunday_s = at(UTC, 2026, 3, 28, 2, 0), at(UTC, 2026, 3, 29, 1, 0)
    local = OncePer(Window(86400.0, 3 * 3600.0), tz="Europe/Berlin")
    assert once_start(local, saturday_s) != once_start(local, sunday_s)
    utc = OncePer(Window(86400.0, 2 * 3600.0))
    assert once_start(utc, saturday_s) == once_start(utc, sunday_s)


def test_weekly_windows_in_a_zone_start_on_the_same_weekday():
    # Day 0 of the epoch was a Thursday: a 7-day window offset by 4 days starts
    # on Mondays, at 06:00 local.
    once_per = OncePer(
        Window(7 * 86400.0, 4 * 86400.0 + 6 * 3600.0), tz="Europe/Berlin"
    )
    for month in range(1, 13):
        start = slot(once_per, at(BERLIN, 2026, month, 15, 12, 0))
        assert (start.weekday(), start.hour) == (0, 6)


# --- the table a database chooses from ----------------------------------------------

schedules = st.sampled_from(
    ["*/5 * * * *", "0 3 * * *", "30 2 * * *", "0 * * * *", "15 1,2,3 * * 1-5"]
)
zones = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"])
# 2026, with both changes of both zones in it.
moments = st.floats(at(UTC, 2026, 1, 1, 0, 0), at(UTC, 2027, 1, 1, 0, 0))


@settings(max_examples=200, deadline=None)
@given(cron=schedules, tz=zones, around_s=moments, shift_s=st.floats(-600, 599))
def test_the_table_agrees_with_slot_at_wherever_it_covers(cron, tz, around_s, shift_s):
    once_per = OncePer(Schedule(cron), tz=tz)
    table = once_per.table(around_s)
    now_s = around_s + shift_s
    assert table.slot_at(now_s) == once_per.slot_at(now_s)


def test_a_table_does_not_guess_beyond_its_span():
    once_per = OncePer(Schedule("*/5 * * * *"))
    table = once_per.table(at(UTC, 2026, 12, 6, 10, 0))
    assert table.slot_at(at(UTC, 2026, 12, 6, 10, 11)) is None
    assert table.slot_at(at(UTC, 2026, 12, 6, 9, 40)) is None


@settings(max_examples=150, deadline=None)
@given(cron=schedules, tz=zones, now_s=moments)
def test_cron_starts_match_a_forward_walk_of_cronsim(cron, tz, now_s):
    """The slot's start is the last time cron fires at or before now plus the
    tolerance, by a plain forward walk from four days earlier."""
    once_per = OncePer(Schedule(cron), tz=tz, early_s=0.0)
    zone = ZoneInfo(tz)
    walk = CronSim(cron, datetime.fromtimestamp(now_s - 4 * 86400, zone))
    fired = list(
        itertools.takewhile(lambda t: t <= now_s, (m.timestamp() for m in walk))
    )
    assert once_start(once_per, now_s) == max(fired)


# --- what the lock records, and bad input -------------------------------------------


def test_the_recorded_cadence():
    once_per = OncePer(Schedule("0 3 * * *"), tz="Europe/Berlin", retry_failed=True)
    assert json.loads(once_per.describe()) == {
        "schedule": "0 3 * * *",
        "tz": "Europe/Berlin",
        "early_s": 120.0,
        "retry_failed": True,
    }
    window = OncePer(Window(86400.0, 7200.0))
    assert json.loads(window.describe())["once_per_s"] == 86400.0
    assert window.flags() == "--once-per 1d --once-per-offset 2h"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("@daily", "0 0 * * *"), ("@HOURLY", "0 * * * *"), (" 0  2 * * * ", "0 2 * * *")],
)
def test_cron_nicknames(text, expected):
    assert cron_expression(text) == expected


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: OncePer(Schedule("0 2 * *")), "has 4 fields; give the crontab"),
        (lambda: OncePer(Schedule("0 0 2 * * *")), "has 6 fields"),
        (lambda: OncePer(Schedule("61 2 * * *")), "bad minute"),
        (lambda: OncePer(Schedule("0 0 30 2 *")), "bad day-of-month"),
        (
            lambda: OncePer(Schedule("0 2 * * *"), tz="Mars/Olympus"),
            "unknown time zone",
        ),
        (lambda: OncePer(Schedule("0 2 * * *"), tz="../../etc/passwd"), "IANA"),
        (lambda: OncePer(Window(36 * 3600.0), tz="Europe/Berlin"), "whole days"),
        (lambda: OncePer(Window(86400.0, 30.0), tz="Europe/Berlin"), "whole minute"),
        (lambda: OncePer(Window(0.0)), "longer than zero"),
        (lambda: OncePer(Window(60.0, 60.0)), "offset"),
        (lambda: OncePer(Window(60.0), early_s=-1.0), "0 or more"),
        (lambda: cron_expression("@reboot"), "no slots"),
    ],
)
def test_what_cannot_be_a_cadence(make, message):
    with pytest.raises(ScheduleError, match=message):
        make()
