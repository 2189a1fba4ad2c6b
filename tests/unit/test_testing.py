"""The public test doubles: InMemoryLeaseStore keeps the SQL's semantics, FakeClock."""

import threading

import pytest

from leaderrun.errors import ConfigError, DatabaseUnavailableError
from leaderrun.lease import Lease, LockId, parse_lock_id
from leaderrun.stores.base import AcquireResult, Claim
from leaderrun.testing import FakeClock, InMemoryLeaseStore

LEASE_S = 30.0
LOCK = parse_lock_id("nightly-backup")
CONTENDERS = 20


def claim(n: int = 1) -> Claim:
    """The claim of contender ``n``, each with its own holder identity."""
    return Claim(
        holder=f"host{n}:{100 + n}:nonce{n}",
        host=f"host{n}",
        pid=100 + n,
        command="./backup.sh",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> InMemoryLeaseStore:
    return InMemoryLeaseStore(clock)


def take(store: InMemoryLeaseStore, n: int = 1, lock: LockId = LOCK) -> Lease:
    """Acquire ``lock`` as contender ``n``, which must win."""
    result = store.connect().acquire(lock, claim(n), LEASE_S)
    assert result.lease is not None, result
    return result.lease


# --- acquire -------------------------------------------------------------------


def test_first_acquire_creates_the_row_with_token_1(store, clock):
    """The first holder gets token 1; the row records who holds it and until when."""
    lease = take(store)
    assert lease == Lease(LOCK, claim(1).holder, 1)
    row = store.rows[LOCK.key]
    assert (row.name, row.holder, row.host, row.pid, row.command) == (
        "nightly-backup",
        claim(1).holder,
        "host1",
        101,
        "./backup.sh",
    )
    assert row.expires_at_s == clock() + LEASE_S


def test_a_held_lock_is_refused_and_its_holder_described(store, clock):
    """A contender for a held lock gets no lease, and learns who holds it until when."""
    take(store, 1)
    clock.advance(10.0)
    result = store.connect().acquire(LOCK, claim(2), LEASE_S)
    assert result.lease is None
    assert (result.holder, result.holder_host, result.holder_pid) == (
        claim(1).holder,
        "host1",
        101,
    )
    assert result.expires_in_s == pytest.approx(LEASE_S - 10.0)
    assert store.rows[LOCK.key].token == 1


def test_exactly_one_of_many_racing_claims_wins(store):
    """Of twenty contenders released together on a free lock, exactly one wins."""
    barrier = threading.Barrier(CONTENDERS)
    results: list[AcquireResult | None] = [None] * CONTENDERS

    def contend(n: int) -> None:
        session = store.connect()
        barrier.wait(timeout=30)
        results[n] = session.acquire(LOCK, claim(n), LEASE_S)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(CONTENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [r.lease for r in results if r is not None and r.lease is not None]
    assert len(winners) == 1
    assert sum(r is not None for r in results) == CONTENDERS
    assert store.rows[LOCK.key].holder == winners[0].holder
    assert store.rows[LOCK.key].token == 1


def test_an_expired_lease_is_taken_over_in_the_stores_time(store, clock):
    """The lease ends when the store's clock reaches expires_at, not a moment before."""
    take(store, 1)
    clock.advance(LEASE_S - 0.001)
    assert store.connect().acquire(LOCK, claim(2), LEASE_S).lease is None
    clock.advance(0.001)
    assert store.connect().acquire(LOCK, claim(2), LEASE_S).lease == Lease(
        LOCK, claim(2).holder, 2
    )


def test_token_grows_by_one_for_every_new_holder(store, clock):
    """Expiry, takeover and release followed by acquire each give the next token."""
    tokens = [take(store, 1).token]
    clock.advance(LEASE_S)  # expired
    tokens.append(take(store, 2).token)
    tokens.append(store.take_over(LOCK).token)
    clock.advance(LEASE_S)
    lease = take(store, 3)
    tokens.append(lease.token)
    assert store.connect().release(lease)
    tokens.append(take(store, 1).token)
    assert tokens == [1, 2, 3, 4, 5]


def test_a_key_collision_never_takes_over(store, clock):
    """A lock whose key another lock's name uses is refused, even when expired."""
    take(store, 1)
    clock.advance(LEASE_S)
    twin = LockId(LOCK.key, "another-name")
    with pytest.raises(
        ConfigError, match="same 64-bit key as the lock 'nightly-backup'"
    ):
        store.connect().acquire(twin, claim(2), LEASE_S)
    assert store.rows[LOCK.key].name == "nightly-backup"
    assert store.rows[LOCK.key].token == 1


# --- renew ---------------------------------------------------------------------


def test_renew_extends_from_the_stores_now(store, clock):
    """A renewal by the holder moves expires_at to the store's now plus the lease."""
    lease = take(store)
    clock.advance(20.0)
    assert store.connect().renew(lease, LEASE_S)
    assert store.rows[LOCK.key].expires_at_s == clock() + LEASE_S
    assert store.rows[LOCK.key].renewed_at_s == clock()


@pytest.mark.parametrize(
    ("holder", "token"),
    [(claim(2).holder, 1), (claim(1).holder, 2), (claim(1).holder, 0)],
    ids=["other-holder", "newer-token", "older-token"],
)
def test_renew_is_a_compare_and_swap_on_holder_and_token(store, holder, token):
    """A renewal whose holder or token differs from the row's changes nothing."""
    take(store, 1)
    before = store.rows[LOCK.key]
    assert not store.connect().renew(Lease(LOCK, holder, token), LEASE_S)
    assert store.rows[LOCK.key] == before


def test_a_stale_holder_can_neither_renew_nor_release(store, clock):
    """After a takeover the old holder's renew and release are refused, to no effect."""
    stale = take(store, 1)
    clock.advance(LEASE_S)
    take(store, 2)
    after_takeover = store.rows[LOCK.key]
    session = store.connect()
    assert not session.renew(stale, LEASE_S)
    assert not session.release(stale)
    assert store.rows[LOCK.key] == after_takeover


def test_an_expired_lease_is_not_renewed(store, clock):
    """A renewal that lands after expiry, even by the holder, changes nothing."""
    lease = take(store)
    clock.advance(LEASE_S)
    before = store.rows[LOCK.key]
    assert not store.connect().renew(lease, LEASE_S)
    assert store.rows[LOCK.key] == before


def test_renew_of_an_unknown_lock_is_refused(store):
    """Renewing a lock that has no row at all reports the lease as lost."""
    assert not store.connect().renew(Lease(LOCK, claim(1).holder, 1), LEASE_S)
    assert store.rows == {}


# --- release -------------------------------------------------------------------


def test_release_keeps_the_row_and_its_token(store, clock):
    """Release frees the lock at once but keeps the row, so the token keeps growing."""
    lease = take(store)
    clock.advance(5.0)
    assert store.connect().release(lease)
    row = store.rows[LOCK.key]
    assert (row.holder, row.token, row.expires_at_s) == (None, 1, clock())
    assert take(store, 2).token == 2


def test_a_second_release_is_refused(store):
    """Releasing twice reports False the second time: the lease is no longer ours."""
    lease = take(store)
    session = store.connect()
    assert session.release(lease)
    assert not session.release(lease)


# --- availability, bookkeeping --------------------------------------------------


def test_statements_are_counted_by_kind(store):
    """Each acquire, renew and release statement run is counted, refused ones too."""
    session = store.connect()
    lease = take(store, 1)
    session.acquire(LOCK, claim(2), LEASE_S)
    session.renew(lease, LEASE_S)
    session.renew(Lease(LOCK, "nobody", 1), LEASE_S)
    session.release(lease)
    assert store.statements == {"acquire": 2, "renew": 2, "release": 1}


def test_an_unavailable_store_fails_connect_and_every_statement(store):
    """While unavailable, connect and every statement raise; nothing is counted."""
    lease = take(store)
    session = store.connect()
    before = dict(store.statements)
    store.available = False
    with pytest.raises(DatabaseUnavailableError):
        store.connect()
    with pytest.raises(DatabaseUnavailableError):
        session.acquire(LOCK, claim(2), LEASE_S)
    with pytest.raises(DatabaseUnavailableError):
        session.renew(lease, LEASE_S)
    with pytest.raises(DatabaseUnavailableError):
        session.release(lease)
    assert store.statements == before
    store.available = True
    assert session.renew(lease, LEASE_S)


def test_close_marks_the_session_closed(store):
    """A session reports that it was closed."""
    session = store.connect()
    assert not session.closed
    session.close()
    assert session.closed


def test_describe_names_memory(store):
    """The store describes itself as in memory."""
    assert store.describe() == "memory"


# --- FakeClock -------------------------------------------------------------------


def test_fake_clock_stands_still_until_advanced():
    """The clock returns the same instant until advance() moves it by that much."""
    clock = FakeClock(start_s=50.0)
    assert clock() == clock.now() == 50.0
    clock.advance(0.0)
    assert clock() == 50.0
    clock.advance(2.5)
    assert clock() == clock.now() == 52.5


@pytest.mark.parametrize("step_s", [-0.001, float("nan")])
def test_fake_clock_never_moves_backward(step_s):
    """advance() refuses a negative or NaN step and leaves the clock where it was."""
    clock = FakeClock(start_s=50.0)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(step_s)
    assert clock() == 50.0
