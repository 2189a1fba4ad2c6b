"""Acquire, renew and release: what every store decides alike.

Each test runs on the memory, SQLite and PostgreSQL stores (``backend``,
``tests/stores.py``); a behaviour one of them lacks fails here.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import pytest

from leaderrun.errors import ConfigError, StatementTimeoutError
from leaderrun.lease import Lease, LockId
from leaderrun.stores.base import MAX_COMMAND_CHARS, AcquireResult
from tests.stores import LEASE_S, WAIT_S, Backend, acquired, claim, race

CONTENDERS = 20


def kept(backend: Backend, lock: LockId) -> tuple[object, ...]:
    """What a refused statement must leave as it was: name, holder, token, expiry."""
    record = backend.record(lock)
    return (record.name, record.holder, record.token, record.expires_at)


# --- acquire ----------------------------------------------------------------------


def test_the_first_acquire_takes_token_1_and_records_the_claim(backend, lock):
    """The first holder gets token 1; its row says who holds it, from where."""
    lease = acquired(backend.session().acquire(lock, claim(1), LEASE_S))
    assert lease == Lease(lock, claim(1).holder, 1)
    snapshot = backend.store.snapshot(lock)
    (record,) = snapshot.records
    assert (record.key, record.name, record.holder, record.token) == (
        lock.key,
        lock.name,
        claim(1).holder,
        1,
    )
    assert (record.host, record.pid, record.command) == ("host1", 1, "job")
    lease_s = (record.expires_at - snapshot.db_now).total_seconds()
    assert lease_s == pytest.approx(LEASE_S, abs=5)


def test_a_long_command_is_cut_to_what_status_shows(backend, lock):
    """The command is kept to MAX_COMMAND_CHARS, in the lease and in the history."""
    session = backend.session()
    long = claim(1, command="x" * (MAX_COMMAND_CHARS + 50))
    session.acquire(lock, long, LEASE_S, history_keep=5)
    assert backend.record(lock).command == "x" * MAX_COMMAND_CHARS
    assert backend.store.history(lock)[0].command == "x" * MAX_COMMAND_CHARS


def test_a_held_lock_is_refused_and_its_holder_described(backend, lock):
    """A contender learns who holds the lock and how long its lease has left."""
    backend.take(lock, 1)
    backend.advance(lock, 10.0)
    result = backend.session().acquire(lock, claim(2), LEASE_S)
    assert result.lease is None
    assert (result.holder, result.holder_host, result.holder_pid) == (
        claim(1).holder,
        "host1",
        1,
    )
    assert result.expires_in_s == pytest.approx(LEASE_S - 10.0, abs=2)
    assert backend.record(lock).token == 1


def test_a_lease_is_taken_over_only_once_it_has_ended_in_store_time(backend, lock):
    """Held until its expiry in the store's time, taken over with token + 1 after."""
    backend.take(lock, 1)
    backend.advance(lock, LEASE_S - 5)
    contender = backend.session()
    assert contender.acquire(lock, claim(2), LEASE_S).lease is None
    backend.expire(lock)
    assert acquired(contender.acquire(lock, claim(2), LEASE_S)).token == 2
    assert backend.record(lock).holder == claim(2).holder


def test_exactly_one_of_twenty_contenders_takes_an_expired_lease(backend, lock):
    """Twenty sessions racing on an expired lease: one wins, with the token + 1."""
    backend.take(lock, 100)
    backend.expire(lock)
    sessions = [backend.session() for _ in range(CONTENDERS)]

    def contend(n: int, barrier: threading.Barrier):
        barrier.wait(WAIT_S)
        return sessions[n].acquire(lock, claim(n), LEASE_S)

    results = race(CONTENDERS, contend)
    assert [r for r in results if not isinstance(r, AcquireResult)] == []
    winners = [r.lease for r in results if isinstance(r, AcquireResult) and r.lease]
    assert len(winners) == 1
    assert winners[0].token == 2
    record = backend.record(lock)
    assert (record.holder, record.token) == (winners[0].holder, 2)


def test_a_key_another_lock_name_uses_is_refused_even_once_expired(backend, lock):
    """Names hash to keys; the row's name decides, and the newcomer is told."""
    backend.take(lock, 1)
    backend.expire(lock)
    before = kept(backend, lock)
    twin = LockId(lock.key, f"{lock.name}-twin")
    with pytest.raises(ConfigError) as raised:
        backend.session().acquire(twin, claim(2), LEASE_S)
    assert raised.value.message == (
        f"--lock-id {twin.name!r} has the same 64-bit key as the lock "
        f"{lock.name!r}; choose another name"
    )
    assert kept(backend, lock) == before


