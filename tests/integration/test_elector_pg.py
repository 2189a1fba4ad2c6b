"""LeaderElector against a real PostgreSQL: processes, faults, callbacks, decorators."""

import asyncio
import itertools
import signal
import time

import psycopg
import pytest

from leaderrun import LeaderElector, NotLeaderError, leader_only
from leaderrun.elector import LOST_DEADLINE, LOST_STOPPED
from leaderrun.lease import name_key
from tests.helpers.replicas import Replica
from tests.helpers.waiting import wait_until

pytestmark = [pytest.mark.pg, pytest.mark.slow]

LEASE_S = 6.0  # renew 1 s, jitter 0.2 s, kill grace 1 s: deadline 3.99 s
WAIT_S = 60.0  # generous: the machine may be loaded


def test_three_processes_one_leader_and_a_larger_token_after_kill_9(pg_dsn, lock_name):
    replicas = [Replica(pg_dsn, lock_name, LEASE_S) for _ in range(3)]
    try:
        for r in replicas:
            wait_until(lambda r=r: "ready" in r.drain(), "a replica to start")
        wait_until(lambda: any(r.leads() for r in replicas), "a first leader")
        time.sleep(2.0)  # let the leader renew a couple of times

        def latest(rs: list[Replica]) -> tuple[Replica, int]:
            """The replica with the most recent leading sample, and its token."""
            sampled = [(r.leads()[-1], r) for r in rs if r.leads()]
            (token, _, _), replica = max(sampled, key=lambda s: s[0][2])
            return replica, token

        first, first_token = latest(replicas)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(WAIT_S)
        others = [r for r in replicas if r is not first]

        def new_term() -> bool:
            return any(t > first_token for r in others for t, _, _ in r.leads())

        wait_until(new_term, "a new leader with a larger token", 3 * LEASE_S + 10)
        time.sleep(1.0)
        _, second_token = latest(others)
        assert second_token > first_token
        for r in others:
            r.proc.send_signal(signal.SIGTERM)
        for r in others:
            assert r.proc.wait(WAIT_S) == 0
            wait_until(lambda r=r: "stopped" in r.drain(), "the replica to stop")
    finally:
        for r in replicas:
            r.close()

    # Every replica's leading samples, per term; no two terms may overlap in time
    # (all clocks are this machine's CLOCK_BOOTTIME).
    terms: dict[tuple[int, int], tuple[float, float]] = {}
    for index, r in enumerate(replicas):
        for token, t0, t1 in r.leads():
            start, end = terms.get((index, token), (t0, t1))
            terms[(index, token)] = (min(start, t0), max(end, t1))
    assert len({token for _, token in terms}) == len(terms), "a token led twice"
    spans = sorted(terms.values())
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end < start, f"two leaders at once: {spans}"
    tokens_in_time_order = [
        token for (_, token), _ in sorted(terms.items(), key=lambda kv: kv[1])
    ]
    assert tokens_in_time_order == sorted(tokens_in_time_order)
    elected = [line for r in replicas for line in r.seen if line.startswith("elected")]
    assert len(elected) >= len(terms) >= 2


def test_is_leader_turns_false_before_the_database_expiry_when_renewals_block(
    pg_dsn, pg_admin, lock_name
):
    lost: list[str] = []
    with LeaderElector(
        lock_name, dsn=pg_dsn, lease_s=LEASE_S, on_lost=lost.append
    ) as e:
        assert e.wait_for_leadership(WAIT_S)
        key = name_key(lock_name)
        with pg_admin() as blocker, pg_admin() as observer:
            # A row lock on the lease row: every renewal UPDATE now waits behind it.
            blocker.execute("BEGIN")
            blocker.execute(
                "SELECT 1 FROM leader_lease WHERE lock_key = %s FOR UPDATE", (key,)
            )
            try:
                wait_until(lambda: not e.is_leader(), "is_leader() to turn false")
                (remaining_s,) = observer.execute(
                    "SELECT extract(epoch FROM expires_at - clock_timestamp())::float8"
                    "  FROM leader_lease WHERE lock_key = %s",
                    (key,),
                ).fetchone()
                # The database would hand the lease to another only after this.
                assert remaining_s > 0.0, "is_leader() was true after the db expiry"
                assert e.token is None
                wait_until(lambda: lost, "on_lost")
                assert len(lost) == 1
                assert lost[0].startswith(LOST_DEADLINE)
            finally:
                blocker.execute("ROLLBACK")
    assert len(lost) == 1, "stop() after a lost term calls on_lost no more"


