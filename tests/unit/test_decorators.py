"""@leader_only and the module-level is_leader(), with the public test doubles."""

import asyncio
import logging
import threading
import time
from typing import assert_type

import pytest

import leaderrun
from leaderrun import (
    ConfigError,
    LeaderElector,
    NotLeaderError,
    is_leader,
    leader_only,
    use_elector,
)
from leaderrun.clock import boottime
from leaderrun.testing import FakeClock, InMemoryLeaseStore, make_elector


@pytest.fixture
def leader(store, clock):
    elector = LeaderElector("jobs", store=store, clock=clock)
    elector.poll()
    assert elector.is_leader()
    yield elector
    elector.stop()


@pytest.fixture
def follower(store, clock, leader):
    elector = LeaderElector("jobs", store=store, clock=clock)
    elector.poll()
    assert not elector.is_leader()
    yield elector
    elector.stop()


ran: list[str] = []


@pytest.fixture(autouse=True)
def _clear_ran():
    ran.clear()


@leader_only
def bare(x: int) -> int:
    ran.append("bare")
    return x * 2


@leader_only(on_not_leader="raise")
def strict(x: int) -> int:
    ran.append("strict")
    return x * 3


@leader_only
async def bare_async(x: int) -> int:
    ran.append("bare_async")
    return x * 4


@leader_only(on_not_leader="raise")
async def strict_async(x: int) -> int:
    ran.append("strict_async")
    return x * 5


class Service:
    def __init__(self) -> None:
        self.count = 0

    @leader_only()
    def tick(self, by: int = 1) -> int:
        self.count += by
        return self.count

    @leader_only(on_not_leader="raise")
    async def atick(self) -> int:
        self.count += 10
        return self.count


def test_no_current_elector_means_not_leader():
    assert leaderrun.current_elector() is None
    assert is_leader() is False
    assert bare(1) is None
    with pytest.raises(NotLeaderError, match="no elector was started"):
        strict(1)
    assert ran == []


def test_on_the_leader_everything_runs(leader):
    with use_elector(leader):
        assert is_leader()
        assert bare(1) == 2
        assert strict(1) == 3
        assert asyncio.run(bare_async(1)) == 4
        assert asyncio.run(strict_async(1)) == 5
        service = Service()
        assert service.tick(2) == 2
        assert asyncio.run(service.atick()) == 12
    assert ran == ["bare", "strict", "bare_async", "strict_async"]
    assert leaderrun.current_elector() is None, "use_elector restores the previous"


def test_on_a_follower_skip_returns_none_and_raise_raises(follower):
    with use_elector(follower):
        assert not is_leader()
        assert bare(1) is None
        assert asyncio.run(bare_async(1)) is None
        with pytest.raises(NotLeaderError, match=r"not the leader of 'jobs'; .*strict"):
            strict(1)
        with pytest.raises(NotLeaderError, match="strict_async did not run"):
            asyncio.run(strict_async(1))
        service = Service()
        assert service.tick() is None
        with pytest.raises(NotLeaderError, match=r"Service\.atick"):
            asyncio.run(service.atick())
        assert service.count == 0
    assert ran == []


def test_the_decorator_follows_the_deadline(leader, clock):
    with use_elector(leader):
        assert bare(1) == 2
        clock.advance(leader.timing.kill_deadline_s)
        assert bare(1) is None
        with pytest.raises(NotLeaderError):
            strict(1)


def test_an_explicit_elector_wins_over_the_current_one(leader, follower):
    @leader_only(elector=follower)
    def on_follower() -> str:
        return "ran"

    @leader_only(elector=leader, on_not_leader="raise")
    def on_leader() -> str:
        return "ran"

    with use_elector(leader):
        assert on_follower() is None
    with use_elector(follower):
        assert on_leader() == "ran"


def test_wrappers_keep_names_and_coroutine_nature():
    assert bare.__name__ == "bare"
    assert strict_async.__qualname__ == "strict_async"
    assert asyncio.iscoroutinefunction(bare_async)
    assert not asyncio.iscoroutinefunction(bare)


def test_a_bad_mode_is_refused():
    with pytest.raises(ConfigError, match="on_not_leader='sometimes'"):
        leader_only(on_not_leader="sometimes")  # type: ignore[call-overload]


def test_not_leader_error_exits_busy():
    assert NotLeaderError().exit_code == 75


def test_make_elector_lets_a_user_test_leader_only_code_without_sleeping():
    """The documented recipe: two electors on one fake clock and store."""
    clock = FakeClock()
    leader = make_elector("nightly", clock=clock)
    follower = make_elector("nightly", store=leader.store)
    assert leader.is_leader()
    assert not follower.is_leader()
    with use_elector(leader):
        assert bare(21) == 42
    with use_elector(follower):
        assert bare(21) is None
    # The leader's database goes away: by its deadline it is no longer leader,
    # and once its lease expires the follower takes over with a larger token.
    leader.store.available = False  # type: ignore[attr-defined]
    clock.advance(leader.timing.kill_deadline_s)
    assert not leader.is_leader()
    leader.poll()
    leader.store.available = True  # type: ignore[attr-defined]
    clock.advance(follower.poll())
    follower.poll()
    assert follower.token == 2
    with use_elector(follower):
        assert bare(1) == 2
    leader.stop()
    follower.stop()


