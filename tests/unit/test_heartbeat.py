"""LeaseState's rules, and the Renewer's attempts and thread, on the in-memory store.

Attempts run on worker threads, so a few tests wait for a thread, always with a
bound; nothing here sleeps for a fixed time.
"""

from __future__ import annotations

import logging
import re
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from leaderrun.clock import boottime
from leaderrun.heartbeat import LeaseState, Renewal, Renewer
from leaderrun.lease import Lease, Timing, kill_deadline, make_timing, parse_lock_id
from leaderrun.stores.base import Claim
from leaderrun.testing import FakeClock, InMemoryLeaseStore, InMemorySession
from tests.helpers.waiting import wait_until

LOCK = parse_lock_id("heartbeat-test")
CLAIM = Claim(holder="host:1:nonce", host="host", pid=1, command="true")
DEFAULT = make_timing()

HUNG = Timing(lease_s=3.0, renew_interval_s=0.5, jitter_s=0.0, kill_grace_s=0.5)
"""A timing whose attempt budget is about 0.5 s, so a hung attempt is cut short."""

FAST = Timing(lease_s=30.0, renew_interval_s=0.05, jitter_s=0.0, kill_grace_s=1.0)
"""Renew every 50 ms, with a kill deadline (~28 s) no loaded machine comes near."""

WAIT_S = 20.0
"""The bound on waiting for a thread to do what it must; generous for a busy host."""


def readable(fd: int, timeout_s: float = 0.0) -> bool:
    """Whether ``fd`` becomes readable within ``timeout_s``."""
    return bool(select.select([fd], [], [], timeout_s)[0])


