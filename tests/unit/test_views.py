"""The operators' view without a database: states, JSON, text, release reports."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from leaderrun import views
from leaderrun.errors import EXIT_BUSY, EXIT_STATUS_FREE
from leaderrun.lease import parse_lock_id
from leaderrun.runs import RunRecord
from leaderrun.stores.base import (
    REVOKED_HOLDER,
    LeaseRecord,
    LeaseSnapshot,
    ReleaseAction,
    ReleaseResult,
)
from leaderrun.views import LockState

# The database's clock, in a zone other than UTC: output must be UTC anyway.
NOW = datetime(2026, 11, 27, 4, 40, 1, 250000, tzinfo=timezone(timedelta(hours=2)))
LOCK = parse_lock_id("nightly-backup")


def record(
    holder: str | None = "db1:4242:abcd", expires_in_s: float = 20.0, **kw
) -> LeaseRecord:
    fields = {
        "key": LOCK.key,
        "name": LOCK.name,
        "holder": holder,
        "token": 7,
        "acquired_at": NOW - timedelta(seconds=95),
        "renewed_at": NOW - timedelta(seconds=2.5),
        "expires_at": NOW + timedelta(seconds=expires_in_s),
        "host": "db1",
        "pid": 4242,
        "command": "./backup.sh --full",
    }
    fields.update(kw)
    return LeaseRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("holder", "expires_in_s", "state"),
    [
        ("db1:4242:abcd", 0.001, LockState.held),
        ("db1:4242:abcd", 0.0, LockState.expired),  # expires_at <= now(): as the SQL
        ("db1:4242:abcd", -3.0, LockState.expired),
        (REVOKED_HOLDER, 5.0, LockState.revoked),
        (REVOKED_HOLDER, 0.0, LockState.expired),
        (None, 5.0, LockState.free),
        (None, -5.0, LockState.free),
    ],
)
def test_state_follows_holder_and_database_time(holder, expires_in_s, state):
    status = views.lock_status(record(holder, expires_in_s), NOW)
    assert status.state is state
    assert status.taken == (state in (LockState.held, LockState.revoked))


def test_durations_are_database_time():
    status = views.lock_status(record(expires_in_s=20.0), NOW)
    assert (status.expires_in_s, status.renewed_ago_s) == (20.0, 2.5)
    assert status.holder == "db1:4242:abcd"
    assert views.lock_status(record(REVOKED_HOLDER), NOW).holder is None


def test_a_named_lock_without_a_row_is_free_and_exits_3():
    found = views.statuses(LeaseSnapshot(NOW, ()), LOCK)
    assert [(s.lock, s.state, s.token) for s in found] == [
        ("nightly-backup", LockState.free, None)
    ]
    assert views.status_exit_code(found, LOCK) == EXIT_STATUS_FREE
    assert views.statuses(LeaseSnapshot(NOW, ()), None) == []


@pytest.mark.parametrize(
    ("holder", "expires_in_s", "code"),
    [
        ("h:1:n", 5.0, 0),
        (REVOKED_HOLDER, 5.0, 0),
        ("h:1:n", -1.0, EXIT_STATUS_FREE),
        (None, 5.0, EXIT_STATUS_FREE),
    ],
)
def test_status_exit_code_for_a_named_lock(holder, expires_in_s, code):
    found = views.statuses(LeaseSnapshot(NOW, (record(holder, expires_in_s),)), LOCK)
    assert views.status_exit_code(found, LOCK) == code
    # Without --lock-id, listing succeeds whatever the states.
    assert views.status_exit_code(found, None) == 0


def test_json_document_shape_is_stable():
    found = views.statuses(LeaseSnapshot(NOW, (record(),)), None)
    document = json.loads(json.dumps(views.status_document(found, NOW)))
    assert document == {
        "version": 1,
        "database_time": "2026-11-27T02:40:01.250Z",
        "locks": [
            {
                "lock": "nightly-backup",
                "name": "nightly-backup",
                "key": str(LOCK.key),
                "state": "held",
                "holder": "db1:4242:abcd",
                "host": "db1",
                "pid": 4242,
                "token": 7,
                "acquired_at": "2026-11-27T02:38:26.250Z",
                "renewed_at": "2026-11-27T02:39:58.750Z",
                "expires_at": "2026-11-27T02:40:21.250Z",
                "expires_in_s": 20.0,
                "renewed_ago_s": 2.5,
                "command": "./backup.sh --full",
                "last_run": None,
                "cadence": None,
            }
        ],
    }


def test_an_integer_lock_is_shown_by_its_key():
    rec = record(key=-42, name=None)
    status = views.lock_status(rec, NOW)
    assert (status.lock, status.name) == ("-42", None)


def test_text_cells_for_each_state():
    held = views.status_cells(views.lock_status(record(), NOW))
    assert held == (
        "nightly-backup",
        str(LOCK.key),
        "held",
        "db1 pid 4242",
        "7",
        "2026-11-27 02:38:26",
        "in 20.0s",
        "2.5s ago",
        "-",
        "-",
        "-",
        "-",
        "./backup.sh --full",
    )
    expired = views.status_cells(views.lock_status(record(expires_in_s=-125), NOW))
    assert expired[2:8] == (
        "expired",
        "db1 pid 4242",
        "7",
        "2026-11-27 02:38:26",
        "2m05s ago",
        "2.5s ago",
    )
    free = views.status_cells(views.lock_status(record(None), NOW))
    # A free lock keeps its last token, time and command, with no holder.
    assert free[2:] == (
        "free",
        "-",
        "7",
        "2026-11-27 02:38:26",
        "-",
        "-",
        "-",
        "-",
        "-",
        "-",
        "./backup.sh --full",
    )
    never = views.status_cells(views.never_taken(LOCK))
    assert never[2:] == ("free", *["-"] * 10)


def test_a_multi_line_command_stays_on_one_row():
    cells = views.status_cells(views.lock_status(record(command="a\nb\tc"), NOW))
    assert cells[-1] == "a b c"


def test_plain_table_aligns_columns_and_strips_trailing_space():
    text = views.plain_table(("A", "LONGER"), [("wide cell", "x"), ("b", "")])
    assert text == "A          LONGER\nwide cell  x\nb\n"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.04, "0.0s"),
        (12.34, "12.3s"),
        (-3.0, "3.0s"),
        (59.9, "59.9s"),
        (60, "1m00s"),
        (245, "4m05s"),
        (3600 * 2 + 180, "2h03m"),
        (86400 * 3 + 3600 * 4, "3d4h"),
    ],
)
def test_human_duration(seconds, text):
    assert views.human_duration(seconds) == text


@pytest.mark.parametrize(
    ("action", "holder", "expires_in_s", "code", "needle"),
    [
        (ReleaseAction.freed, None, -4.0, 0, "had expired 4.0s ago"),
        (ReleaseAction.revoked, REVOKED_HOLDER, 20.0, 0, "exits 122"),
        (ReleaseAction.already_revoked, REVOKED_HOLDER, 9.0, 0, "free in 9.0s"),
        (ReleaseAction.free, None, -1.0, EXIT_STATUS_FREE, "already free"),
        (ReleaseAction.refused, "db1:4242:abcd", 20.0, EXIT_BUSY, "Use --force"),
    ],
)
def test_release_report(action, holder, expires_in_s, code, needle):
    result = ReleaseResult(action, record(holder, expires_in_s), NOW)
    report = views.release_report(result, LOCK)
    assert report.exit_code == code
    assert needle in report.message
    assert "\n" not in report.message
    if action is not ReleaseAction.free:
        assert "db1 (pid 4242)" in report.message


def test_release_report_when_the_token_changed():
    result = ReleaseResult(ReleaseAction.changed_hands, record(), NOW)
    report = views.release_report(result, LOCK, token=6)
    assert report.exit_code == EXIT_BUSY
    assert report.message.startswith(
        "nightly-backup has fencing token 7 now, not 6: it changed hands since"
    )


def test_release_of_a_lock_never_taken():
    report = views.release_report(ReleaseResult(ReleaseAction.unknown, None, NOW), LOCK)
    assert (report.exit_code, report.message) == (
        EXIT_STATUS_FREE,
        "nightly-backup has never been taken; nothing to release",
    )


def test_iso_utc():
    assert views.iso_utc(None) is None
    assert views.iso_utc(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == (
        "2026-01-02T03:04:05.000Z"
    )


# --- the last run, from the run history (issue 5) --------------------------------


def last_run(**kw: object) -> RunRecord:
    fields: dict[str, object] = {
        "lock_key": LOCK.key,
        "lock_name": LOCK.name,
        "token": 6,
        "holder": "db2:77:ef01",
        "host": "db2",
        "pid": 77,
        "command": "./backup.sh --full",
        "window_start": None,
        "started_at": NOW - timedelta(hours=1),
        "finished_at": NOW - timedelta(hours=1) + timedelta(seconds=125),
        "exit_status": 0,
        "outcome": "ok",
        "duration_s": 125.0,
    }
    fields.update(kw)
    return RunRecord(**fields)  # type: ignore[arg-type]


def test_status_shows_each_locks_last_run():
    other = parse_lock_id("other")
    snapshot = LeaseSnapshot(NOW, (record(None),))
    found = views.statuses(snapshot, None, [last_run(), last_run(lock_key=other.key)])
    assert [s.last_run for s in found] == [last_run()]
    cells = views.status_cells(found[0])
    at = views.COLUMNS.index("LAST RUN (UTC)")
    assert cells[at : at + 4] == ("2026-11-27 01:40:01", "db2", "ok", "2m05s")
    [lock] = views.status_document(found, NOW)["locks"]
    assert lock["last_run"] == {
        "token": 6,
        "host": "db2",
        "pid": 77,
        "started_at": "2026-11-27T01:40:01.250Z",
        "finished_at": "2026-11-27T01:42:06.250Z",
        "duration_s": 125.0,
        "exit_status": 0,
        "outcome": "ok",
    }


def test_a_never_taken_lock_can_still_show_no_run():
    found = views.statuses(LeaseSnapshot(NOW, ()), LOCK, [])
    assert found[0].last_run is None


def run(**fields) -> RunRecord:
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
        "finished_at": datetime(2026, 11, 27, 2, 0, 3, 250000, tzinfo=UTC),
        "exit_status": 0,
        "outcome": "ok",
        "duration_s": 2.25,
    }
    return RunRecord(**{**base, **fields})


def test_the_history_table_aligns_and_shows_the_window_only_when_there_is_one():
    """Numbers on the right, the command last; WINDOW only for --once-per runs."""
    lines = views.history_table(
        [run(), run(token=12, outcome="lost", exit_status=None)]
    ).splitlines()
    assert lines[0].split() == [
        *("STARTED", "(UTC)", "LOCK", "TOKEN", "HOST", "PID", "OUTCOME", "EXIT"),
        *("DURATION", "COMMAND"),
    ]
    assert lines[1].split() == [
        *("2026-11-27", "02:00:01", "nightly", "3", "node-a", "1234", "ok", "0"),
        *("2.2s", "./backup.sh"),
    ]
    assert lines[2].split()[6:8] == ["lost", "-"]
    assert lines[1].index(" 3 ") > lines[2].index("12") - 1  # right-aligned tokens
    assert len({line.index("./backup.sh") for line in lines[1:]}) == 1
    window = datetime(2026, 11, 27, tzinfo=UTC)
    windowed = views.history_table([run(window_start=window)]).splitlines()
    assert "WINDOW" in windowed[0]
    assert "2026-11-27T00:00:00.000Z" in windowed[1]
    assert views.history_table([]) == "no runs recorded\n"


def test_the_history_document_shape_is_stable():
    """history --json: keys, ISO 8601 UTC with milliseconds, the key as a string."""
    assert views.history_document([run(lock_name=None)]) == [
        {
            "lock": "7",
            "lock_key": "7",
            "token": 3,
            "holder": "h:1:n",
            "host": "node-a",
            "pid": 1234,
            "command": "./backup.sh",
            "window": None,
            "started_at": "2026-11-27T02:00:01.000Z",
            "finished_at": "2026-11-27T02:00:03.250Z",
            "duration_s": 2.25,
            "exit_status": 0,
            "outcome": "ok",
        }
    ]


def test_status_and_history_print_instants_and_durations_alike():
    """One run seen by status --json and history --json has the same timestamps,
    and its duration reads the same in both tables."""
    last = run(lock_key=LOCK.key)
    found = views.statuses(LeaseSnapshot(NOW, (record(),)), LOCK, [last])
    status_run = views.status_document(found, NOW)["locks"][0]["last_run"]
    [history_run] = views.history_document([last])
    for key in ("started_at", "finished_at", "duration_s"):
        assert status_run[key] == history_run[key], key
    status_took = views.status_cells(found[0])[views.COLUMNS.index("TOOK")]
    assert status_took in views.history_table([last])
