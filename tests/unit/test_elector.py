"""LeaderElector driven step by step with poll(), on a FakeClock: no sleeps."""

import logging
import threading
import time
from dataclasses import replace

import pytest

from leaderrun import ConfigError, LeaderElector, UnsafeTimingError, holding
from leaderrun.clock import boottime
from leaderrun.elector import (
    LOST_DEADLINE,
    LOST_RELEASED,
    LOST_STOPPED,
    open_elector_store,
)
from leaderrun.heartbeat import Renewer
from leaderrun.testing import InMemoryLeaseStore


class Recorder:
    """Collects the callbacks' calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def elected(self, token: int) -> None:
        self.calls.append(("elected", token))

    def lost(self, reason: str) -> None:
        self.calls.append(("lost", reason))


@pytest.fixture
def make(clock, store):
    made = []

    def make(lock_id="jobs", **kwargs):
        recorder = Recorder()
        kwargs.setdefault("on_elected", recorder.elected)
        kwargs.setdefault("on_lost", recorder.lost)
        elector = LeaderElector(
            lock_id,
            store=store,
            clock=clock,
            unit_random=lambda: 0.0,
            host="test",
            **kwargs,
        )
        elector.calls = recorder.calls  # type: ignore[attr-defined]
        made.append(elector)
        return elector

    yield make
    for elector in made:
        elector.stop()


def test_the_first_poll_elects_and_calls_on_elected_once(make):
    elector = make()
    assert not elector.is_leader()
    assert elector.token is None
    elector.poll()
    assert elector.is_leader()
    assert elector.token == 1
    elector.poll()
    assert elector.calls == [("elected", 1)]


def test_a_second_elector_on_the_same_lock_is_a_follower(make, clock):
    leader, follower = make(), make()
    leader.poll()
    delay_s = follower.poll()
    assert leader.is_leader()
    assert not follower.is_leader()
    assert follower.calls == []
    # It sleeps until the leader's lease would end (in database time).
    assert delay_s == pytest.approx(leader.timing.lease_s)


def test_is_leader_turns_false_at_the_deadline_without_any_poll(make, clock):
    """No thread, no renewal: the deadline alone flips it, to the instant."""
    elector = make()
    elector.poll()
    clock.advance(elector.timing.kill_deadline_s - 0.001)
    assert elector.is_leader()
    assert elector.deadline_in_s() == pytest.approx(0.001)
    clock.advance(0.001)
    assert not elector.is_leader()
    assert elector.token is None
    assert elector.calls == [("elected", 1)], "on_lost waits for the next poll"
    elector.poll()
    assert len(elector.calls) == 2
    kind, reason = elector.calls[1]
    assert kind == "lost"
    assert str(reason).startswith(LOST_DEADLINE)


def test_the_deadline_falls_before_the_database_expiry_by_grace_and_margin(
    make, clock, store
):
    elector = make()
    elector.poll()
    t = elector.timing
    expires_at_s = store.rows[elector.lock.key].expires_at_s
    deadline_s = clock() + elector.deadline_in_s()
    assert expires_at_s - deadline_s >= t.kill_grace_s + t.db_clock_margin_s


def test_poll_renews_when_due_and_moves_the_deadline(make, clock, store):
    elector = make()
    elector.poll()
    first_deadline_s = clock() + elector.deadline_in_s()
    delay_s = elector.poll()
    assert delay_s == pytest.approx(elector.timing.renew_interval_s)
    clock.advance(delay_s)
    elector.poll()
    assert store.statements["renew"] == 1
    assert clock() + elector.deadline_in_s() == pytest.approx(
        first_deadline_s + elector.timing.renew_interval_s
    )
    # Keep renewing for ten lease lengths: still the leader, still token 1.
    for _ in range(60):
        clock.advance(elector.poll())
    assert elector.is_leader()
    assert elector.calls == [("elected", 1)]


def test_unreachable_database_loses_leadership_by_the_deadline(make, clock, store):
    elector = make()
    elector.poll()
    store.available = False
    t = elector.timing
    for _ in range(1000):
        if not elector.is_leader():
            break
        clock.advance(min(elector.poll(), 0.25))
    lost_at_s = clock()
    assert lost_at_s <= 1000.0 + t.kill_deadline_s + 0.25
    elector.poll()
    assert [kind for kind, _ in elector.calls] == ["elected", "lost"]
    assert str(elector.calls[1][1]).startswith(LOST_DEADLINE)
    assert store.rows[elector.lock.key].expires_at_s > lost_at_s


def test_a_takeover_ends_the_term_with_on_lost_once(make, clock, store):
    elector = make()
    elector.poll()
    store.take_over(elector.lock)
    clock.advance(elector.poll())
    elector.poll()  # the renewal sees zero rows
    elector.poll()  # and the term ends
    elector.poll()
    assert not elector.is_leader()
    assert [kind for kind, _ in elector.calls] == ["elected", "lost"]
    assert "taken over" in str(elector.calls[1][1])


def test_a_new_term_has_a_larger_token(make, clock, store):
    a, b = make(), make()
    a.poll()
    store.available = False
    clock.advance(a.timing.lease_s)
    a.poll()
    store.available = True
    clock.advance(b.poll())
    b.poll()
    assert b.is_leader()
    assert b.token == 2
    assert not a.is_leader()
    assert b.calls == [("elected", 2)]


def test_release_steps_down_and_lets_another_in(make, clock, store):
    a, b = make(), make()
    a.poll()
    a.release()
    assert not a.is_leader()
    assert a.calls[-1] == ("lost", LOST_RELEASED)
    assert store.rows[a.lock.key].holder is None
    b.poll()
    assert b.is_leader()
    assert b.token == 2
    # a holds off for a lease and jitter, so it does not take the lock back.
    assert a.poll() == pytest.approx(a.timing.lease_s + a.timing.jitter_s)
    a.release()  # not leading: nothing happens
    assert [kind for kind, _ in a.calls] == ["elected", "lost"]


def test_stop_calls_on_lost_once_then_releases(make, store):
    order = []
    elector = make()
    elector.poll()
    holder_during_on_lost = None

    def on_lost(reason):
        nonlocal holder_during_on_lost
        holder_during_on_lost = store.rows[elector.lock.key].holder
        order.append(reason)

    elector.on_lost = on_lost
    elector.stop()
    elector.stop()
    assert order == [LOST_STOPPED]
    assert holder_during_on_lost is not None, "released only after on_lost returned"
    assert store.rows[elector.lock.key].holder is None


def test_a_failing_callback_is_logged_and_the_term_goes_on(make, caplog):
    caplog.set_level(logging.ERROR, logger="leaderrun")

    def boom(token):
        raise RuntimeError("callback bug")

    elector = make(on_elected=boom)
    elector.poll()
    assert elector.is_leader()
    assert "callback failed" in caplog.text


def test_a_database_outage_while_following_backs_off(make, clock, store):
    elector = make()
    store.available = False
    delays = [elector.poll()]
    clock.advance(delays[0])
    delays.append(elector.poll())
    assert delays == [0.5, 1.0]
    assert elector.last_error is not None
    store.available = True
    clock.advance(delays[-1])
    elector.poll()
    assert elector.is_leader()
    assert elector.last_error is None


def test_a_grant_that_comes_after_the_deadline_is_given_back(make, clock, store):
    elector = make()

    class SlowSession:
        def __init__(self, inner) -> None:
            self.inner = inner

        def acquire(self, lock, claim, lease_s):
            result = self.inner.acquire(lock, claim, lease_s)
            clock.advance(elector.timing.kill_deadline_s + 0.001)
            return result

        def renew(self, lease, lease_s):
            return self.inner.renew(lease, lease_s)

        def release(self, lease, end=None):
            return self.inner.release(lease, end)

        def close(self):
            self.inner.close()

    real_connect = store.connect
    store.connect = lambda: SlowSession(real_connect())
    elector.poll()
    assert not elector.is_leader()
    assert elector.calls == []
    assert store.rows[elector.lock.key].holder is None


def test_wait_for_leadership_without_a_thread_reports_now(make):
    elector = make()
    assert elector.wait_for_leadership(0) is False
    elector.poll()
    assert elector.wait_for_leadership(0) is True


def test_the_thread_campaigns_and_stop_releases(store):
    """The one test of the real threads: start, lead, stop (no fake clock)."""
    lost: list[str] = []
    real_store = InMemoryLeaseStore(boottime)
    elector = LeaderElector("threaded", store=real_store, on_lost=lost.append)
    with elector:
        assert elector.wait_for_leadership(30)
        with pytest.raises(RuntimeError, match="only once"):
            elector.start()
    assert not elector.is_leader()
    assert lost == [LOST_STOPPED]
    assert real_store.rows[elector.lock.key].holder is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lock_id": ""}, ConfigError, "lock_id ''"),
        ({"lock_id": 1.5}, ConfigError, "lock_id 1.5 must be an integer or a name"),
        ({"lock_id": "x", "lease_s": 2}, UnsafeTimingError, "unsafe timing"),
        ({"lock_id": "x", "lease_s": -1}, ConfigError, "must be positive"),
    ],
)
def test_bad_settings_are_refused_with_the_value(store, kwargs, error, match):
    with pytest.raises(error, match=match):
        LeaderElector(store=store, **kwargs)


def test_the_postgres_store_is_built_lazily_and_validates_the_dsn():
    with pytest.raises(ConfigError, match="invalid DSN"):
        LeaderElector("x", dsn="host=a port")


def test_integer_and_named_locks(make):
    assert make(42).lock.key == 42
    assert make("nightly").lock.name == "nightly"


def test_from_env_reads_the_command_lines_variables(store):
    elector = LeaderElector.from_env(
        {
            "LEADERRUN_LOCK_ID": "nightly",
            "LEADERRUN_LEASE_DURATION": "1m",
            "LEADERRUN_RENEW_INTERVAL": "5s",
            "LEADERRUN_JITTER": "500ms",
            "LEADERRUN_KILL_GRACE": "2s",
        },
        store=store,
    )
    assert elector.lock.name == "nightly"
    assert (
        elector.timing.lease_s,
        elector.timing.renew_interval_s,
        elector.timing.jitter_s,
        elector.timing.kill_grace_s,
    ) == (60.0, 5.0, 0.5, 2.0)


def test_from_env_reads_the_seeds_millisecond_aliases(store):
    elector = LeaderElector.from_env(
        {"LE_LOCK_ID": "7", "LE_LEASE_DURATION": "12000"}, store=store
    )
    assert elector.lock.key == 7
    assert elector.timing.lease_s == 12.0


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({}, "no --lock-id given"),
        ({"LEADERRUN_LOCK_ID": "x", "LEADERRUN_JITTER": "soon"}, "LEADERRUN_JITTER"),
        ({"LEADERRUN_LOCK_ID": "x", "LEADERRUN_LEASE_DURATION": "2s"}, "unsafe"),
    ],
)
def test_from_env_names_the_bad_variable(store, env, match):
    with pytest.raises(ConfigError, match=match):
        LeaderElector.from_env(env, store=store)


def test_from_env_takes_the_dsn_from_the_environment():
    with pytest.raises(ConfigError, match="invalid DSN"):
        LeaderElector.from_env(
            {"LEADERRUN_LOCK_ID": "x", "DATABASE_URL": "host=a port"}
        )


def test_a_grant_that_arrives_after_stop_is_given_back(make, store):
    elector = make()
    elector._stopping.set()  # as stop() does before it gives up waiting
    elector._try_acquire()
    assert not elector.is_leader()
    assert elector.calls == []
    assert store.rows[elector.lock.key].holder is None


# --- the grace after a loss ---------------------------------------------------


@pytest.mark.parametrize("cause", ["no renewal ran", "renewals time out"])
def test_a_deadline_loss_leaves_the_row_to_expire(make, clock, store, cause):
    """Past the deadline, with the database answering, the lease is not released."""
    elector = make()
    elector.poll()
    if cause == "no renewal ran":
        clock.advance(elector.timing.kill_deadline_s)  # e.g. the thread was stuck
    else:
        store.failing.add("renew")
    for _ in range(1000):
        if not elector.is_leader():
            break
        clock.advance(min(elector.poll(), 0.25))
    elector.poll()
    assert [kind for kind, _ in elector.calls] == ["elected", "lost"]
    assert str(elector.calls[1][1]).startswith(LOST_DEADLINE)
    row = store.rows[elector.lock.key]
    assert row.holder == elector.claim.holder
    assert store.statements["release"] == 0
    assert row.expires_at_s - clock() >= elector.timing.kill_grace_s


@pytest.mark.parametrize("cause", ["deadline", "takeover", "renewal thread died"])
def test_after_a_loss_no_campaign_before_the_old_lease_ends(make, clock, store, cause):
    """The process re-enters the race only once its old lease could have ended."""
    elector = make()
    elector.poll()
    ends_at_s = store.rows[elector.lock.key].expires_at_s
    if cause == "deadline":
        clock.advance(elector.timing.kill_deadline_s)
    elif cause == "takeover":
        store.take_over(elector.lock)
        store.rows[elector.lock.key] = replace(
            store.rows[elector.lock.key], holder=None, expires_at_s=clock()
        )  # ... and the operator freed it at once
        clock.advance(elector.poll())
        elector.poll()  # the renewal matches no row
    else:
        elector._term.state.lose("the renewal thread failed: RuntimeError()")
    acquires = store.statements["acquire"]
    while not elector.is_leader():
        delay_s = elector.poll()
        if clock() < ends_at_s:
            assert store.statements["acquire"] == acquires, "campaigned too early"
        clock.advance(max(delay_s, 0.001))
    assert clock() >= ends_at_s
    assert elector.token == store.rows[elector.lock.key].token
    assert [kind for kind, _ in elector.calls] == ["elected", "lost", "elected"]


# --- callbacks, stop and release from other places ----------------------------


def test_release_inside_on_elected_calls_on_lost_after_it_returns(make, store):
    """on_elected that releases: on_lost follows it, never inside it."""
    order: list[str] = []

    def on_elected(token):
        order.append("elected")
        elector.release()
        assert not elector.is_leader()
        order.append("elected returned")

    elector = make(on_elected=on_elected, on_lost=order.append)
    for _ in range(3):
        elector.poll()
    assert order == ["elected", "elected returned", LOST_RELEASED]
    assert store.rows[elector.lock.key].holder is None


def test_stop_inside_on_elected_calls_on_lost_after_it_returns(make, store):
    """A stop() from on_elected does not wait for itself; the term ends after."""
    order: list[str] = []

    def on_elected(token):
        order.append("elected")
        elector.stop()
        order.append("elected returned")

    elector = make(on_elected=on_elected, on_lost=order.append)
    elector.poll()
    elector.poll()
    assert order == ["elected", "elected returned", LOST_STOPPED]
    assert not elector.is_leader()
    assert store.rows[elector.lock.key].holder is None
    assert elector.poll() == 0.0
    assert store.statements["acquire"] == 1, "a stopped elector does not campaign"


def test_an_acquire_that_times_out_is_retried_on_a_fresh_session(make, clock, store):
    """StatementTimeoutError on acquire: back off, close the session, reconnect."""
    sessions = []
    real_connect = store.connect

    def connect():
        sessions.append(real_connect())
        return sessions[-1]

    store.connect = connect
    elector = make()
    store.failing.add("acquire")
    assert elector.poll() == 0.5
    assert "timed out" in (elector.last_error or "")
    assert sessions[0].closed
    store.failing.clear()
    clock.advance(0.5)
    elector.poll()
    assert elector.is_leader()
    assert len(sessions) == 2


def test_a_release_that_times_out_leaves_the_lease_to_expire(make, clock, store):
    """release() whose statement fails returns; the lease simply expires."""
    elector = make()
    elector.poll()
    store.failing.add("release")
    elector.release()
    assert not elector.is_leader()
    assert elector.calls[-1] == ("lost", LOST_RELEASED)
    assert store.rows[elector.lock.key].holder == elector.claim.holder


# --- the real campaign thread ---------------------------------------------------


@pytest.fixture
def threaded():
    """Electors with their campaign thread, on an in-memory store and real time."""
    made = []
    real_store = InMemoryLeaseStore(boottime)

    def threaded(**kwargs):
        kwargs.setdefault("lease_s", 6.0)  # release() waits up to 4.9 s, not 20
        elector = LeaderElector("threaded", store=real_store, **kwargs)
        made.append(elector)
        return elector

    threaded.store = real_store  # type: ignore[attr-defined]
    yield threaded
    for elector in made:
        elector.stop(timeout_s=WAIT_S)


WAIT_S = 10.0


def wait_for(condition, what: str) -> None:
    """Wait (real time) for something another thread does; fail after WAIT_S."""
    give_up = boottime() + WAIT_S
    while not condition():
        assert boottime() < give_up, f"{what}: not within {WAIT_S}s"
        time.sleep(0.005)


@pytest.mark.timeout(30)
def test_callbacks_run_in_order_on_the_campaign_thread(threaded):
    """release() from another thread while on_elected runs: on_lost comes after it."""
    entered, let_go, lost = threading.Event(), threading.Event(), threading.Event()
    events: list[tuple[str, str]] = []

    def on_elected(token):
        events.append(("elected", threading.current_thread().name))
        entered.set()
        let_go.wait(WAIT_S)
        events.append(("elected returned", threading.current_thread().name))

    def on_lost(reason):
        events.append((reason, threading.current_thread().name))
        lost.set()

    elector = threaded(on_elected=on_elected, on_lost=on_lost).start()
    assert entered.wait(WAIT_S)
    releasing = threading.Thread(target=elector.release)
    releasing.start()
    wait_for(lambda: not elector.is_leader(), "the step-down")
    let_go.set()
    assert lost.wait(WAIT_S)
    releasing.join(WAIT_S)
    assert not releasing.is_alive()
    assert [what for what, _ in events] == ["elected", "elected returned", "released"]
    assert {thread for _, thread in events} == {"leaderrun-elector"}
    assert threaded.store.rows[elector.lock.key].holder is None


@pytest.mark.timeout(30)
def test_a_stop_while_a_term_starts_leaves_no_term(threaded, monkeypatch):
    """stop() that lands between the acquire and the term's start: no term after."""
    setting_up, stopped = threading.Event(), threading.Event()
    real_renewer = Renewer

    def renewer(*args, **kwargs):
        setting_up.set()
        stopped.wait(WAIT_S)
        return real_renewer(*args, **kwargs)

    monkeypatch.setattr(holding, "Renewer", renewer)
    elector = threaded().start()
    assert setting_up.wait(WAIT_S)
    elector.stop(timeout_s=0.1)  # the campaign thread is setting up the term
    stopped.set()
    campaign = elector._thread
    campaign.join(WAIT_S)
    assert not campaign.is_alive()
    assert not elector.is_leader()
    assert not [t for t in threading.enumerate() if t.name == "leaderrun-renewer"]
    assert threaded.store.rows[elector.lock.key].holder is None


