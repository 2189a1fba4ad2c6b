"""SQLite leases are decided on the host's CLOCK_BOOTTIME within one boot.

In-process, on real files; the clocks are set by hand (``tests.helpers.
sqlite_clocks``) where the instant is the behaviour, so nothing sleeps. The same
property with real processes under libfaketime is the local fault scenario
``tests/faults/local/test_sqlite_clock.py``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from leaderrun.clock import boottime
from leaderrun.lease import Lease, LockId
from leaderrun.slots import OncePer, Window
from leaderrun.stores.base import ReleaseAction
from leaderrun.stores.host import HostClock
from leaderrun.stores.sqlite import SqliteLeaseStore, SqliteSession
from leaderrun.views import iso_utc
from tests.helpers.sqlite_clocks import SetClock, ShiftedWall, other_boot_id
from tests.stores import LEASE_S, acquired, claim

STEP_S = 120.0
"""A wall-clock step well past any lease here, as in the fault scenario."""


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "leases.db"


@pytest.fixture
def boot_id() -> str:
    return HostClock.read().boot_id


SessionOn = Callable[..., SqliteSession]


@pytest.fixture
def session_on(db: Path) -> Iterator[SessionOn]:
    """Opens sessions on the file, on the given clocks (the real ones by
    default); closes them all after the test."""
    opened: list[SqliteSession] = []

    def open_(clock: HostClock | None = None) -> SqliteSession:
        opened.append(SqliteLeaseStore(db, clock=clock).connect())
        return opened[-1]

    yield open_
    for session in opened:
        session.close()


@pytest.fixture
def holder(session_on: SessionOn, lock: LockId) -> tuple[SqliteSession, Lease]:
    """A session on the real clocks holding ``lock`` for LEASE_S."""
    session = session_on()
    return session, acquired(session.acquire(lock, claim(1), LEASE_S))


@pytest.mark.parametrize("offset_s", [STEP_S, -STEP_S])
def test_a_contender_whose_wall_clock_stepped_finds_the_lease_held(
    session_on, lock, holder, offset_s
):
    """A wall clock 120 s off, either way, does not make a live lease look
    expired: the contender is refused, told the true time left."""
    contender = session_on(ShiftedWall(offset_s))
    result = contender.acquire(lock, claim(2), LEASE_S)
    assert result.lease is None
    assert result.expires_in_s is not None
    assert LEASE_S - 10 < result.expires_in_s <= LEASE_S


@pytest.mark.parametrize("offset_s", [STEP_S, -STEP_S])
def test_a_holder_whose_wall_clock_stepped_renews_and_keeps_the_lease(
    session_on, lock, holder, offset_s
):
    """The holder's own step changes nothing: its renewal succeeds, and a
    contender on the true clock is still refused."""
    _, lease = holder
    stepped = session_on(ShiftedWall(offset_s))
    other = session_on()
    assert stepped.renew(lease, LEASE_S) is True
    assert other.acquire(lock, claim(2), LEASE_S).lease is None


def test_a_lease_ends_exactly_when_the_boot_clock_passes_it(session_on, lock, boot_id):
    """Live while the boot clock is before its expiry, free from that instant on."""
    clock = SetClock(boot_id, 1000.0, 1.8e9)
    session = session_on(clock)
    assert session.acquire(lock, claim(1), LEASE_S).lease is not None
    clock.advance(LEASE_S - 0.001)
    early = session.acquire(lock, claim(2), LEASE_S)
    assert early.lease is None
    assert early.expires_in_s == pytest.approx(0.001)
    clock.advance(0.001)
    assert session.acquire(lock, claim(2), LEASE_S).lease == Lease(
        lock, claim(2).holder, 2
    )


def test_a_wall_clock_jump_alone_never_ends_a_lease(session_on, lock, boot_id):
    """The wall clock jumping a day ahead with the boot clock still: held."""
    clock = SetClock(boot_id, 1000.0, 1.8e9)
    session = session_on(clock)
    assert session.acquire(lock, claim(1), LEASE_S).lease is not None
    clock.unix_s += 86400
    assert session.acquire(lock, claim(2), LEASE_S).lease is None


@pytest.mark.parametrize("previous_boot_s", [10.0, 1e7])
def test_a_lease_of_another_boot_is_expired_and_the_token_still_grows(
    session_on, lock, previous_boot_s
):
    """A lease written in an earlier boot is free at once, whether that boot's
    clock was behind or far ahead of this one's; the next holder gets the next
    token, and the old holder's renewal matches nothing."""
    earlier = SetClock(other_boot_id(), previous_boot_s, time.time() - 600)
    old = session_on(earlier)
    lease = old.acquire(lock, claim(1), 1e6).lease
    assert lease is not None
    now = session_on()
    taken = now.acquire(lock, claim(2), LEASE_S).lease
    assert taken == Lease(lock, claim(2).holder, 2)
    assert now.renew(lease, LEASE_S) is False