class FaultyStore(InMemoryLeaseStore):
    """The in-memory store plus the faults a renewal must survive.

    It keeps every session it opens. While ``gate`` is clear, renewals wait in the
    call (a backend that stopped answering): ``hung`` is set, and ``in_call`` counts
    the calls still inside. The next
    ``crash_connects`` connects and ``crash_renews`` renewals raise RuntimeError,
    as a bug in a store would.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.sessions: list[FaultySession] = []
        self.gate = threading.Event()
        self.gate.set()
        self.hung = threading.Event()
        self.in_call = 0
        self.crash_connects = 0
        self.crash_renews = 0

    def connect(self) -> FaultySession:
        self._check()
        if self.crash_connects > 0:
            self.crash_connects -= 1
            raise RuntimeError("connect crashed")
        session = FaultySession(self)
        self.sessions.append(session)
        return session


class FaultySession(InMemorySession):
    """A session of a :class:`FaultyStore`."""

    def __init__(self, store: FaultyStore) -> None:
        super().__init__(store)
        self.faults = store

    def renew(self, lease: Lease, lease_s: float) -> bool:
        if self.faults.crash_renews > 0:
            self.faults.crash_renews -= 1
            raise RuntimeError("renew crashed")
        if not self.faults.gate.is_set():
            self.faults.hung.set()
            self.faults.in_call += 1
            try:
                if not self.faults.gate.wait(WAIT_S * 3):
                    raise AssertionError("the test never opened the gate")
            finally:
                self.faults.in_call -= 1
        return super().renew(lease, lease_s)


class Holder:
    """A lease taken on a FaultyStore, with the Renewer and LeaseState that keep it."""

    def __init__(
        self, store: FaultyStore, timing: Timing, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.session = store.connect()
        t_sent_s = clock()
        lease = self.session.acquire(LOCK, CLAIM, timing.lease_s).lease
        assert lease is not None
        self.lease = lease
        self.first_deadline_s = kill_deadline(t_sent_s, timing)
        self.state = LeaseState(self.first_deadline_s)
        self.renewer = Renewer(
            store,
            self.session,
            lease,
            timing,
            self.state,
            t_sent_s=t_sent_s,
            clock=clock,
            unit_random=lambda: 0.5,
        )


@pytest.fixture
def holders() -> Iterator[Callable[..., Holder]]:
    """Makes Holders; at teardown opens every gate and stops every renewal thread."""
    made: list[Holder] = []

    def make(timing: Timing = FAST, clock: Callable[[], float] = boottime) -> Holder:
        holder = Holder(FaultyStore(FakeClock()), timing, clock)
        made.append(holder)
        return holder

    yield make
    for holder in made:
        holder.store.gate.set()
        if holder.renewer.alive():
            holder.renewer.stop(WAIT_S)
        holder.state.close()


# --- LeaseState -------------------------------------------------------------------


@pytest.fixture
def state() -> Iterator[LeaseState]:
    lease_state = LeaseState(kill_deadline(100.0, DEFAULT))
    yield lease_state
    lease_state.close()


def test_extend_moves_the_deadline_to_the_renewals_own(state):
    """A later renewal answered in time moves the kill deadline to its own."""
    assert state.extend(105.0, 106.0, DEFAULT)
    assert state.snapshot() == (kill_deadline(105.0, DEFAULT), None)


def test_extend_never_moves_the_deadline_back(state):
    """A reply to an older renewal counts as success but keeps the later deadline."""
    assert state.extend(90.0, 91.0, DEFAULT)
    assert state.snapshot() == (kill_deadline(100.0, DEFAULT), None)


def test_a_reply_after_its_own_deadline_is_refused(state):
    """A reply at t_sent + kill deadline or later is refused and changes nothing."""
    own_deadline_s = kill_deadline(110.0, DEFAULT)
    assert not state.extend(110.0, own_deadline_s, DEFAULT)
    assert not state.extend(110.0, own_deadline_s + 1.0, DEFAULT)
    assert state.snapshot() == (kill_deadline(100.0, DEFAULT), None)
    assert state.extend(110.0, own_deadline_s - 0.001, DEFAULT)
    assert state.snapshot() == (own_deadline_s, None)


def test_a_renewal_sent_after_the_deadline_is_refused(state):
    """Sent once the deadline had passed (leaderrun was paused), it cannot revive."""
    deadline_s = kill_deadline(100.0, DEFAULT)
    assert not state.extend(deadline_s, deadline_s + 0.1, DEFAULT)
    assert not state.extend(deadline_s + 5.0, deadline_s + 5.1, DEFAULT)
    assert state.snapshot() == (deadline_s, None)


def test_extend_is_refused_after_freeze(state):
    """Once frozen, even a timely renewal is refused: the kill has begun."""
    state.freeze()
    assert not state.extend(105.0, 106.0, DEFAULT)
    assert state.snapshot() == (kill_deadline(100.0, DEFAULT), None)


def test_extend_is_refused_after_loss(state):
    """Once lost, a lease is not renewed by a late success."""
    state.lose("taken over")
    assert not state.extend(105.0, 106.0, DEFAULT)
    assert state.snapshot() == (kill_deadline(100.0, DEFAULT), "taken over")


def test_lose_wakes_the_supervisor_and_keeps_the_first_reason(state):
    """lose() makes fileno() readable; a second loss does not change the reason."""
    assert not readable(state.fileno())
    state.freeze()
    assert not readable(state.fileno()), "freezing is not losing"
    state.lose("taken over")
    state.lose("released by an operator")
    assert readable(state.fileno(), WAIT_S)
    assert state.snapshot()[1] == "taken over"


# --- Renewer.attempt ------------------------------------------------------------------


def test_attempt_renews_while_the_lease_is_ours(holders):
    """An attempt on a lease still ours renews it, extending it in the store."""
    holder = holders(DEFAULT, FakeClock())
    holder.store.clock.advance(10.0)
    assert holder.renewer.attempt() is Renewal.renewed
    assert holder.store.statements["renew"] == 1
    row = holder.store.rows[LOCK.key]
    assert row.expires_at_s == holder.store.clock() + DEFAULT.lease_s


def test_attempt_reports_a_takeover_as_lost(holders):
    """After someone else took the lock, an attempt reports it lost, for certain."""
    holder = holders(DEFAULT, FakeClock())
    holder.store.take_over(LOCK)
    assert holder.renewer.attempt() is Renewal.lost


def test_attempt_fails_while_unavailable_and_reconnects_after(holders):
    """An unreachable store is a failed attempt; once back, a new session renews."""
    holder = holders(DEFAULT, FakeClock())
    holder.store.available = False
    assert holder.renewer.attempt() is Renewal.failed
    assert holder.session.closed, "the failed session is dropped"
    assert holder.renewer.attempt() is Renewal.failed, "connecting fails too"
    holder.store.available = True
    assert holder.renewer.attempt() is Renewal.renewed
    assert len(holder.store.sessions) == 2
    assert not holder.store.sessions[1].closed


def test_an_attempt_that_hangs_is_abandoned_after_its_budget(holders):
    """A renewal stuck in the store is given up after the attempt budget: failed."""
    holder = holders(HUNG, FakeClock())
    assert HUNG.attempt_budget_s == pytest.approx(0.5, abs=0.01)
    holder.store.gate.clear()
    started_s = time.monotonic()
    assert holder.renewer.attempt() is Renewal.failed
    assert time.monotonic() - started_s >= HUNG.attempt_budget_s - 0.001
    assert holder.store.in_call == 1, "returned while the call is still stuck"


def test_the_abandoned_session_is_closed_once_the_hung_call_returns(holders):
    """The stuck session is closed when its call returns; the next one is fresh."""
    holder = holders(HUNG, FakeClock())
    holder.store.gate.clear()
    assert holder.renewer.attempt() is Renewal.failed
    assert not holder.session.closed, "closed under the feet of a running statement"
    holder.store.gate.set()
    wait_until(lambda: holder.session.closed, "the abandoned session was closed")
    assert holder.renewer.attempt() is Renewal.renewed
    assert len(holder.store.sessions) == 2


# --- the renewal thread ---------------------------------------------------------------


def test_the_thread_keeps_extending_the_deadline(holders):
    """Started, the renewer renews again and again; stopped, it returns its session."""
    holder = holders()
    holder.renewer.start()
    wait_until(lambda: holder.renewer.renewals >= 3, "three renewals")
    deadline_s, lost = holder.state.snapshot()
    assert lost is None
    assert deadline_s > holder.first_deadline_s
    assert holder.renewer.stop(WAIT_S) is holder.session
    holder.renewer.join(WAIT_S)  # handed back at once; the thread ends after
    assert not holder.renewer.alive()
    assert not holder.session.closed
    assert holder.store.statements["renew"] >= 3


def test_an_idle_renewer_hands_its_session_back_at_once(holders):
    """Stopped between renewals, the session comes back without waiting for the
    thread (the release is on the hand-off path); no renewal follows."""
    holder = holders(make_timing(30.0))  # the next renewal is seconds away
    holder.renewer.start()
    assert holder.renewer.stop(0.0) is holder.session  # a join of 0 s: not ended yet
    holder.renewer.join(WAIT_S)
    assert not holder.renewer.alive()
    assert holder.store.statements["renew"] == 0
    assert not holder.session.closed


def test_a_renewal_under_way_keeps_the_session_until_it_ends(holders):
    """Stopped during a renewal, the session is handed back once the attempt ended."""
    holder = holders()
    holder.store.gate.clear()
    holder.renewer.start()
    assert holder.store.hung.wait(WAIT_S)
    assert holder.renewer.stop(0.0) is None  # in use: not handed back
    holder.store.gate.set()


def test_the_thread_reports_a_takeover_and_ends(holders):
    """After a takeover the thread reports the loss, waking the supervisor, and ends."""
    holder = holders()
    holder.renewer.start()
    wait_until(lambda: holder.renewer.renewals >= 1, "a first renewal")
    holder.store.take_over(LOCK)
    assert readable(holder.state.fileno(), WAIT_S)
    _, lost = holder.state.snapshot()
    assert lost is not None
    assert "taken over" in lost
    assert "token 1" in lost
    wait_until(lambda: not holder.renewer.alive(), "the renewal thread ended")


def test_woken_past_the_deadline_it_reports_a_loss_and_does_not_renew(holders):
    """After a pause past the deadline, the thread stops the child first (F2, F15)."""
    clock = FakeClock()
    holder = holders(FAST, clock)
    clock.advance(holder.first_deadline_s - clock() + 1.0)
    holder.renewer.start()
    assert readable(holder.state.fileno(), WAIT_S)
    assert holder.state.snapshot()[1] == (
        "the kill deadline passed before the next renewal"
    )
    wait_until(lambda: not holder.renewer.alive(), "the renewal thread ended")
    assert holder.store.statements["renew"] == 0


def test_once_the_stop_has_begun_the_thread_ends_and_renews_no_more(holders, caplog):
    """A frozen state (the supervisor is stopping the child) ends the thread: no
    further renewal could count, so none is sent, and none is retried in a loop
    (it once spun through the whole kill grace, flooding stderr and the store)."""
    caplog.set_level(logging.WARNING, logger="leaderrun")
    holder = holders()
    holder.renewer.start()
    wait_until(lambda: holder.renewer.renewals >= 1, "a first renewal")
    holder.state.freeze()
    wait_until(lambda: not holder.renewer.alive(), "the renewal thread ended")
    sent = holder.store.statements["renew"]
    assert sent <= holder.renewer.renewals + 1  # at most the one already under way
    assert not [r for r in caplog.records if "after the kill deadline" in r.message]
    assert holder.state.snapshot()[1] is None  # a stop is not a loss
    assert holder.renewer.stop(WAIT_S) is holder.session  # kept for the release


def test_renew_once_sends_nothing_after_freeze(holders):
    """Driven by hand (the elector's poll), a frozen state sends no statement."""
    holder = holders()
    holder.state.freeze()
    assert holder.renewer.renew_once() is Renewal.lost
    assert holder.store.statements["renew"] == 0


def test_a_crashing_store_is_a_failed_attempt_not_a_dead_thread(holders, caplog):
    """RuntimeError from connect or renew is logged, retried, and renewals resume."""
    caplog.set_level(logging.WARNING, logger="leaderrun")
    holder = holders()
    holder.store.crash_renews = 2
    holder.store.crash_connects = 1
    holder.renewer.start()
    wait_until(lambda: holder.renewer.renewals >= 1, "a renewal after the crashes")
    assert holder.renewer.alive()
    assert holder.state.snapshot()[1] is None
    crashes = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert [str(r.exc_info[1]) for r in crashes if r.exc_info] == [
        "renew crashed",
        "connect crashed",
        "renew crashed",
    ]


def test_a_streak_of_failed_renewals_warns_once_and_once_more_when_it_ends(
    holders, caplog
):
    """Retried every 0.25 s until the deadline, failures would flood stderr: the
    first is a warning, the rest are debug lines, and the recovery says how many."""
    caplog.set_level(logging.DEBUG, logger="leaderrun")
    holder = holders()
    holder.store.failing = {"renew"}
    holder.renewer.start()
    wait_until(lambda: holder.renewer.failed_attempts >= 3, "three failed attempts")
    failed = holder.renewer.failed_attempts
    holder.store.failing = set()
    wait_until(lambda: holder.renewer.renewals >= 1, "a renewal after the streak")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([m for m in warnings if m.startswith("renewal failed")]) == 1
    recovered = [m for m in warnings if m.startswith("renewed")]
    assert len(recovered) == 1
    counted = re.search(r"after (\d+) failed attempt", recovered[0])
    assert counted is not None, recovered[0]
    assert int(counted.group(1)) >= failed
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(r.getMessage().startswith("renewal failed") for r in debug)