def test_a_holder_asking_again_for_the_lease_it_holds_is_refused(backend, lock):
    """Its own term runs out as it should: no second grant, no new token."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    again = session.acquire(lock, claim(1), LEASE_S)
    assert (again.lease, again.holder) == (None, claim(1).holder)
    assert backend.record(lock).token == lease.token


def test_a_grant_whose_answer_never_came_is_given_back(sql_backend, lock, caplog):
    """A SQL store that finds its holder granted a token it was never told of (an
    acquire given up, then committed after all) gives it back and takes the
    next one, rather than wait out a lease nobody uses. Nothing ran under the
    token given back: it leaves no run in the history, and counts in no counter."""
    with contextlib.closing(sql_backend.twin_store().connect()) as twin:
        lost = acquired(twin.acquire(lock, claim(1), LEASE_S, history_keep=5))
    session = sql_backend.session()
    with caplog.at_level(logging.WARNING, logger="leaderrun"):
        lease = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=5))
    assert lease.token == lost.token + 1
    assert f"gave back {lock}'s fencing token {lost.token}" in caplog.text
    outcomes = [(r.token, r.outcome) for r in sql_backend.store.history(lock)]
    assert outcomes == [(lease.token, "running")]
    assert sql_backend.record(lock).runs_lost == 0


# --- renew ------------------------------------------------------------------------


def test_a_renewal_extends_the_lease_from_the_stores_now(backend, lock):
    """The new expiry is the store's now plus the lease the renewal gives."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    backend.advance(lock, 20.0)
    assert session.renew(lease, 600.0)
    snapshot = backend.store.snapshot(lock)
    (record,) = snapshot.records
    assert (record.expires_at - snapshot.db_now).total_seconds() == pytest.approx(
        600.0, abs=5
    )
    assert (snapshot.db_now - record.renewed_at).total_seconds() == pytest.approx(
        0.0, abs=5
    )


@pytest.mark.parametrize(
    ("holder", "token"),
    [(claim(2).holder, 1), (claim(1).holder, 2), (claim(1).holder, 0)],
    ids=["other-holder", "newer-token", "older-token"],
)
def test_a_renewal_is_a_compare_and_swap_on_holder_and_token(
    backend, lock, holder, token
):
    """A renewal whose holder or token is not the row's changes nothing."""
    backend.take(lock, 1)
    before = kept(backend, lock)
    assert not backend.session().renew(Lease(lock, holder, token), 600.0)
    assert kept(backend, lock) == before


@pytest.mark.parametrize("taker", [2, 1], ids=["another-holder", "same-holder"])
def test_a_stale_holder_neither_renews_nor_releases(backend, lock, taker):
    """After a takeover the old token renews and releases nothing, even when the
    new holder is the same."""
    session = backend.session()
    stale = acquired(session.acquire(lock, claim(1), LEASE_S))
    backend.expire(lock)
    fresh = acquired(backend.session().acquire(lock, claim(taker), LEASE_S))
    assert fresh.token == stale.token + 1
    before = kept(backend, lock)
    assert not session.renew(stale, 600.0)
    assert not session.release(stale)
    assert kept(backend, lock) == before
    assert session.renew(fresh, LEASE_S)


def test_a_renewal_after_expiry_does_not_revive_the_lease(backend, lock):
    """Held up past expiry, a renewal matches nothing, and a contender can take the
    lock at once instead of a whole lease later."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    backend.expire(lock)
    before = kept(backend, lock)
    assert not session.renew(lease, 600.0)
    assert kept(backend, lock) == before
    fresh = acquired(backend.session().acquire(lock, claim(2), LEASE_S))
    assert fresh.token == lease.token + 1


def test_a_lock_never_taken_cannot_be_renewed(backend, lock):
    """Renewing a lock that has no row reports the lease lost, and makes no row."""
    assert not backend.session().renew(Lease(lock, claim(1).holder, 1), LEASE_S)
    assert backend.store.snapshot(lock).records == ()


# --- release ----------------------------------------------------------------------


def test_release_keeps_the_row_and_the_token_keeps_growing(backend, lock):
    """Release frees the lock at once but keeps the row: each holder gets the next
    token, for the life of the table."""
    session = backend.session()
    for n in range(1, 4):
        lease = acquired(session.acquire(lock, claim(n), LEASE_S))
        assert lease.token == n
        assert session.release(lease)
        snapshot = backend.store.snapshot(lock)
        (record,) = snapshot.records
        assert (record.holder, record.token) == (None, n)
        assert record.expires_at <= snapshot.db_now


def test_a_second_release_is_refused(backend, lock):
    """Releasing twice reports False the second time: the lease is no longer ours."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    assert session.release(lease)
    assert not session.release(lease)


# --- statements held up -------------------------------------------------------------


@pytest.mark.parametrize("statement", ["acquire", "renew", "release"])
def test_a_statement_held_up_past_its_bound_fails_and_changes_nothing(
    backend, lock, statement
):
    """Stuck behind another session (bounded-statements), a statement gives up
    with StatementTimeoutError; once free, the lease is as it was."""
    lease = backend.take(lock, 1)
    before = kept(backend, lock)
    session = backend.bounded_store().connect()
    calls = {
        "acquire": lambda: session.acquire(lock, claim(2), LEASE_S),
        "renew": lambda: session.renew(lease, 600.0),
        "release": lambda: session.release(lease),
    }
    try:
        with backend.held_up(lock), pytest.raises(StatementTimeoutError):
            calls[statement]()
    finally:
        session.close()
    assert kept(backend, lock) == before
    assert backend.session().renew(lease, LEASE_S)
