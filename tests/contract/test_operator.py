"""The operators' side of every store: status, release, ``--force``, ``init``.

What ``leaderrun status`` and ``release`` show and do is decided here, by the
store (``leaderrun.views`` only renders it); each test runs on every store
(``backend``). The command line itself is tested in
``tests/integration/test_operator.py``.
"""

from __future__ import annotations

from leaderrun.lease import parse_lock_id
from leaderrun.stores.base import REVOKED_HOLDER, InitOutcome, ReleaseAction
from tests.stores import LEASE_S, acquired, claim

# --- status -----------------------------------------------------------------------


def test_status_of_a_held_an_ended_and_a_released_lease(backend, lock):
    """The row as it is, and the store's now to judge it by: held until its
    expiry, ended after; released, with no holder and its last token."""
    lease = backend.take(lock, 1)
    snapshot = backend.store.snapshot(lock)
    (held,) = snapshot.records
    assert (held.holder, held.token) == (claim(1).holder, lease.token)
    assert held.acquired_at <= snapshot.db_now < held.expires_at
    backend.expire(lock)
    snapshot = backend.store.snapshot(lock)
    (ended,) = snapshot.records
    assert ended.holder == claim(1).holder
    assert ended.expires_at <= snapshot.db_now
    assert backend.session().release(lease)
    (released,) = backend.store.snapshot(lock).records
    assert (released.holder, released.token) == (None, lease.token)


def test_status_of_a_lock_never_taken_has_no_row(backend, lock):
    """A lock with no row yet: nothing, but still the store's now."""
    snapshot = backend.store.snapshot(lock)
    assert snapshot.records == ()
    assert snapshot.db_now.tzinfo is not None


def test_status_of_every_lock_is_sorted_by_name(backend, lock):
    """Without a lock, every row, by lock name."""
    names = [f"{lock.name}-{suffix}" for suffix in ("c", "a", "b")]
    for n, name in enumerate(names):
        backend.take(parse_lock_id(name), n)
    listed = [r.name for r in backend.store.snapshot(None).records]
    assert [name for name in listed if name in names] == sorted(names)


# --- release ----------------------------------------------------------------------


def test_release_refuses_a_live_lease_and_changes_nothing(backend, lock):
    """Without --force a live lease is left alone, and the result says why."""
    backend.take(lock, 1)
    before = backend.record(lock)
    result = backend.store.release(lock, force=False)
    assert result.action is ReleaseAction.refused
    assert result.record == before
    assert backend.record(lock) == before


def test_release_frees_an_ended_lease_and_keeps_its_token(backend, lock):
    """An ended lease is freed; again, it is already free; the next holder gets
    the next token."""
    lease = backend.take(lock, 1)
    backend.expire(lock)
    freed = backend.store.release(lock, force=False)
    assert freed.action is ReleaseAction.freed
    assert freed.record is not None
    assert (freed.record.holder, freed.record.token) == (None, lease.token)
    assert backend.store.release(lock, force=False).action is ReleaseAction.free
    assert backend.take(lock, 2).token == lease.token + 1


def test_release_of_a_lock_never_taken_is_unknown(backend, lock):
    """A lock with no row was never taken: nothing to release."""
    result = backend.store.release(lock, force=True)
    assert (result.action, result.record) == (ReleaseAction.unknown, None)


def test_forced_release_revokes_without_handing_over_early(backend, lock):
    """--force: the holder's renewal fails at once, but nobody takes the lock
    before the revoked lease runs out; then the next holder gets a larger token."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    before = backend.record(lock)
    revoked = backend.store.release(lock, force=True)
    assert revoked.action is ReleaseAction.revoked
    after = backend.record(lock)
    assert after.holder == REVOKED_HOLDER
    assert (after.token, after.expires_at) == (before.token, before.expires_at)
    assert not session.renew(lease, LEASE_S)  # the old holder: lost, now
    early = backend.session().acquire(lock, claim(2), LEASE_S)
    assert early.lease is None
    assert early.expires_in_s is not None
    assert early.expires_in_s > 0
    again = backend.store.release(lock, force=True)
    assert again.action is ReleaseAction.already_revoked
    backend.expire(lock)
    later = acquired(backend.session().acquire(lock, claim(2), LEASE_S))
    assert later.token == lease.token + 1


def test_forced_release_with_a_stale_token_changes_nothing(backend, lock):
    """--token: the lock changed hands since status; the new holder is left alone."""
    lease = backend.take(lock, 1)
    before = backend.record(lock)
    stale = backend.store.release(lock, force=True, token=lease.token - 1)
    assert (stale.action, stale.record) == (ReleaseAction.changed_hands, before)
    assert backend.record(lock) == before
    current = backend.store.release(lock, force=True, token=lease.token)
    assert current.action is ReleaseAction.revoked
    assert backend.record(lock).holder == REVOKED_HOLDER


def test_forced_release_of_an_ended_lease_frees_it(backend, lock):
    """With --force, an ended lease is freed, not revoked."""
    backend.take(lock, 1)
    backend.expire(lock)
    assert backend.store.release(lock, force=True).action is ReleaseAction.freed
    assert backend.record(lock).holder is None


# --- init -------------------------------------------------------------------------


def test_init_creates_the_tables_once_then_finds_them_current(backend):
    """init on a store without tables creates them; again, it changes nothing."""
    fresh = backend.fresh_store()
    assert fresh.init() is InitOutcome.created
    assert fresh.init() is InitOutcome.current


def test_init_after_first_use_finds_the_tables_current(backend, lock):
    """The first acquire made the tables; init then has nothing to do."""
    fresh = backend.fresh_store()
    session = fresh.connect()
    try:
        acquired(session.acquire(lock, claim(1), LEASE_S))
    finally:
        session.close()
    assert fresh.init() is InitOutcome.current
