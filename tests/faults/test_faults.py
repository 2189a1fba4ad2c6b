"""Fault injection: the faults users of leader-election wrappers actually hit.

Each scenario names its row of ``lease-safety.md`` section 8 (F1...F26) and
asserts the outcome given there, then the one property (``Timeline.check``): no
two children of the lock ran at the same moment, and fencing tokens increase in
start order. Failover (fault to the next child's start) is recorded as a
multiple of the lease and printed at the end of the session.

Waits that observe "nothing happens" (the holder keeps its child) are fixed
windows by nature; every other wait polls for its event with a generous bound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from leaderrun.lease import make_timing
from tests.faults.conftest import LEASE_S, Harness, Node, Proc, boottime, record_figure
from tests.faults.proxy import BLACKHOLE, HOLD, PASS
from tests.helpers.waiting import wait_until

pytestmark = [
    pytest.mark.pg,
    pytest.mark.slow,
    pytest.mark.faults,
    pytest.mark.timeout(180),
]

TIMING = make_timing(LEASE_S)
KILLED_BY_S = TIMING.kill_deadline_s + TIMING.kill_grace_s
"""After the last renewal was sent, the child's group is dead by about this."""


def takeover(
    harness: Harness,
    first: Proc,
    fault_s: float,
    scenario: str,
    skipped: int = 0,
    outcome: str = "child stopped, one new holder",
) -> Proc:
    """Wait for the next holder's child; check the property; record the failover.

    The new token is one more than the old, plus ``skipped``: tokens taken by an
    acquire whose reply came too late to start a child (local-deadline), which ran
    nothing.
    """
    nxt = harness.timeline.wait_start(first.token)
    assert nxt.token == first.token + 1 + skipped, "one new holder, the next token"
    harness.timeline.check()
    record_figure(scenario, outcome, nxt.start_s - fault_s)
    return nxt


def backend_pids(pg_admin, node: Node) -> list[int]:
    """The server processes serving ``node``'s connections (through its proxy)."""
    ports = node.proxy.upstream_ports()
    with pg_admin() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s) "
            "AND application_name = 'leaderrun'",
            (ports,),
        ).fetchall()
    return [row[0] for row in rows]


