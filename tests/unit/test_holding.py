"""The lease-holding steps runner and elector share, on the in-memory store."""

from __future__ import annotations

import logging
import os

from leaderrun.holding import (
    RECONNECT_BACKOFF_S,
    Backoff,
    Grant,
    HeldLease,
    make_claim,
    release,
    release_or_expire,
)
from leaderrun.lease import kill_deadline, make_timing, parse_lock_id
from leaderrun.testing import FakeClock, InMemoryLeaseStore, InMemorySession

LOCK = parse_lock_id("holding-test")
TIMING = make_timing(4.0)


def grant_on(
    store: InMemoryLeaseStore, clock: FakeClock, t_sent_s: float | None = None
) -> Grant:
    """A lease taken on a new session of ``store``, as a Grant."""
    session = store.connect()
    sent_s = clock() if t_sent_s is None else t_sent_s
    lease = session.acquire(LOCK, make_claim("host", "true"), TIMING.lease_s).lease
    assert lease is not None
    return Grant(lease, sent_s, session)


def test_a_claim_is_unique_to_this_process_start():
    """Two claims of one process share host and pid but never the holder."""
    a, b = make_claim("node1", "backup.sh"), make_claim("node1", "backup.sh")
    assert a.holder != b.holder
    assert a.holder.startswith(f"node1:{os.getpid()}:")
    assert (a.host, a.pid, a.command) == ("node1", os.getpid(), "backup.sh")


def test_the_backoff_grows_to_its_last_pause_and_starts_over_after_a_reset():
    """0.5, 1, 2, then 5 s for as long as it fails; an answer resets it."""
    backoff = Backoff()
    assert [backoff.next_pause_s() for _ in range(6)] == [0.5, 1.0, 2.0, 5.0, 5.0, 5.0]
    assert backoff.failures == 6
    backoff.reset()
    assert backoff.next_pause_s() == RECONNECT_BACKOFF_S[0]


def test_a_grant_is_usable_only_before_its_own_kill_deadline(store, clock, caplog):
    """A reply at t_sent + kill deadline or later is refused, and says so."""
    grant = grant_on(store, clock)
    deadline_s = kill_deadline(grant.t_sent_s, TIMING)
    assert grant.usable(deadline_s - 0.001, TIMING)
    assert caplog.records == []
    assert not grant.usable(deadline_s, TIMING)
    assert "past the kill deadline; not starting" in caplog.text


def test_a_held_lease_counts_its_deadline_from_before_the_acquire(store, clock):
    """The state's first deadline is the grant's t_sent plus the kill deadline."""
    grant = grant_on(store, clock, t_sent_s=clock() - 1.0)
    held = HeldLease.of(grant, store, TIMING, clock=clock, unit_random=lambda: 0.0)
    try:
        assert held.state.snapshot() == (kill_deadline(grant.t_sent_s, TIMING), None)
        assert held.lease == grant.lease
        assert not held.renewer.alive(), "no thread before start_renewing()"
        assert held.renewer.stop(0.0) is grant.session, "the renewer owns it"
    finally:
        held.close()


def test_release_says_whether_the_lease_was_still_ours(store, clock, caplog):
    """Released once; the second time it was no longer ours; neither raises."""
    caplog.set_level(logging.INFO, logger="leaderrun")
    grant = grant_on(store, clock)
    release(grant.session, grant.lease)
    release(grant.session, grant.lease)
    assert store.rows[LOCK.key].holder is None
    assert "released holding-test" in caplog.text
    assert "holding-test was no longer ours to release" in caplog.text


def test_release_or_expire_connects_when_it_has_no_session(store, clock):
    """Without a session (the renewer's was abandoned) it opens one, and closes it."""
    grant = grant_on(store, clock)
    release_or_expire(store, None, grant.lease, TIMING)
    assert store.rows[LOCK.key].holder is None
    assert isinstance(grant.session, InMemorySession)
    assert not grant.session.closed, "not the session it was not given"


def test_release_or_expire_closes_its_session(store, clock):
    """The session given is released on, then closed."""
    grant = grant_on(store, clock)
    release_or_expire(store, grant.session, grant.lease, TIMING)
    assert store.rows[LOCK.key].holder is None
    assert isinstance(grant.session, InMemorySession)
    assert grant.session.closed


def test_an_unreachable_database_leaves_the_lease_to_expire(store, clock, caplog):
    """A release that cannot connect is logged as expiring, never raised."""
    grant = grant_on(store, clock)
    store.available = False
    release_or_expire(store, None, grant.lease, TIMING)
    assert store.rows[LOCK.key].holder == grant.lease.holder
    assert "could not release (the lease will expire)" in caplog.text
