"""The cron guards and the run history: once-per windows, min-hold, runs kept.

Every store decides a window by its own clock, keeps a lease past its run for
``--min-hold``, and records, closes and prunes runs in the acquire and release
themselves. Each test runs on every store (``backend``).
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from leaderrun.lease import parse_lock_id
from leaderrun.runs import RunEnd, RunOutcome
from leaderrun.slots import OncePer, Window
from leaderrun.stores.base import RunOutput
from tests.stores import LEASE_S, WAIT_S, acquired, claim, race

HOUR = OncePer(Window(3600.0))
HOUR_RETRY = OncePer(Window(3600.0), retry_failed=True)
OK_IN_WINDOW = RunEnd(RunOutcome.ok, 0, in_window=True)
FAILED_IN_WINDOW = RunEnd(RunOutcome.failed, 2, in_window=True)

RACING_NODES = 10
RACE_FOR_S = 1.0


# --- --once-per -------------------------------------------------------------------


def test_a_window_that_ran_refuses_a_second_start(backend, lock):
    """After an ok run, a later start in the same window is refused: window_done."""
    session = backend.session()
    first = session.acquire(lock, claim(1), LEASE_S, once_per=HOUR)
    assert first.window_start is not None
    assert first.window_start.timestamp() % 3600 == 0
    assert session.release(acquired(first), OK_IN_WINDOW)
    again = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR)
    assert (again.lease, again.window_done) == (None, True)
    assert again.window_start == first.window_start
    assert again.holder_host == "host1"
    # --retry-failed changes nothing after a run that went well.
    assert session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY).window_done


def test_the_next_window_runs_again(backend, lock):
    """A whole period later, the window is a new one, and a start is accepted."""
    session = backend.session()
    first = session.acquire(lock, claim(1), LEASE_S, once_per=HOUR)
    session.release(acquired(first), OK_IN_WINDOW)
    backend.advance(lock, 3600.0)
    again = acquired(session.acquire(lock, claim(2), LEASE_S, once_per=HOUR))
    assert again.token == 2


def test_without_once_per_the_window_does_not_matter(backend, lock):
    """A plain run of the lock is not refused, and keeps the window's state."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    session.release(lease, OK_IN_WINDOW)
    plain = acquired(session.acquire(lock, claim(2), LEASE_S))
    session.release(plain, RunEnd(RunOutcome.failed, 1))
    assert session.acquire(lock, claim(3), LEASE_S, once_per=HOUR).window_done
    assert session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY).window_done


def test_a_failed_window_reruns_only_with_retry_failed(backend, lock):
    """A run that failed leaves its window done, unless --retry-failed."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    session.release(lease, FAILED_IN_WINDOW)
    assert session.acquire(lock, claim(2), LEASE_S, once_per=HOUR).window_done
    retried = session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY)
    assert acquired(retried).token == lease.token + 1


def test_a_lost_window_reruns_only_with_retry_failed(backend, lock):
    """A holder that died (no release) leaves window_ok unset: the run was lost."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    backend.expire(lock)
    assert session.acquire(lock, claim(2), LEASE_S, once_per=HOUR).window_done
    retried = session.acquire(lock, claim(3), LEASE_S, once_per=HOUR_RETRY)
    assert acquired(retried).token == lease.token + 1


def test_a_running_window_is_done_for_others(backend, lock):
    """While the window's run holds the lease, a node without retry gives up; one
    with --retry-failed waits, as the run may yet fail."""
    session = backend.session()
    acquired(session.acquire(lock, claim(1), LEASE_S, once_per=HOUR))
    busy = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR)
    assert (busy.lease, busy.window_done) == (None, True)
    waiting = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR_RETRY)
    assert (waiting.lease, waiting.window_done) == (None, False)


def test_racing_nodes_start_a_window_once(backend, lock):
    """Nodes acquiring and releasing in a loop, all at once: one start a window."""
    starts: list[int] = []

    def node(n: int, barrier: threading.Barrier) -> None:
        with contextlib.closing(backend.store.connect()) as session:
            barrier.wait(WAIT_S)
            stop_at = time.monotonic() + RACE_FOR_S
            while time.monotonic() < stop_at:
                result = session.acquire(
                    lock, claim(n), LEASE_S, once_per=HOUR, history_keep=50
                )
                if result.lease is not None:
                    starts.append(n)
                    session.release(result.lease, OK_IN_WINDOW)

    assert race(RACING_NODES, node) == [None] * RACING_NODES
    assert len(starts) == 1
    [run] = backend.store.history(lock, 10)
    assert run.outcome == "ok"