def lease_row(pg_admin, lock: str) -> tuple[str | None, int]:
    with pg_admin() as conn:
        row = conn.execute(
            "SELECT holder, token FROM leader_lease WHERE lock_name = %s", (lock,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def keeps_its_child(harness: Harness, holder: Node, first: Proc, fault_s: float):
    """Past the point where a holder that could not renew would have stopped its
    child, the same child still runs and nobody else started one."""
    window_s = fault_s + KILLED_BY_S + harness.lease_s - boottime()
    time.sleep(max(0.0, window_s))
    assert holder.proc.poll() is None, holder.stderr()
    assert harness.timeline.running(first.token), "the holder's child was stopped"
    assert harness.timeline.tokens() == [first.token], "someone else ran the job"
    harness.timeline.check()


# --- F1: kill -9 of the holder -------------------------------------------------------


@pytest.mark.parametrize("watchdog", ["--watchdog", "--no-watchdog"])
def test_f1_kill_9_of_the_holder(harness, watchdog):
    """kill -9 of leaderrun: its child dies of PDEATHSIG, the grandchild in its group
    by the watchdog; a waiting node takes over when the lease ends.

    Without the watchdog the grandchild survives its killed leaderrun and runs on
    beside the next holder's child: the overlap it exists to prevent.
    """
    holder, first = harness.holder(
        "holder", "--grandchildren", "1", args=("--wait", watchdog)
    )
    contender = harness.node("contender")
    contender.wait_busy()
    wait_until(lambda: len(harness.timeline.running(first.token)) == 2, "grandchild")
    fault_s = boottime()
    os.kill(holder.pid, signal.SIGKILL)
    if watchdog == "--watchdog":
        takeover(harness, first, fault_s, "F1 kill -9 of the holder")
        return
    harness.timeline.wait_start(first.token)
    overlaps = harness.timeline.overlaps()
    assert overlaps, "the grandchild should have outlived its leaderrun"
    assert len(harness.timeline.running(first.token)) == 1
    record_figure(
        "F1 kill -9, --no-watchdog",
        f"OVERLAP (grandchild survives): {overlaps[0]}",
        None,
    )


# --- F4, F16, F17: a partition of the holder -----------------------------------------


@pytest.mark.parametrize(
    ("scenario", "job_args", "procs"),
    [
        ("F4 partition of the holder (blackhole)", (), 1),
        ("F16 partition, child ignores SIGTERM", ("--ignore-term",), 1),
        (
            "F17 partition, grandchildren + a daemon",
            ("--grandchildren", "2", "--daemonize"),
            4,
        ),
    ],
)
def test_partition_of_the_holder(harness, scenario, job_args, procs):
    """Blackholed (no RST), the holder stops its whole job by its deadline, then
    the other node takes over once the lease ends in the database."""
    holder, first = harness.holder("holder", *job_args)
    contender = harness.node("contender")
    contender.wait_busy()
    wait_until(lambda: len(harness.timeline.running(first.token)) == procs, "procs")
    fault_s = boottime()
    holder.proxy.set_mode(BLACKHOLE)
    takeover(harness, first, fault_s, scenario)
    assert holder.wait() == 122
    ended = max(p.end_s for p in harness.timeline.snapshot() if p.token == first.token)
    assert ended - fault_s < KILLED_BY_S + 1.0, "stopped by its own deadline"
    if "--ignore-term" in job_args:
        assert "stopping the command" in holder.stderr()


# --- F5: connection reset, pg_terminate_backend ------------------------------------


@pytest.mark.parametrize("how", ["reset", "terminate"])
def test_f5_connection_reset_keeps_the_child(harness, pg_admin, how):
    """An RST, or the server ending the backend: the holder reconnects, renews on
    the new connection and keeps its child; nobody else runs."""
    holder, first = harness.holder()
    contender = harness.node("contender")
    contender.wait_busy()
    fault_s = boottime()
    if how == "reset":
        assert holder.proxy.reset() >= 1
    else:
        pids = backend_pids(pg_admin, holder)
        assert pids, "the holder's backend"
        with pg_admin() as conn:
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    keeps_its_child(harness, holder, first, fault_s)
    assert "renewal failed" in holder.stderr(), "the fault was felt"
    assert lease_row(pg_admin, harness.lock)[1] == first.token
    record_figure(f"F5 connection {how}", "reconnected, child kept", None)


# --- F6: a frozen backend, a frozen server ----------------------------------------


def test_f6_frozen_backend_is_abandoned(harness, pg_admin, local_cluster):
    """SIGSTOP of the holder's server process: the renewal on it hangs, is
    abandoned after the attempt budget, and a fresh connection renews."""
    holder, first = harness.holder()
    contender = harness.node("contender")
    contender.wait_busy()
    pids = backend_pids(pg_admin, holder)
    assert pids
    fault_s = boottime()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        keeps_its_child(harness, holder, first, fault_s)
        assert "abandoning its connection" in holder.stderr()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    record_figure("F6 frozen backend (SIGSTOP)", "fresh connection, child kept", None)


def server_pids(cluster) -> list[int]:
    """The postmaster and all its children."""
    postmaster = int((Path(cluster.datadir) / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text()
    return [postmaster, *(int(p) for p in children.split())]


def test_f6_frozen_server_longer_than_the_lease(harness, local_cluster):
    """The whole server stopped for 1.5 leases: the holder stops its child by its
    own deadline; after the thaw exactly one node takes over."""
    holder, first = harness.holder()
    contender = harness.node("contender")
    contender.wait_busy()
    pids = server_pids(local_cluster)
    fault_s = boottime()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: not harness.timeline.running(first.token), "child stopped")
        assert boottime() - fault_s < KILLED_BY_S + 1.0
        time.sleep(max(0.0, fault_s + 1.5 * harness.lease_s - boottime()))
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    # The contender's acquire, sent while the server was frozen, is answered
    # after the thaw: too late to start a child before that lease could end
    # (local-deadline). Or it was given up after its bound, its cancel stuck in the
    # frozen server, and it ran at the thaw: the next acquire finds that grant
    # unanswered. Either way it releases that token unused and takes the next.
    harness.timeline.wait_start(first.token)
    stderr = contender.stderr()
    skipped = stderr.count("past the kill deadline; not starting") + stderr.count(
        "its answer never came"
    )
    outcome = "child stopped, one new holder"
    if skipped:
        outcome += f" ({skipped} token granted too late, released unused)"
    takeover(
        harness, first, fault_s, "F6 whole server frozen 1.5 leases", skipped, outcome
    )
    assert holder.wait() == 122


# --- F7, F8: database restarts -------------------------------------------------------


def test_f7_short_restart_keeps_the_child(harness, restartable_cluster):
    """A restart shorter than the outage tolerance: the holder reconnects in time."""
    harness.lease_s = 10.0  # tolerance 5.3 s: room for pg_ctl restart on a busy host
    holder, first = harness.holder()
    contender = harness.node("contender")
    contender.wait_busy()
    fault_s = boottime()
    restartable_cluster.restart("fast")
    outage_s = boottime() - fault_s
    timing = make_timing(harness.lease_s)
    assert outage_s < timing.outage_tolerance_s, "the restart itself took too long"
    time.sleep(
        max(0.0, fault_s + timing.kill_deadline_s + timing.kill_grace_s - boottime())
    )
    assert holder.proc.poll() is None, holder.stderr()
    assert harness.timeline.running(first.token)
    assert harness.timeline.tokens() == [first.token]
    harness.timeline.check()
    record_figure(
        f"F7 restart ({outage_s:.1f}s, lease 10s)", "reconnected, child kept", None
    )


def test_f8_outage_longer_than_the_lease(harness, restartable_cluster):
    """Down for 1.5 leases: the child is stopped at the deadline; after the server
    returns, exactly one of two waiting nodes takes over."""
    holder, first = harness.holder()
    contenders = [harness.node(f"contender{i}") for i in range(2)]
    for contender in contenders:
        contender.wait_busy()
    fault_s = boottime()
    restartable_cluster.stop("fast")
    try:
        wait_until(lambda: not harness.timeline.running(first.token), "child stopped")
        assert boottime() - fault_s < KILLED_BY_S + 1.0
        time.sleep(max(0.0, fault_s + 1.5 * harness.lease_s - boottime()))
    finally:
        restartable_cluster.start()
    nxt = takeover(harness, first, fault_s, "F8 server down 1.5 leases")
    assert holder.wait() == 122
    time.sleep(1.0)  # the loser's next try finds the lock held
    assert harness.timeline.tokens() == [first.token, nxt.token]


# --- F21: a renewal delayed past a takeover ---------------------------------------


def test_f21_renewal_delayed_past_a_takeover(harness, pg_admin):
    """A row lock holds the holder's renewals back until its lease has expired and
    another holder (the test) has taken over: the holder stops its child by its
    deadline, and its late renewal and release change nothing."""
    holder, first = harness.holder()
    with pg_admin() as conn, conn.transaction():
        conn.execute(
            "SELECT 1 FROM leader_lease WHERE lock_name = %s FOR UPDATE",
            (harness.lock,),
        )

        def expired() -> bool:
            row = conn.execute(
                "SELECT expires_at <= clock_timestamp() FROM leader_lease "
                "WHERE lock_name = %s",
                (harness.lock,),
            ).fetchone()
            return bool(row and row[0])

        wait_until(expired, "the lease expired in the database")
        assert not harness.timeline.running(first.token), "stopped before expiry"
        conn.execute(
            "UPDATE leader_lease SET holder = 'intruder', token = token + 1, "
            "expires_at = clock_timestamp() + interval '1 hour' "
            "WHERE lock_name = %s",
            (harness.lock,),
        )
        takeover_s = boottime()
    assert holder.wait() == 122
    # The holder's stale statements were queued behind the row lock; once they
    # have run, the row must be exactly as the intruder left it.
    with pg_admin() as conn:

        def none_queued() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            ).fetchone()
            return row is not None and row[0] == 0

        wait_until(none_queued, "the holder's queued statements ran")
        row = conn.execute(
            "SELECT holder, token, expires_at > clock_timestamp() + interval '50 min' "
            "FROM leader_lease WHERE lock_name = %s",
            (harness.lock,),
        ).fetchone()
    assert row == ("intruder", first.token + 1, True)
    # The release at exit waits at most one statement bound for the row lock
    # (then it is cancelled), so it may give up before the takeover commits;
    # either way it changed nothing, and says which happened.
    err = holder.stderr()
    assert "no longer ours to release" in err or "could not release" in err, err
    ended = max(p.end_s for p in harness.timeline.snapshot() if p.token == first.token)
    assert ended < takeover_s
    harness.timeline.check()
    record_figure(
        "F21 renewal delayed past a takeover",
        f"child stopped {takeover_s - ended:.1f}s before the takeover; stale "
        "renewal matched 0 rows",
        None,
    )


# --- F19: twenty contenders race an expired lease ------------------------------------


def test_f19_twenty_contenders_race_an_expired_lease(harness, pg_admin):
    """An expired lease (its holder was killed), then twenty nodes whose connections
    are held at their proxies and let go at once: exactly one runs, token +1."""
    holder, first = harness.holder()
    os.kill(holder.pid, signal.SIGKILL)
    fault_s = boottime()
    with pg_admin() as conn:

        def expired() -> bool:
            row = conn.execute(
                "SELECT expires_at <= now() FROM leader_lease WHERE lock_name = %s",
                (harness.lock,),
            ).fetchone()
            return bool(row and row[0])

        wait_until(expired, "the killed holder's lease expired")
    racers = [
        harness.node(
            f"racer{i}", args=(), proxy_mode=HOLD, dsn_extra="connect_timeout=120"
        )
        for i in range(20)
    ]
    for racer in racers:
        assert racer.proxy.wait_accepted(1, 120), f"{racer.name} never connected"
    for racer in racers:
        racer.proxy.set_mode(PASS)
    nxt = harness.timeline.wait_start(first.token)
    codes = [r.wait(120) for r in racers if r.proc.pid != _runner_of(harness, nxt)]
    assert codes == [75] * 19
    assert nxt.token == first.token + 1
    assert harness.timeline.tokens() == [first.token, nxt.token]
    harness.timeline.check()
    record_figure(
        "F19 20 contenders race an expired lease",
        "exactly one ran, token +1, 19 exit 75",
        nxt.start_s - fault_s,
    )


def _runner_of(harness: Harness, proc: Proc) -> int:
    """The leaderrun pid whose child is ``proc`` (its parent)."""
    with open(f"/proc/{proc.pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# --- F13: the holder's wall clock is an hour off -------------------------------------


@pytest.mark.parametrize("offset", ["+1h", "-1h"])
def test_f13_holder_clock_an_hour_off(harness, faketime, offset):
    """libfaketime shifts the holder's wall clock by an hour: nothing changes. It
    renews for two leases, and when partitioned it stops its child as always."""
    env = faketime(offset)
    holder, first = harness.holder("holder", env=env)
    contender = harness.node("contender")
    contender.wait_busy()
    time.sleep(2 * harness.lease_s)
    assert harness.timeline.running(first.token), "the skewed holder lost its child"
    assert holder.stderr().count("renewed ") >= 3
    fault_s = boottime()
    holder.proxy.set_mode(BLACKHOLE)
    takeover(harness, first, fault_s, f"F13 holder wall clock {offset}, then partition")
    assert holder.wait() == 122


# --- F25, F26: the renewal thread dies or stalls -----------------------------------


@pytest.mark.parametrize("mode", ["die", "stall"])
def test_f25_f26_renewal_thread_dies_or_stalls(harness, mode):
    """A renewal thread that crashes is a loss at once; one that stalls lets the
    deadline pass. Either way the child stops before anyone else starts."""
    holder, first = harness.holder("holder", sabotage=mode)
    contender = harness.node("contender")
    contender.wait_busy()
    wait_until(lambda: f"renewal thread {mode}s now" in holder.stderr(), "sabotage")
    fault_s = boottime()
    takeover(harness, first, fault_s, f"F25/26 renewal thread {mode}s")
    assert holder.wait() == 122


# --- F2: leaderrun itself is stopped ---------------------------------------------


@pytest.mark.parametrize("watchdog", ["--watchdog", "--no-watchdog"])
def test_f2_sigstop_of_leaderrun_for_two_leases(harness, watchdog):
    """SIGSTOP of leaderrun for two leases. The watchdog stops the child at the
    deadline, so the next holder never overlaps it; on SIGCONT leaderrun stops
    (what is left of) its child before any renewal, and exits 122.

    Without the watchdog the child runs on beside the next holder's: the overlap
    the watchdog exists to prevent, shown happening.
    """
    holder, first = harness.holder("holder", args=("--wait", watchdog))
    contender = harness.node("contender")
    contender.wait_busy()
    wait_until(lambda: "renewed " in holder.stderr(), "a first renewal")
    fault_s = boottime()
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        nxt = harness.timeline.wait_start(first.token)
        time.sleep(max(0.0, fault_s + 2 * harness.lease_s - boottime()))
        log_before = len(holder.stderr())
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    resumed_s = boottime()
    assert holder.wait() == 122
    after = holder.stderr()[log_before:]
    assert "renewed " not in after, "renewed after SIGCONT before stopping the child"
    assert "stopping the command" in after
    if watchdog == "--watchdog":
        assert "watchdog: leaderrun" in holder.stderr()
        harness.timeline.check()
        record_figure(
            "F2 SIGSTOP of leaderrun for 2 leases",
            "watchdog stopped the child; one new holder",
            nxt.start_s - fault_s,
        )
        return
    overlaps = harness.timeline.overlaps()
    assert overlaps, "without the watchdog the old child runs on"
    ended = max(p.end_s for p in harness.timeline.snapshot() if p.token == first.token)
    assert ended - resumed_s < TIMING.kill_grace_s + 2.0, "stopped first on SIGCONT"
    record_figure(
        "F2 SIGSTOP, --no-watchdog", f"OVERLAP until SIGCONT: {overlaps[0]}", None
    )
