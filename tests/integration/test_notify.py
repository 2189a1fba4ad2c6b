"""The --wait queue and its wake-ups on the real server: who goes next, who is told.

Waiters are served in arrival order (the database's time of their first
attempt); a release wakes the head of the queue alone, on its own channel; a
waiter that died keeps its place only until it lapses; a waiter that gives up
wakes the next. Skip-mode attempts (not queued) are unchanged.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow

from leaderrun.errors import DatabaseUnavailableError
from leaderrun.lease import QUEUE_PLACE_LEASES, Lease, LockId, parse_lock_id
from leaderrun.runs import RunEnd, RunOutcome
from leaderrun.stores.base import AcquireResult, Claim
from leaderrun.stores.postgres import PostgresLeaseStore, PostgresSession
from leaderrun.stores.postgres_sql import (
    MAX_CHANNEL_BYTES,
    release_channel,
    wake_channel,
)
from tests.stores import LEASE_S, acquired

pytestmark = pytest.mark.pg

Admin = Callable[[], psycopg.Connection[TupleRow]]

NOTIFIED_WITHIN_S = 10.0
"""How long a notification may take to arrive on a busy host."""
QUIET_FOR_S = 0.5
"""How long to watch for a notification that must not come."""


def waiter(n: int) -> Claim:
    """Contender ``n``, with a holder identity (and so a channel) of its own."""
    return Claim(holder=f"host{n}:{n}:{n:016x}", host=f"host{n}", pid=n, command="job")


HOLDER, FIRST, SECOND = waiter(1), waiter(2), waiter(3)


class Waiter:
    """A queued contender: its lease session, listening on itself."""

    def __init__(self, store: PostgresLeaseStore, lock: LockId, who: Claim) -> None:
        self.session = store.connect()
        self.lock = lock
        self.who = who
        self.listener = self.session.listen_here(lock, who.holder)

    def ask(self, lease_s: float = LEASE_S) -> AcquireResult:
        """One queued acquire (the first also LISTENs, in the same round trip)."""
        return self.session.acquire(self.lock, self.who, lease_s, queued=True)

    def notified(self, timeout_s: float) -> bool:
        """Whether our turn is announced within ``timeout_s``."""
        if self.listener.drain():
            return True
        ready, _, _ = select.select([self.listener.fileno()], [], [], timeout_s)
        return bool(ready) and self.listener.drain()

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def store(pg_dsn: str) -> PostgresLeaseStore:
    return PostgresLeaseStore(pg_dsn)


@pytest.fixture
def holder(store: PostgresLeaseStore) -> Iterator[PostgresSession]:
    session = store.connect()
    yield session
    session.close()


@pytest.fixture
def waiters(store: PostgresLeaseStore, lock: LockId) -> Iterator[list[Waiter]]:
    made = [Waiter(store, lock, FIRST), Waiter(store, lock, SECOND)]
    yield made
    for each in made:
        each.close()


def test_a_release_wakes_the_head_of_the_queue_and_nobody_else(holder, lock, waiters):
    first, second = waiters
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    assert first.ask().lease is None
    assert second.ask().lease is None
    assert not first.notified(QUIET_FOR_S), "a refusal announced a release"
    assert holder.release(lease)
    assert first.notified(NOTIFIED_WITHIN_S)
    assert not second.notified(QUIET_FOR_S), "the release woke a waiter behind"


def test_the_head_goes_first_even_when_a_later_waiter_asks_first(holder, lock, waiters):
    first, second = waiters
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    second.ask()
    assert holder.release(lease)
    refused = second.ask()  # the lock is free, but the head has not come yet
    assert refused.lease is None
    assert refused.turn_in_s is not None
    assert 0 < refused.turn_in_s <= QUEUE_PLACE_LEASES * LEASE_S
    served = acquired(first.ask())
    assert served.token == lease.token + 1
    # The second is the head now: the next release wakes it, and it is served.
    assert first.session.release(served)
    assert second.notified(NOTIFIED_WITHIN_S)
    assert acquired(second.ask()).token == served.token + 1


def test_a_dead_heads_place_lapses_and_the_next_waiter_goes(holder, lock, waiters):
    """The head died waiting: after its place lapsed, the next one is served."""
    first, second = waiters
    lease_s = 1.0
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    assert first.ask(lease_s).lease is None  # then it "dies": never asks again
    refused = second.ask()
    assert refused.turn_in_s is not None
    assert refused.turn_in_s <= QUEUE_PLACE_LEASES * lease_s
    assert holder.release(lease)
    assert second.ask().lease is None  # the dead head's place is still live
    time.sleep(QUEUE_PLACE_LEASES * lease_s + 0.2)
    acquired(second.ask())


def test_a_waiter_that_leaves_wakes_the_next_when_the_lock_is_free(
    holder, lock, waiters
):
    first, second = waiters
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    second.ask()
    assert holder.release(lease)
    assert first.notified(NOTIFIED_WITHIN_S)
    first.session.leave_queue(lock, FIRST)  # e.g. --wait-timeout ran out
    assert second.notified(NOTIFIED_WITHIN_S)
    acquired(second.ask())


def test_leaving_while_the_lock_is_held_wakes_nobody(holder, lock, waiters):
    first, second = waiters
    acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    second.ask()
    first.session.leave_queue(lock, FIRST)
    assert not second.notified(QUIET_FOR_S)
    assert second.ask().turn_in_s is None  # the head now, behind the holder


def test_a_skip_mode_attempt_ignores_the_queue(holder, lock, waiters):
    """Only --wait contenders queue: a plain try takes a free lock (as before)."""
    first, _ = waiters
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    assert holder.release(lease)
    acquired(holder.acquire(lock, waiter(9), LEASE_S))


def test_a_release_that_was_not_ours_announces_nothing(holder, lock, waiters):
    first, _ = waiters
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    assert not holder.release(Lease(lock, SECOND.holder, lease.token))
    assert not first.notified(QUIET_FOR_S)
    assert holder.release(lease)
    assert first.notified(NOTIFIED_WITHIN_S)


def test_a_release_that_keeps_the_lock_for_min_hold_announces_nothing(
    holder, lock, waiters
):
    """--min-hold keeps the lease after the run: nobody may take it, so no wake-up."""
    first, _ = waiters
    lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    assert holder.release(lease, RunEnd(RunOutcome.ok, 0, min_hold_s=3600.0))
    assert not first.notified(QUIET_FOR_S)


def test_another_locks_release_does_not_wake_the_waiter(holder, lock, waiters):
    first, _ = waiters
    acquired(holder.acquire(lock, HOLDER, LEASE_S))
    first.ask()
    other = parse_lock_id(f"{lock}-other")
    other_lease = acquired(holder.acquire(other, HOLDER, LEASE_S))
    assert holder.release(other_lease)
    assert not first.notified(QUIET_FOR_S)


def test_the_listen_rides_on_the_acquire_one_statement_one_round_trip(
    store, lock, pg_admin: Admin
):
    """A waiter's session LISTENs with its next acquire: no connection, no trip more."""
    first = Waiter(store, lock, FIRST)
    try:
        with pg_admin() as admin:
            before = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'leaderrun'"
            ).fetchone()
            first.ask()
            after = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'leaderrun'"
            ).fetchone()
            assert before == after  # the LISTEN opened no connection
            admin.execute("SELECT pg_notify(%s, '')", (wake_channel(FIRST.holder),))
        assert first.notified(NOTIFIED_WITHIN_S)
    finally:
        first.close()