# --- --min-hold -------------------------------------------------------------------


def test_min_hold_keeps_the_lease_taken_after_release(backend, lock):
    """Released early, the lease stays with its holder until acquired + min-hold."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    backend.advance(lock, 1.0)
    assert session.release(lease, RunEnd(RunOutcome.ok, 0, min_hold_s=5.0))
    held = session.acquire(lock, claim(2), LEASE_S)
    assert (held.lease, held.holder) == (None, claim(1).holder)
    assert held.expires_in_s == pytest.approx(4.0, abs=1)
    backend.advance(lock, 4.0)
    assert acquired(session.acquire(lock, claim(2), LEASE_S)).token == lease.token + 1


def test_min_hold_shorter_than_the_run_frees_at_once(backend, lock):
    """A run that lasted longer than min-hold frees the lock at its release."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    backend.advance(lock, 0.2)
    assert session.release(lease, RunEnd(RunOutcome.ok, 0, min_hold_s=0.1))
    assert acquired(session.acquire(lock, claim(2), LEASE_S)).token == lease.token + 1


# --- the run history --------------------------------------------------------------


def runs(backend, lock) -> list[tuple[object, ...]]:
    """(token, holder, outcome, exit status, finished) of each run, oldest first."""
    return [
        (r.token, r.holder, r.outcome, r.exit_status, r.finished_at is not None)
        for r in reversed(backend.store.history(lock, 100))
    ]


def test_each_start_is_recorded_and_closed_by_its_release(backend, lock):
    """The acquire records a running run; the release closes it with its outcome."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=10))
    assert runs(backend, lock) == [(1, claim(1).holder, "running", None, False)]
    session.release(lease, RunEnd(RunOutcome.failed, 3))
    assert runs(backend, lock) == [(1, claim(1).holder, "failed", 3, True)]


def test_no_history_without_history_keep(backend, lock):
    """The library's plain acquire records nothing."""
    session = backend.session()
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    session.release(lease, RunEnd(RunOutcome.ok, 0))
    assert runs(backend, lock) == []


def test_a_dead_holders_run_is_closed_as_lost_at_its_last_renewal(backend, lock):
    """The next holder closes the dead one's run, finished at its last renewal; a
    late report of how it ended is kept, but not its own later time."""
    session = backend.session()
    first = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=10))
    backend.advance(lock, 5.0)
    assert session.renew(first, LEASE_S)
    backend.expire(lock)
    backend.advance(lock, 5.0)
    renewed_at = backend.record(lock).renewed_at
    second = acquired(session.acquire(lock, claim(2), LEASE_S, history_keep=10))
    lost, running = reversed(backend.store.history(lock, 10))
    assert (lost.token, lost.outcome, lost.finished_at) == (1, "lost", renewed_at)
    assert (running.token, running.outcome) == (2, "running")
    session.release(first, RunEnd(RunOutcome.lost, 122))
    assert runs(backend, lock)[0] == (1, claim(1).holder, "lost", 122, True)
    assert backend.store.history(lock, 10)[1].finished_at == renewed_at
    session.release(second, RunEnd(RunOutcome.ok, 0))
    assert runs(backend, lock)[1] == (2, claim(2).holder, "ok", 0, True)


def test_the_history_is_pruned_to_keep_by_the_acquire(backend, lock):
    """Each acquire keeps the lock's newest ``history_keep`` runs, no more."""
    session = backend.session()
    for n in range(7):
        lease = acquired(session.acquire(lock, claim(n), LEASE_S, history_keep=3))
        assert len(runs(backend, lock)) == min(n + 1, 3)
        session.release(lease, RunEnd(RunOutcome.ok, 0))
    assert [run[0] for run in runs(backend, lock)] == [5, 6, 7]


