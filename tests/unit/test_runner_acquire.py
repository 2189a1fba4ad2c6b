"""Run.acquire's steps on the in-memory store and a fake clock: no database, no sleep.

The acceptance tests run the same paths through the real command; these pin
what each way out of the acquire loop does with the session and the lease.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

import pytest

from leaderrun.config import RawRunOptions, run_settings
from leaderrun.errors import (
    BusyError,
    CancelledBySignalError,
    DatabaseUnavailableError,
    SchemaMissingError,
)
from leaderrun.lease import make_timing, parse_lock_id
from leaderrun.runner import Run
from leaderrun.stores.base import Claim
from leaderrun.testing import FakeClock, InMemoryLeaseStore, InMemorySession

LEASE = "4s"


class FakeInbox:
    """A SignalInbox stand-in: the test queues signals; a wait moves the clock.

    Its wakeup descriptor is always readable, so a Handoff never sleeps.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pending: list[int] = []
        self.waits: list[float] = []
        self.on_wait: Callable[[], None] = lambda: None
        self._read_fd, self._write_fd = os.pipe()
        os.write(self._write_fd, b"!")

    @contextlib.contextmanager
    def cancelling(self):
        yield

    def take(self) -> list[int]:
        taken, self.pending = self.pending, []
        return taken

    def wait(self, timeout_s: float) -> list[int]:
        self.waits.append(timeout_s)
        self.clock.advance(timeout_s)
        self.on_wait()
        return self.take()

    def fileno(self) -> int:
        return self._read_fd

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class RecordingStore(InMemoryLeaseStore):
    """Keeps every session it opens; ``slow_acquires`` answer past the deadline."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.fake_clock = clock
        self.sessions: list[InMemorySession] = []
        self.slow_acquires = 0
        self.schema_missing = False

    def connect(self) -> InMemorySession:
        self._check()  # unavailable: raises as an unreachable database does
        session = SlowSession(self)
        self.sessions.append(session)
        return session


class SlowSession(InMemorySession):
    """An in-memory session whose store may make the next acquire late."""

    def acquire(
        self, lock, claim, lease_s, *, once_per=None, history_keep=None, queued=False
    ):
        store = self.store
        assert isinstance(store, RecordingStore)
        if store.schema_missing:
            raise SchemaMissingError("no leader_lease table")
        result = super().acquire(lock, claim, lease_s)
        if store.slow_acquires:
            store.slow_acquires -= 1
            store.fake_clock.advance(make_timing(4.0).kill_deadline_s + 0.001)
        return result


@pytest.fixture
def store(clock):
    return RecordingStore(clock)


@pytest.fixture
def inbox(clock):
    fake = FakeInbox(clock)
    yield fake
    fake.close()


def run_for(
    store: RecordingStore,
    clock: FakeClock,
    *,
    wait: bool = False,
    lock: str = "acquire",
) -> Run:
    settings = run_settings(
        RawRunOptions(
            lock_id=lock, dsn="sqlite:///unused", lease_duration=LEASE, wait=wait
        ),
        ("true",),
        {},
        now_s=0.0,
    )
    return Run(settings, store, {}, host="host", clock=clock, unit_random=lambda: 0.0)


def hold_elsewhere(store: RecordingStore, lock: str = "acquire") -> None:
    """Let another holder take the lock first."""
    session = store.connect()
    claim = Claim("other:1:x", "other", 1, "true")
    assert session.acquire(parse_lock_id(lock), claim, 4.0).lease is not None
    store.sessions.remove(session)


def test_a_grant_takes_the_session_along(store, clock, inbox):
    """Granted: the session is the grant's, open, and no other was opened."""
    grant = run_for(store, clock).acquire(inbox)
    assert grant.lease.token == 1
    assert grant.t_sent_s == clock()
    assert store.sessions == [grant.session]
    assert not store.sessions[0].closed


def test_a_held_lock_without_wait_is_busy_and_closes_the_session(store, clock, inbox):
    """Held elsewhere, no --wait: BusyError at once; the session is closed."""
    hold_elsewhere(store)
    with pytest.raises(BusyError, match="is held by other"):
        run_for(store, clock).acquire(inbox)
    assert [s.closed for s in store.sessions] == [True]


def test_an_unreachable_database_without_wait_fails_at_once(store, clock, inbox):
    """Without --wait, no pause: exit 69 with nothing opened."""
    store.available = False
    with pytest.raises(DatabaseUnavailableError):
        run_for(store, clock).acquire(inbox)
    assert inbox.waits == []


def test_a_waiter_reconnects_with_the_backoff_until_the_database_is_back(
    store, clock, inbox
):
    """With --wait: pauses of 0.5, 1 and 2 s, then a session, then the grant."""
    store.available = False

    def back_after_three() -> None:
        store.available = len(inbox.waits) >= 3

    inbox.on_wait = back_after_three
    grant = run_for(store, clock, wait=True).acquire(inbox)
    assert inbox.waits == [0.5, 1.0, 2.0]
    assert store.sessions == [grant.session]


def test_a_missing_table_is_not_waited_for(store, clock, inbox):
    """SchemaMissingError is raised even with --wait; the session is closed."""
    store.schema_missing = True
    with pytest.raises(SchemaMissingError):
        run_for(store, clock, wait=True).acquire(inbox)
    assert inbox.waits == []
    assert [s.closed for s in store.sessions] == [True]


def test_a_late_grant_without_wait_is_released_and_fails(store, clock, inbox):
    """A grant past its kill deadline is given back; the run exits 69."""
    store.slow_acquires = 1
    with pytest.raises(DatabaseUnavailableError, match="longer than the kill"):
        run_for(store, clock).acquire(inbox)
    assert store.rows[parse_lock_id("acquire").key].holder is None
    assert [s.closed for s in store.sessions] == [True]


def test_a_late_grant_with_wait_is_released_and_asked_again(store, clock, inbox):
    """With --wait the late token is released unused, and the next one is used."""
    store.slow_acquires = 1
    grant = run_for(store, clock, wait=True).acquire(inbox)
    assert grant.lease.token == 2
    assert store.sessions == [grant.session], "asked again on the same session"


def test_a_signal_at_the_grant_gives_the_lease_back(store, clock, inbox):
    """SIGTERM arriving with the grant: released, closed, cancelled (exit 143)."""
    inbox.pending.append(signal.SIGTERM)
    real_take = inbox.take
    calls = [0]

    def take_after_the_statement() -> list[int]:
        calls[0] += 1
        return real_take() if calls[0] > 1 else []

    inbox.take = take_after_the_statement
    with pytest.raises(CancelledBySignalError) as cancelled:
        run_for(store, clock).acquire(inbox)
    assert cancelled.value.exit_code == 128 + signal.SIGTERM
    assert store.rows[parse_lock_id("acquire").key].holder is None
    assert [s.closed for s in store.sessions] == [True]


def test_a_signal_before_the_statement_cancels_with_nothing_taken(store, clock, inbox):
    """A signal pending before the acquire: no statement, session closed."""
    inbox.pending.append(signal.SIGINT)
    with pytest.raises(CancelledBySignalError, match="nothing ran"):
        run_for(store, clock).acquire(inbox)
    assert store.statements["acquire"] == 0
    assert [s.closed for s in store.sessions] == [True]