def test_callbacks_fire_once_per_term_across_a_takeover(pg_dsn, pg_admin, lock_name):
    events: list[tuple[str, object]] = []
    elector = LeaderElector(
        lock_name,
        dsn=pg_dsn,
        lease_s=LEASE_S,
        on_elected=lambda token: events.append(("elected", token)),
        on_lost=lambda reason: events.append(("lost", reason)),
    )
    with elector:
        assert elector.wait_for_leadership(WAIT_S)
        token = elector.token
        # Kill our connection: renewal reconnects, and the term goes on.
        with pg_admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'leaderrun' AND pid <> pg_backend_pid()"
            )
        time.sleep(3 * elector.timing.renew_interval_s)
        assert elector.is_leader()
        assert elector.token == token
        assert events == [("elected", token)]
        with pg_admin() as admin:
            admin.execute(
                "UPDATE leader_lease SET holder = 'thief', token = token + 1,"
                " expires_at = now() + interval '1 hour' WHERE lock_key = %s",
                (elector.lock.key,),
            )
        wait_until(lambda: len(events) == 2, "on_lost after the takeover")
        assert not elector.is_leader()
        time.sleep(2 * elector.timing.renew_interval_s)
    assert events[0] == ("elected", token)
    assert events[1][0] == "lost"
    assert "taken over" in str(events[1][1])
    assert len(events) == 2


def test_stop_fires_on_lost_once_and_releases(pg_dsn, pg_admin, lock_name):
    lost: list[str] = []
    with LeaderElector(
        lock_name, dsn=pg_dsn, lease_s=LEASE_S, on_lost=lost.append
    ) as e:
        assert e.wait_for_leadership(WAIT_S)
    assert lost == [LOST_STOPPED]
    with pg_admin() as admin:
        row = admin.execute(
            "SELECT holder, token FROM leader_lease WHERE lock_key = %s",
            (e.lock.key,),
        ).fetchone()
    assert row == (None, 1)


def test_leader_only_on_a_real_leader_and_follower(pg_dsn, lock_name):
    a = LeaderElector(lock_name, dsn=pg_dsn, lease_s=LEASE_S).start()
    b = LeaderElector(lock_name, dsn=pg_dsn, lease_s=LEASE_S).start()
    try:
        wait_until(lambda: a.is_leader() or b.is_leader(), "a leader")
        leader, follower = (a, b) if a.is_leader() else (b, a)
        time.sleep(0.5)
        assert not follower.is_leader()

        for elector, leading in ((leader, True), (follower, False)):

            @leader_only(elector=elector)
            def skip() -> str:
                return "ran"

            @leader_only(elector=elector, on_not_leader="raise")
            def strict() -> str:
                return "ran"

            @leader_only(elector=elector)
            async def askip() -> str:
                return "ran"

            @leader_only(elector=elector, on_not_leader="raise")
            async def astrict() -> str:
                return "ran"

            if leading:
                assert skip() == "ran"
                assert strict() == "ran"
                assert asyncio.run(askip()) == "ran"
                assert asyncio.run(astrict()) == "ran"
            else:
                assert skip() is None
                assert asyncio.run(askip()) is None
                with pytest.raises(NotLeaderError):
                    strict()
                with pytest.raises(NotLeaderError):
                    asyncio.run(astrict())
    finally:
        a.stop()
        b.stop()


def test_a_connection_factory_is_used_in_autocommit(pg_dsn, lock_name):
    opened: list[psycopg.Connection] = []

    def factory() -> psycopg.Connection:
        conn = psycopg.connect(pg_dsn, application_name="leaderrun-factory")
        opened.append(conn)
        return conn

    with LeaderElector(lock_name, connection_factory=factory, lease_s=LEASE_S) as e:
        assert e.wait_for_leadership(WAIT_S)
        assert e.token == 1
    assert opened
    assert all(conn.autocommit for conn in opened)


def test_a_database_that_is_down_at_start_is_retried(lock_name):
    # A port nobody listens on: the campaign keeps failing, never leads.
    with LeaderElector(
        lock_name, dsn="host=127.0.0.1 port=1 connect_timeout=2", lease_s=LEASE_S
    ) as e:
        wait_until(lambda: e.last_error is not None, "a campaign failure")
        assert not e.is_leader()
        assert "cannot connect" in (e.last_error or "")