@pytest.mark.timeout(30)
def test_release_inside_on_elected_on_the_campaign_thread(threaded):
    """on_elected may call release() on the campaign thread without a deadlock."""
    events: list[str] = []
    lost = threading.Event()

    def on_elected(token):
        events.append("elected")
        elector.release()
        events.append("elected returned")

    def on_lost(reason):
        events.append(reason)
        lost.set()

    elector = threaded(on_elected=on_elected, on_lost=on_lost)
    elector.start()
    assert lost.wait(WAIT_S)
    assert events == ["elected", "elected returned", LOST_RELEASED]


# --- configuration errors name the constructor's parameters ---------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lease_s": -1}, "lease_s must be positive, not -1"),
        ({"renew_interval_s": 0.0}, "renew_interval_s must be a positive duration"),
        ({"jitter_s": -0.5}, "jitter_s must be zero or a positive duration, not -0.5"),
        (
            {"lease_s": 2},
            "; use lease_s=3.2 or more, or a shorter renew_interval_s, jitter_s or "
            "kill_grace_s",
        ),
        ({"schema": ""}, "schema '' must be a PostgreSQL identifier"),
        ({"dsn": "sqlite://host/x.db"}, "dsn 'sqlite://host/x.db' names a host"),
        (
            {"dsn": "sqlite:///var/x.db", "schema": "app"},
            "schema 'app' is for PostgreSQL; a SQLite file has one leader_lease "
            "table (drop schema, or use another file)",
        ),
        ({}, "no database given: pass dsn='postgresql://HOST/DB' to share a lock"),
    ],
)
def test_errors_name_the_constructors_parameters(kwargs, message):
    """A bad argument is named as the parameter it came in, never as a flag."""
    with pytest.raises(ConfigError) as caught:
        LeaderElector("x", env={}, **kwargs)
    assert message in str(caught.value)
    assert "--" not in str(caught.value)


