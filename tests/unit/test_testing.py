"""The public test doubles' own features: FakeClock, and the in-memory store's knobs.

What the in-memory store decides as a lease store (acquire, renew, release,
status, history) is the contract every store keeps: ``tests/contract``.
"""

import pytest

from leaderrun.errors import DatabaseUnavailableError, StatementTimeoutError
from leaderrun.lease import Lease, parse_lock_id
from leaderrun.testing import FakeClock, InMemoryLeaseStore
from tests.stores import LEASE_S, acquired, claim

LOCK = parse_lock_id("nightly-backup")


@pytest.fixture
def store() -> InMemoryLeaseStore:
    return InMemoryLeaseStore(FakeClock())


def take(store: InMemoryLeaseStore, n: int = 1) -> Lease:
    """Acquire LOCK as contender ``n``, which must win."""
    return acquired(store.connect().acquire(LOCK, claim(n), LEASE_S))


def test_take_over_gives_the_lock_to_another_holder_with_the_next_token(store):
    """take_over() acts as an operator's forced takeover: new holder, token + 1."""
    lease = take(store)
    row = store.take_over(LOCK)
    assert (row.holder, row.token) == ("thief", lease.token + 1)
    assert not store.connect().renew(lease, LEASE_S)


def test_statements_are_counted_by_kind(store):
    """Each acquire, renew and release statement run is counted, refused ones too."""
    session = store.connect()
    lease = take(store, 1)
    session.acquire(LOCK, claim(2), LEASE_S)
    session.renew(lease, LEASE_S)
    session.renew(Lease(LOCK, "nobody", 1), LEASE_S)
    session.release(lease)
    assert store.statements == {"acquire": 2, "renew": 2, "release": 1}


def test_an_unavailable_store_fails_connect_and_every_statement(store):
    """While unavailable, connect and every statement raise; nothing is counted."""
    lease = take(store)
    session = store.connect()
    before = dict(store.statements)
    store.available = False
    with pytest.raises(DatabaseUnavailableError):
        store.connect()
    with pytest.raises(DatabaseUnavailableError):
        session.acquire(LOCK, claim(2), LEASE_S)
    with pytest.raises(DatabaseUnavailableError):
        session.renew(lease, LEASE_S)
    with pytest.raises(DatabaseUnavailableError):
        session.release(lease)
    with pytest.raises(DatabaseUnavailableError):
        session.snapshot(LOCK)
    assert store.statements == before
    store.available = True
    assert session.renew(lease, LEASE_S)


def test_failing_kinds_time_out_while_the_others_are_answered(store):
    """A kind of statement in ``failing`` times out; the others still run."""
    lease = take(store)
    store.failing.add("renew")
    session = store.connect()
    with pytest.raises(StatementTimeoutError, match="in-memory renew timed out"):
        session.renew(lease, LEASE_S)
    assert store.snapshot(LOCK).records[0].holder == claim(1).holder
    assert session.release(lease)


def test_close_marks_the_session_closed(store):
    """A session reports that it was closed."""
    session = store.connect()
    assert not session.closed
    session.close()
    assert session.closed


def test_describe_names_memory(store):
    """The store describes itself as in memory."""
    assert store.describe() == "memory"


# --- FakeClock -------------------------------------------------------------------


def test_fake_clock_stands_still_until_advanced():
    """The clock returns the same instant until advance() moves it by that much."""
    clock = FakeClock(start_s=50.0)
    assert clock() == clock.now() == 50.0
    clock.advance(0.0)
    assert clock() == 50.0
    clock.advance(2.5)
    assert clock() == clock.now() == 52.5


@pytest.mark.parametrize("step_s", [-0.001, float("nan")])
def test_fake_clock_never_moves_backward(step_s):
    """advance() refuses a negative or NaN step and leaves the clock where it was."""
    clock = FakeClock(start_s=50.0)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(step_s)
    assert clock() == 50.0
