"""Release notifications on the real server: who is told, and when a listener breaks."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.rows import TupleRow

from leaderrun.errors import DatabaseUnavailableError
from leaderrun.lease import Lease, LockId, parse_lock_id
from leaderrun.runs import RunEnd, RunOutcome
from leaderrun.stores.postgres import PostgresLeaseStore, PostgresListener
from leaderrun.stores.postgres_sql import MAX_CHANNEL_BYTES, release_channel
from tests.stores import LEASE_S, claim

pytestmark = pytest.mark.pg

Admin = Callable[[], psycopg.Connection[TupleRow]]

NOTIFIED_WITHIN_S = 10.0
"""How long a notification may take to arrive on a busy host."""
QUIET_FOR_S = 0.5
"""How long to watch for a notification that must not come."""
SETTLE_S = 1.0
"""Time for notifications already sent to reach the listener's socket."""

HOLDER = claim(1)
OTHER = claim(2)


@pytest.fixture
def store(pg_dsn: str) -> PostgresLeaseStore:
    return PostgresLeaseStore(pg_dsn)


@pytest.fixture
def listener(store: PostgresLeaseStore, lock: LockId) -> Iterator[PostgresListener]:
    listening = store.listen(lock)
    yield listening
    listening.close()


def readable(listener: PostgresListener, timeout_s: float) -> bool:
    ready, _, _ = select.select([listener.fileno()], [], [], timeout_s)
    return bool(ready)


def notified(listener: PostgresListener, timeout_s: float) -> bool:
    """Whether a release of the listener's lock is announced within ``timeout_s``."""
    return readable(listener, timeout_s) and listener.drain()


def test_a_release_wakes_a_listener_of_that_lock(store, lock, listener):
    session = store.connect()
    try:
        lease = session.acquire(lock, HOLDER, LEASE_S).lease
        assert lease is not None
        assert not notified(listener, QUIET_FOR_S), "acquiring announced a release"
        assert session.release(lease)
        assert notified(listener, NOTIFIED_WITHIN_S)
        assert not listener.drain(), "one release, one notification"
    finally:
        session.close()


def test_releases_that_piled_up_are_consumed_by_one_drain(store, lock, listener):
    session = store.connect()
    try:
        for _ in range(3):
            lease = session.acquire(lock, HOLDER, LEASE_S).lease
            assert lease is not None
            assert session.release(lease)
        time.sleep(SETTLE_S)  # all three delivered, so that one drain sees them
        assert notified(listener, NOTIFIED_WITHIN_S)
        # Nothing left over to wake the next sleep for nothing.
        assert not readable(listener, QUIET_FOR_S)
    finally:
        session.close()


def test_a_release_that_was_not_ours_announces_nothing(store, lock, listener):
    session = store.connect()
    try:
        lease = session.acquire(lock, HOLDER, LEASE_S).lease
        assert lease is not None
        assert not session.release(Lease(lock, OTHER.holder, lease.token))
        assert not notified(listener, QUIET_FOR_S)
        assert session.release(lease)
        assert notified(listener, NOTIFIED_WITHIN_S)
    finally:
        session.close()


def test_a_release_that_keeps_the_lock_for_min_hold_announces_nothing(
    store, lock, listener
):
    """--min-hold keeps the lease after the run: nobody may take it, so no wake-up."""
    session = store.connect()
    try:
        lease = session.acquire(lock, HOLDER, LEASE_S).lease
        assert lease is not None
        assert session.release(lease, RunEnd(RunOutcome.ok, 0, min_hold_s=3600.0))
        assert not notified(listener, QUIET_FOR_S)
    finally:
        session.close()


def test_another_locks_release_does_not_wake_the_listener(store, lock, listener):
    other = parse_lock_id(f"{lock}-other")
    session = store.connect()
    try:
        lease = session.acquire(other, HOLDER, LEASE_S).lease
        assert lease is not None
        assert session.release(lease)
        assert not notified(listener, QUIET_FOR_S)
    finally:
        session.close()


def test_a_terminated_listener_says_so_instead_of_hanging(
    store, lock, listener, pg_admin: Admin
):
    with pg_admin() as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
            (f'LISTEN "{release_channel("public", lock.key)}"',),
        ).fetchall()
    assert killed == [(True,)]

    # The server's FATAL message and then EOF make the socket readable; reading
    # must end in an error (libpq may need a second read to see the EOF), never
    # in a block or a made-up release.
    def read_until_broken() -> None:
        for _ in range(10):
            assert readable(listener, NOTIFIED_WITHIN_S)
            assert not listener.drain()

    with pytest.raises(DatabaseUnavailableError, match="listening connection"):
        read_until_broken()


def test_the_channel_fits_postgres_limit_for_any_schema():
    assert release_channel("public", -(2**63)) == f"leaderrun:{-(2**63)}"
    long_schema = "s" * 63
    channel = release_channel(long_schema, 2**63 - 1)
    assert len(channel.encode()) == MAX_CHANNEL_BYTES
    assert channel.startswith(f"leaderrun:{2**63 - 1}:s")
    assert release_channel("other", 7) != release_channel("public", 7)


def test_a_schema_lock_is_announced_on_its_schema_channel(pg_dsn, pg_admin, lock):
    schema = f"lr_notify_{lock.key & 0xFFFF:x}"
    with pg_admin() as admin:
        admin.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    store = PostgresLeaseStore(pg_dsn, schema)
    listener = store.listen(lock)
    session = store.connect()
    try:
        lease = session.acquire(lock, HOLDER, LEASE_S).lease
        assert lease is not None
        assert session.release(lease)
        assert notified(listener, NOTIFIED_WITHIN_S)
    finally:
        session.close()
        listener.close()
        with pg_admin() as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