def test_the_result_types_follow_the_mode():
    """mypy checks the assert_type()s; at run time there is no leader here."""
    assert assert_type(bare(1), int | None) is None
    with pytest.raises(NotLeaderError):
        assert_type(strict(1), int)
    assert assert_type(asyncio.run(bare_async(1)), int | None) is None
    with pytest.raises(NotLeaderError):
        assert_type(asyncio.run(strict_async(1)), int)
    assert assert_type(Service().tick(), int | None) is None


# --- leader-only calls in flight when the term ends ----------------------------

WAIT_S = 10.0


def wait_for(condition, what: str) -> None:
    """Wait (real time) for something another thread does; fail after WAIT_S."""
    give_up = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < give_up, f"{what}: not within {WAIT_S}s"
        time.sleep(0.005)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["release", "stop"])
def test_stepping_down_releases_only_after_the_call_in_flight_returns(
    store, clock, how
):
    """release()/stop() from another thread wait for a running call, then release."""
    on_lost = threading.Event()
    elector = LeaderElector(
        "jobs", store=store, clock=clock, on_lost=lambda reason: on_lost.set()
    )
    elector.poll()
    started = threading.Event()
    releases_seen: list[int] = []

    @leader_only(elector=elector)
    def job() -> None:
        started.set()
        assert on_lost.wait(WAIT_S)  # the application stops its work on on_lost
        releases_seen.append(store.statements["release"])

    worker = threading.Thread(target=job)
    worker.start()
    assert started.wait(WAIT_S)
    getattr(elector, how)()
    worker.join(WAIT_S)
    assert releases_seen == [0], "released while the leader-only call still ran"
    assert store.rows[elector.lock.key].holder is None


@pytest.mark.timeout(30)
def test_a_call_still_running_after_the_grace_leaves_the_lease_to_expire(
    store, clock, caplog
):
    """A call that outlives kill_grace: no release at all; the lease expires."""
    caplog.set_level(logging.WARNING, logger="leaderrun")
    elector = LeaderElector("jobs", store=store, clock=clock)
    # The call ignores on_lost, and the grace passes while it runs.
    elector.on_lost = lambda reason: clock.advance(elector.timing.kill_grace_s)
    elector.poll()
    started, finish = threading.Event(), threading.Event()

    @leader_only(elector=elector)
    def stubborn() -> None:
        started.set()
        finish.wait(WAIT_S)

    worker = threading.Thread(target=stubborn)
    worker.start()
    try:
        assert started.wait(WAIT_S)
        elector.release()
        assert not elector.is_leader()
        row = store.rows[elector.lock.key]
        assert row.holder == elector.claim.holder
        assert row.expires_at_s > clock()
        assert "still running" in caplog.text
    finally:
        finish.set()
        worker.join(WAIT_S)
    elector.poll()
    assert store.statements["release"] == 0


def test_release_inside_a_leader_only_call_releases_after_it_returns(store, clock):
    """Polled: release() from the function itself returns; the next poll releases."""
    elector = LeaderElector("jobs", store=store, clock=clock)
    elector.poll()

    @leader_only(elector=elector)
    def job() -> object:
        elector.release()
        assert not elector.is_leader()
        return store.rows[elector.lock.key].holder

    assert job() == elector.claim.holder, "released under the running call"
    elector.poll()
    assert store.rows[elector.lock.key].holder is None


@pytest.mark.timeout(30)
def test_release_inside_a_leader_only_call_on_a_started_elector():
    """Threaded: no deadlock; the campaign thread releases once the call returned."""
    store = InMemoryLeaseStore(boottime)
    elector = LeaderElector("jobs", store=store).start()
    try:
        assert elector.wait_for_leadership(WAIT_S)

        @leader_only(elector=elector)
        def job() -> object:
            elector.release()
            return store.rows[elector.lock.key].holder

        assert job() == elector.claim.holder, "released under the running call"
        wait_for(lambda: store.rows[elector.lock.key].holder is None, "the release")
    finally:
        elector.stop()


@pytest.mark.timeout(30)
def test_stop_waits_for_an_async_leader_only_call():
    """An awaited leader-only coroutine counts as in flight until it returns."""
    store = InMemoryLeaseStore(boottime)
    elector = LeaderElector("jobs", store=store).start()
    started = threading.Event()
    releases_seen: list[int] = []

    @leader_only(elector=elector)
    async def job() -> None:
        started.set()
        while elector.is_leader():
            await asyncio.sleep(0.005)
        releases_seen.append(store.statements["release"])

    assert elector.wait_for_leadership(WAIT_S)
    loop = threading.Thread(target=asyncio.run, args=(job(),))
    loop.start()
    assert started.wait(WAIT_S)
    elector.stop()
    loop.join(WAIT_S)
    assert releases_seen == [0]
    assert store.rows[elector.lock.key].holder is None