def test_a_terminated_listen_dsn_listener_says_so_instead_of_hanging(
    store, lock, pg_admin: Admin
):
    listener = store.listen(lock, FIRST.holder)
    try:
        with pg_admin() as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query = %s",
                (f'LISTEN "{wake_channel(FIRST.holder)}"',),
            ).fetchall()
        assert killed == [(True,)]

        # The server's FATAL message and then EOF make the socket readable;
        # reading must end in an error (libpq may need a second read to see the
        # EOF), never in a block or a made-up release.
        def read_until_broken() -> None:
            for _ in range(10):
                ready, _, _ = select.select([listener.fileno()], [], [], 10.0)
                assert ready
                assert not listener.drain()

        with pytest.raises(DatabaseUnavailableError, match="listening connection"):
            read_until_broken()
    finally:
        listener.close()


def test_a_listen_dsn_listener_hears_its_turn(store, holder, lock):
    first = Waiter(store, lock, FIRST)
    listener = store.listen(lock, FIRST.holder)
    try:
        lease = acquired(holder.acquire(lock, HOLDER, LEASE_S))
        first.session.acquire(lock, FIRST, LEASE_S, queued=True)
        assert holder.release(lease)
        ready, _, _ = select.select([listener.fileno()], [], [], NOTIFIED_WITHIN_S)
        assert ready
        assert listener.drain()
    finally:
        listener.close()
        first.close()


def test_the_channels_fit_postgres_limit():
    assert release_channel("public", -(2**63)) == f"leaderrun:{-(2**63)}"
    long_schema = "s" * 63
    channel = release_channel(long_schema, 2**63 - 1)
    assert len(channel.encode()) == MAX_CHANNEL_BYTES
    assert channel.startswith(f"leaderrun:{2**63 - 1}:s")
    assert release_channel("other", 7) != release_channel("public", 7)
    assert len(wake_channel("h" * 1000).encode()) <= MAX_CHANNEL_BYTES
    assert wake_channel(FIRST.holder) != wake_channel(SECOND.holder)


def test_a_schema_locks_queue_is_its_own(pg_dsn, pg_admin, lock):
    schema = f"lr_notify_{lock.key & 0xFFFF:x}"
    with pg_admin() as admin:
        admin.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    store = PostgresLeaseStore(pg_dsn, schema)
    first = Waiter(store, lock, FIRST)
    session = store.connect()
    try:
        lease = acquired(session.acquire(lock, HOLDER, LEASE_S))
        first.ask()
        assert session.release(lease)
        assert first.notified(NOTIFIED_WITHIN_S)
    finally:
        session.close()
        first.close()
        with pg_admin() as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