def test_an_empty_env_is_an_empty_environment(monkeypatch):
    """env={} does not fall back to the process environment's DSN."""
    monkeypatch.setenv("LEADERRUN_DSN", "sqlite:///var/lib/leases.db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/app")
    with pytest.raises(ConfigError, match="no database given"):
        LeaderElector("x", env={})


def test_the_store_is_opened_from_the_environment_it_is_given(monkeypatch, tmp_path):
    """open_elector_store reads the env passed to it, never the process's own."""
    monkeypatch.setenv("LEADERRUN_DSN", "postgresql://db/app")
    given = {"LEADERRUN_DSN": f"sqlite://{tmp_path}/leases.db"}
    store = open_elector_store(None, given, attempt_budget_s=1.0)
    assert store.describe() == f"sqlite://{tmp_path}/leases.db"
    with pytest.raises(ConfigError, match="no database given"):
        open_elector_store(None, {}, attempt_budget_s=1.0)


def test_from_env_names_the_variables_in_an_unsafe_timing(store):
    """from_env's unsafe timing names LEADERRUN_* variables, not flags."""
    with pytest.raises(UnsafeTimingError) as caught:
        LeaderElector.from_env(
            {"LEADERRUN_LOCK_ID": "x", "LEADERRUN_LEASE_DURATION": "2s"}, store=store
        )
    assert "use LEADERRUN_LEASE_DURATION 3.2s or more" in str(caught.value)