def test_a_row_without_a_boot_id_is_expired(session_on, db, lock, holder):
    """A row that names no boot (written by hand) counts as another boot's."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE leader_lease SET boot_id = NULL")
    other = session_on()
    assert other.acquire(lock, claim(2), LEASE_S).lease is not None


def test_status_and_release_treat_a_lease_of_another_boot_as_expired(
    session_on, db, lock
):
    """Operators see it expired (never 'held'), and a plain release frees it."""
    old = session_on(SetClock(other_boot_id(), 5e5, time.time() - 60))
    assert old.acquire(lock, claim(1), 1e6).lease is not None
    store = SqliteLeaseStore(db)
    snapshot = store.snapshot(lock)
    (record,) = snapshot.records
    assert record.holder == claim(1).holder
    assert record.expires_at <= snapshot.db_now
    result = store.release(lock, force=False)
    assert result.action is ReleaseAction.freed


def test_status_shows_the_time_left_on_the_boot_clock(db, lock, boot_id):
    """expires_at, as shown, is now plus what the boot clock leaves, whatever
    the wall clock said when the lease was written."""
    clock = SetClock(boot_id, 1000.0, 1.8e9)
    writer = SqliteLeaseStore(db, clock=clock)
    session = writer.connect()
    assert session.acquire(lock, claim(1), LEASE_S).lease is not None
    clock.advance(10.0)
    clock.unix_s -= 3600  # stepped back an hour since
    snapshot = writer.snapshot(lock)
    (record,) = snapshot.records
    assert (record.expires_at - snapshot.db_now).total_seconds() == pytest.approx(
        LEASE_S - 10.0
    )


def test_the_clock_is_read_after_the_write_lock_is_taken(db, lock, holder):
    """A renewal that waited for another writer stamps the time it got the lock,
    not the time it asked: expiry counts from no earlier than the other's commit."""
    session, lease = holder
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    results: list[bool] = []
    renewal = threading.Thread(target=lambda: results.append(session.renew(lease, 7)))
    renewal.start()
    # The renewal is waiting (or about to): either way it cannot write before this.
    deadline_s = time.monotonic() + 10
    while not any(t.name == "leaderrun-sqlite" for t in threading.enumerate()):
        assert time.monotonic() < deadline_s, "the renewal never started"
        time.sleep(0.001)
    released_boot_s = boottime()
    blocker.execute("ROLLBACK")
    blocker.close()
    renewal.join(30)
    assert results == [True]
    with sqlite3.connect(db) as conn:
        (expires_boot_s,) = conn.execute(
            "SELECT expires_boot_s FROM leader_lease"
        ).fetchone()
    assert expires_boot_s - 7 >= released_boot_s


def test_the_once_per_window_is_calendar_time(session_on, lock, boot_id):
    """--once-per windows follow the wall clock (they are dates), not boot time."""
    unix_s = 1_800_000_123.0
    session = session_on(SetClock(boot_id, 1000.0, unix_s))
    result = session.acquire(lock, claim(1), LEASE_S, once_per=OncePer(Window(86400.0)))
    assert iso_utc(result.window_start) == "2027-01-15T00:00:00.000Z"
