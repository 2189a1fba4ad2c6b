"""The library's own faults: its grace after a loss, and its callbacks under a stop.

(a) The leader's renewals fail (a trigger refuses them) or its renewal thread
    stalls, while the database answers every other statement. ``is_leader()``
    turns false at the local deadline; from then on at least ``kill_grace``
    must pass before any replica leads again, so that leader-only work that
    began just before the loss (and fits in the grace) finishes alone.
(b) ``on_elected`` blocks while another thread calls ``release()`` or
    ``stop()``: ``on_lost`` never runs before ``on_elected`` returned, both run
    on the campaign thread, and ``stop()`` returns with no term left.

Real replica processes (``tests/helpers/elector_proc.py``) on the session's
PostgreSQL; all instants are this machine's CLOCK_BOOTTIME.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from leaderrun import LeaderElector
from leaderrun.lease import make_timing, name_key
from tests.faults.conftest import WAIT_S, record_figure
from tests.helpers.replicas import Replica, Sample
from tests.helpers.waiting import wait_until

pytestmark = [
    pytest.mark.pg,
    pytest.mark.slow,
    pytest.mark.faults,
    pytest.mark.timeout(180),
]

LEASE_S = 6.0
KILL_GRACE_S = 1.5
TIMING = make_timing(LEASE_S, kill_grace_s=KILL_GRACE_S)
"""Renew every 1 s (+0.2 s jitter); is_leader() false 3.49 s after the last renewal
was sent; the database lets nobody else in before 5.5 s after it."""

WORK_S = 1.0
"""Each leader-only call lasts this long without checking: less than the grace."""

STEP_DOWN_BOUND_S = 10.0
"""How long release()/stop() may take while a callback is stuck (generous)."""


@contextlib.contextmanager
def renewals_refused(pg_admin, key: int, pid: int) -> Iterator[None]:
    """Make the database refuse the renewals of process ``pid`` on lock ``key``.

    A trigger raises on an UPDATE that keeps the holder and token (a renewal);
    acquires (a new token) and releases (holder NULL) still pass, and every
    other statement is answered as usual.
    """
    name = f"leaderrun_test_refuse_{uuid.uuid4().hex[:8]}"
    with pg_admin() as admin:
        admin.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'injected fault: renewal refused'; END $$"
        )
        admin.execute(
            f"CREATE TRIGGER {name} BEFORE UPDATE ON leader_lease FOR EACH ROW "
            f"WHEN (OLD.lock_key = {key} AND OLD.pid = {pid} "
            "AND NEW.holder IS NOT DISTINCT FROM OLD.holder "
            f"AND NEW.token = OLD.token) EXECUTE FUNCTION {name}()"
        )
        try:
            yield
        finally:
            admin.execute(f"DROP TRIGGER IF EXISTS {name} ON leader_lease")
            admin.execute(f"DROP FUNCTION IF EXISTS {name}()")


def terms(replicas: list[Replica]) -> dict[int, tuple[float, float]]:
    """Per token: from its first lead or work sample to its last, on any replica."""
    spans: dict[int, tuple[float, float]] = {}
    for r in replicas:
        for s in r.samples("lead") + r.samples("work"):
            if s.token == 0:
                continue  # work let in just as the term ended: token unknown
            start, end = spans.get(s.token, (s.t0, s.t1))
            spans[s.token] = (min(start, s.t0), max(end, s.t1))
    return spans


@pytest.mark.parametrize("fault", ["renewals refused", "renewal thread stalls"])
def test_after_a_deadline_loss_nobody_leads_within_the_grace(
    pg_dsn, pg_admin, lock_name, fault
):
    """No term starts within kill_grace of the loss; work in flight finishes alone."""
    replica_args = ("--kill-grace", f"{KILL_GRACE_S:g}", "--work-s", f"{WORK_S:g}")
    sabotage = ("--sabotage", "stall") if fault == "renewal thread stalls" else ()
    a = Replica(pg_dsn, lock_name, LEASE_S, *replica_args, *sabotage)
    replicas = [a]
    try:
        first: Sample = wait_until(lambda: a.samples("lead"), "A to lead")[0]
        b = Replica(pg_dsn, lock_name, LEASE_S, *replica_args)
        replicas.append(b)
        wait_until(lambda: "ready" in b.drain(), "B to start")
        with contextlib.ExitStack() as faults:
            if fault == "renewals refused":
                faults.enter_context(
                    renewals_refused(pg_admin, name_key(lock_name), a.proc.pid)
                )
            unlead: Sample = wait_until(
                lambda: [s for s in a.samples("unlead") if s.token == first.token],
                "A's is_leader() to turn false",
            )[0]

            def newer() -> list[Sample]:
                return sorted(
                    (s for r in replicas for s in r.samples("lead")),
                    key=lambda s: s.t0,
                )

            new = wait_until(
                lambda: [s for s in newer() if s.token > first.token],
                "a new term",
                4 * LEASE_S,
            )[0]
        # The leader-only call in flight when A lost must have ended (and said so).
        wait_until(
            lambda: any(
                w.t1 > unlead.t0 for w in a.samples("work") if w.token == first.token
            ),
            "A's leader-only work in flight at the loss to end",
        )
        for r in replicas:
            r.proc.send_signal(signal.SIGTERM)
        for r in replicas:
            r.proc.wait(WAIT_S)
    finally:
        for r in replicas:
            r.close()

    gap_s = new.t0 - unlead.t1
    who = "A itself" if new in a.samples("lead") else "B"
    work_end_s = max(
        w.t1 for w in a.samples("work") if w.token == first.token and w.t0 < unlead.t0
    )
    led = f"token {new.token} ({who}) led {gap_s:.3f}s after A's is_leader() turned"
    assert gap_s >= KILL_GRACE_S, f"{led} false; the grace is {KILL_GRACE_S}s"
    record_figure(
        f"L9 library: {fault}",
        f"next term {gap_s:.2f}s after is_leader() false (grace {KILL_GRACE_S:g}s); "
        f"work in flight ended {work_end_s - unlead.t1:.2f}s after it",
        None,
    )
    spans = sorted(terms(replicas).items(), key=lambda kv: kv[1][0])
    for (t1, (_, end1)), (t2, (start2, _)) in itertools.pairwise(spans):
        assert end1 < start2, (
            f"token {t1}'s leader-only work ran {end1 - start2:.3f}s into token {t2}"
        )


@pytest.mark.parametrize("how", ["release", "stop"])
def test_release_or_stop_while_on_elected_blocks(pg_dsn, pg_admin, lock_name, how):
    """on_lost waits for on_elected, on the campaign thread; stop() leaves no term."""
    entered, let_go = threading.Event(), threading.Event()
    events: list[tuple[str, str]] = []

    def on_elected(token: int) -> None:
        events.append(("elected", threading.current_thread().name))
        entered.set()
        let_go.wait(WAIT_S)
        events.append(("elected returned", threading.current_thread().name))

    def on_lost(reason: str) -> None:
        events.append(("lost", threading.current_thread().name))

    renewers_before = {
        t for t in threading.enumerate() if t.name == "leaderrun-renewer"
    }
    elector = LeaderElector(
        lock_name,
        dsn=pg_dsn,
        lease_s=LEASE_S,
        kill_grace_s=KILL_GRACE_S,
        on_elected=on_elected,
        on_lost=on_lost,
    ).start()
    try:
        assert entered.wait(WAIT_S), "never elected"
        caller = threading.Thread(target=getattr(elector, how), name="caller")
        called_s = time.monotonic()
        caller.start()
        caller.join(STEP_DOWN_BOUND_S)
        returned_after_s = None if caller.is_alive() else time.monotonic() - called_s
        leading_after = elector.is_leader()
        renewers_after = {
            t
            for t in threading.enumerate()
            if t.name == "leaderrun-renewer" and t not in renewers_before
        }
        lost_while_elected = [e for e in events if e[0] == "lost"]
        let_go.set()
        wait_until(lambda: any(e[0] == "lost" for e in events), "on_lost")
        caller.join(WAIT_S)
        with pg_admin() as admin:
            wait_until(
                lambda: (
                    admin.execute(
                        "SELECT holder IS NULL OR expires_at <= now() FROM leader_lease"
                        " WHERE lock_key = %s",
                        (elector.lock.key,),
                    ).fetchone()
                    == (True,)
                ),
                "the lease released or expired",
            )
    finally:
        let_go.set()
        elector.stop()
    assert returned_after_s is not None, (
        f"{how}() did not return within {STEP_DOWN_BOUND_S}s while on_elected blocked"
    )
    assert lost_while_elected == [], "on_lost ran while on_elected was still running"
    assert not leading_after
    if how == "stop":
        assert renewers_after == set(), "a renewal thread outlived stop()"
    assert [what for what, _ in events] == ["elected", "elected returned", "lost"]
    assert {thread for _, thread in events} == {"leaderrun-elector"}
    record_figure(
        f"L10 library: {how}() during on_elected",
        f"{how}() returned in {returned_after_s:.2f}s; on_lost after on_elected, "
        "both on the campaign thread",
        None,
    )