def test_history_and_last_runs_read_back_every_state(backend, lock):
    """Runs read back newest first, as ok, running or lost; last_runs has each
    lock's newest; a limit and every lock's history work."""
    session = backend.session()
    other = parse_lock_id(f"{lock.name}-other")
    ok = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=10))
    backend.advance(lock, 1.0)
    session.release(ok, RunEnd(RunOutcome.ok, 0))
    acquired(session.acquire(lock, claim(2), LEASE_S, history_keep=10))  # running
    dead = acquired(session.acquire(other, claim(3), LEASE_S, history_keep=10))
    backend.expire(other)  # died, and nobody took over yet
    history = backend.store.history(lock, 10)
    assert [(r.token, r.outcome, r.host, r.pid) for r in history] == [
        (2, "running", "host2", 2),
        (1, "ok", "host1", 1),
    ]
    assert (history[1].exit_status, history[1].command) == (0, "job")
    assert history[1].duration_s == pytest.approx(1.0, abs=1)
    assert history[1].finished_at is not None
    assert [r.token for r in backend.store.history(lock, 1)] == [2]
    last = {r.lock: (r.token, r.outcome) for r in backend.store.last_runs()}
    assert last[str(lock)] == (2, "running")
    assert last[str(other)] == (dead.token, "lost")
    every = {r.lock for r in backend.store.history(None, 1000)}
    assert every >= {str(lock), str(other)}


def test_a_store_without_runs_has_an_empty_history(backend):
    """History on a store whose tables were never made is empty, not an error."""
    fresh = backend.fresh_store()
    assert fresh.history(None, 10) == []
    assert fresh.last_runs() == []


# --- counters and runs that never started -------------------------------------------


def counts(backend, lock) -> dict[str, int]:
    record = backend.record(lock)
    return {o.value: getattr(record, f"runs_{o.value}") for o in RunOutcome}


def test_each_run_is_counted_once_by_its_outcome(backend, lock):
    """The lease row counts runs by outcome and keeps the last success; the
    counters outlive the history pruned to two runs."""
    session = backend.session()
    for outcome, status in [("ok", 0), ("failed", 2), ("ok", 0), ("timeout", 143)]:
        lease = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=2))
        assert session.release(lease, RunEnd(RunOutcome(outcome), status))
    assert counts(backend, lock) == {
        "ok": 2,
        "failed": 1,
        "killed": 0,
        "timeout": 1,
        "lost": 0,
    }
    assert len(backend.store.history(lock, 10)) == 2
    last_ok = backend.record(lock).last_ok_at
    assert last_ok is not None
    assert [r.outcome for r in backend.store.history(lock, 10)] == ["timeout", "ok"]


def test_a_dead_holder_s_run_is_counted_lost_once(backend, lock):
    """The next acquire closes it as lost and counts it; the dead holder's late
    release (after a partition) corrects the history but not the counters."""
    session = backend.session()
    dead = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=5))
    backend.expire(lock)
    acquired(session.acquire(lock, claim(2), LEASE_S, history_keep=5))
    assert counts(backend, lock)["lost"] == 1
    session.release(dead, RunEnd(RunOutcome.ok, 0))
    assert counts(backend, lock) == {
        "ok": 0,
        "failed": 0,
        "killed": 0,
        "timeout": 0,
        "lost": 1,
    }
    assert backend.record(lock).last_ok_at is None


def test_a_run_that_never_started_leaves_no_trace(backend, lock):
    """A grant given back unused (too late, cancelled): no run in the history,
    no count, and its slot is not spent."""
    session = backend.session()
    lease = acquired(
        session.acquire(lock, claim(1), LEASE_S, once_per=HOUR, history_keep=5)
    )
    never = RunEnd(RunOutcome.killed, None, in_window=True, started=False)
    assert session.release(lease, never)
    assert backend.store.history(lock, 10) == []
    assert sum(counts(backend, lock).values()) == 0
    again = session.acquire(lock, claim(2), LEASE_S, once_per=HOUR, history_keep=5)
    assert acquired(again).token == lease.token + 1


def test_a_run_keeps_its_captured_output(backend, lock):
    """The release stores the output tail; run_output finds the newest run's, or
    a given token's; a run without capture has none."""
    session = backend.session()
    first = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=5))
    session.release(first, RunEnd(RunOutcome.failed, 2, output="boom\nline 2\n"))
    second = acquired(session.acquire(lock, claim(1), LEASE_S, history_keep=5))
    session.release(second, RunEnd(RunOutcome.ok, 0))
    store = backend.store
    assert store.run_output(lock) == RunOutput(second.token, None)
    assert store.run_output(lock, first.token) == RunOutput(
        first.token, "boom\nline 2\n"
    )
    assert store.run_output(lock, 999) is None
