"""What only the PostgreSQL store has: its tables made on first use, row locks,
idle connections, schemas and roles, the slot chosen by the server, and secrets.

What every store decides alike is in ``tests/contract``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from leaderrun.errors import (
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
)
from leaderrun.lease import LockId, parse_lock_id
from leaderrun.redact import MASK, dsn_secrets
from leaderrun.slots import OncePer, Schedule
from leaderrun.stores.base import TABLE, AcquireResult
from leaderrun.stores.postgres import PostgresLeaseStore, PostgresSession
from tests.stores import LEASE_S, WAIT_S, acquired, claim, new_name, race

pytestmark = pytest.mark.pg

Admin = Callable[[], psycopg.Connection[TupleRow]]

CONTENDERS = 20
RACE_ROUNDS = 5
"""A table-creation race is not lost every time: run it in this many schemas."""
SECRET = "Hunter2-s3cret"


@pytest.fixture
def new_schema(pg_admin: Admin) -> Iterator[Callable[[], str]]:
    """Creates empty schemas (no lease table yet); drops them after the test."""
    made: list[str] = []

    def create() -> str:
        name = new_name("lr_fresh")
        with pg_admin() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        made.append(name)
        return name

    yield create
    with pg_admin() as conn:
        for name in made:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def fresh_schema(new_schema: Callable[[], str]) -> str:
    """An empty schema: no lease table yet."""
    return new_schema()


@pytest.fixture
def open_session() -> Iterator[Callable[[PostgresLeaseStore], PostgresSession]]:
    """Opens sessions, and closes every one of them after the test."""
    opened: list[PostgresSession] = []

    def open_(store: PostgresLeaseStore) -> PostgresSession:
        session = store.connect()
        opened.append(session)
        return session

    yield open_
    for session in opened:
        session.close()


@pytest.fixture
def store(pg_dsn: str, store_schema: str) -> PostgresLeaseStore:
    return PostgresLeaseStore(pg_dsn, store_schema)


@pytest.fixture
def session(
    store: PostgresLeaseStore,
    open_session: Callable[[PostgresLeaseStore], PostgresSession],
) -> PostgresSession:
    return open_session(store)


def table_of(schema: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(TABLE))


def row_of(admin: Admin, schema: str, lock: LockId) -> dict[str, Any] | None:
    """The lock's row as the server has it, with its expiry relative to now()."""
    query = sql.SQL(
        "SELECT lock_name, holder, token, expires_at, "
        "extract(epoch FROM expires_at - now())::float8 AS expires_in_s "
        "FROM {} WHERE lock_key = %s"
    ).format(table_of(schema))
    with admin() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(query, (lock.key,)).fetchone()


def with_password(dsn: str, **params: str) -> tuple[str, str]:
    """``dsn`` with ``params``, carrying a password, and that password.

    The DSN's own password is kept, so that a server which checks it still lets
    us in; without one, SECRET is added, which a trust-auth server ignores.
    """
    secrets = dsn_secrets(dsn)
    if secrets:
        return make_conninfo(dsn, **params), secrets[0]
    return make_conninfo(dsn, password=SECRET, **params), SECRET


# --- the table ------------------------------------------------------------------------


def test_the_table_is_created_on_first_use(pg_dsn, pg_admin, fresh_schema, lock):
    """The first acquire in an empty schema creates leader_lease and takes token 1."""
    regclass = f"{fresh_schema}.{TABLE}"
    with pg_admin() as conn:
        assert conn.execute("SELECT to_regclass(%s)", (regclass,)).fetchone() == (None,)
    store = PostgresLeaseStore(pg_dsn, fresh_schema)
    session = store.connect()
    try:
        assert acquired(session.acquire(lock, claim(1), LEASE_S)).token == 1
    finally:
        session.close()
    with pg_admin() as conn:
        found = conn.execute("SELECT to_regclass(%s)::text", (regclass,)).fetchone()
    assert found is not None
    assert found[0] is not None


def test_first_users_racing_to_create_the_table_all_succeed(
    pg_dsn: str, new_schema: Callable[[], str], lock_name: str
):
    """Twenty sessions acquiring at once in an empty schema all succeed, each round."""
    for _ in range(RACE_ROUNDS):
        store = PostgresLeaseStore(pg_dsn, new_schema())

        def contend(n: int, barrier: threading.Barrier) -> AcquireResult:
            session = store.connect()  # noqa: B023 - runs within this round
            try:
                barrier.wait(WAIT_S)
                lock = parse_lock_id(f"{lock_name}-{n}")
                return session.acquire(lock, claim(n), LEASE_S)
            finally:
                session.close()

        results = race(CONTENDERS, contend)
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert [acquired(r).token for r in results] == [1] * CONTENDERS


# --- acquire, renew, release ----------------------------------------------------------


@pytest.mark.parametrize("renewed", [True, False], ids=["renewed", "not-renewed"])
def test_a_contender_waiting_on_a_renewal_sees_its_outcome(
    store, session, open_session, pg_admin, pg_backend, lock, renewed
):
    """A contender blocked behind a renewal's row lock re-checks the renewed row.

    It gets 0 rows when the renewal commits; the control case, a transaction that
    only locks the row, shows that the same contender would have won.
    """
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    pg_backend.expire(lock)
    contender = open_session(store)
    outcome: list[AcquireResult] = []
    table = table_of(pg_backend.schema)
    with pg_admin() as locker, pg_admin() as watcher:
        with locker.transaction():
            locker.execute(
                sql.SQL("SELECT 1 FROM {} WHERE lock_key = %s FOR UPDATE").format(
                    table
                ),
                (lock.key,),
            )
            locker_pid = locker.info.backend_pid
            thread = threading.Thread(
                target=lambda: outcome.append(contender.acquire(lock, claim(2), 30))
            )
            thread.start()
            deadline = time.monotonic() + WAIT_S
            blocked = (
                "SELECT count(*) > 0 FROM pg_stat_activity "
                "WHERE %s = ANY(pg_blocking_pids(pid))"
            )
            while watcher.execute(blocked, (locker_pid,)).fetchone() != (True,):
                assert time.monotonic() < deadline, "the contender never blocked"
                time.sleep(0.01)
            if renewed:
                renew = sql.SQL(
                    "UPDATE {} SET expires_at = now() + interval '30 seconds', "
                    "renewed_at = now() "
                    "WHERE lock_key = %s AND holder = %s AND token = %s"
                ).format(table)
                assert locker.execute(renew, (lock.key, lease.holder, 1)).rowcount == 1
        thread.join(WAIT_S)
    assert len(outcome) == 1
    row = row_of(pg_admin, pg_backend.schema, lock)
    assert row is not None
    if renewed:
        assert outcome[0].lease is None
        assert (row["holder"], row["token"]) == (lease.holder, 1)
        assert row["expires_in_s"] > 0
    else:
        assert acquired(outcome[0]).token == 2
        assert (row["holder"], row["token"]) == (claim(2).holder, 2)


# --- no-session-state: no transaction left open --------------------------------------


def test_every_lease_statement_leaves_the_connection_idle(
    pg_dsn, pg_admin, fresh_schema, lock
):
    """After acquire (creating the table), renew and release the session is idle."""
    app = new_name("lr_idle")
    dsn = make_conninfo(pg_dsn, application_name=app)
    store = PostgresLeaseStore(dsn, fresh_schema)
    session = store.connect()

    def server_state() -> tuple[Any, ...]:
        with pg_admin() as conn:
            row: tuple[Any, ...] | None = conn.execute(
                "SELECT state, backend_xid FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            ).fetchone()
        assert row is not None
        return row

    try:
        lease = acquired(session.acquire(lock, claim(1), LEASE_S))
        assert server_state() == ("idle", None)
        assert session.renew(lease, LEASE_S)
        assert server_state() == ("idle", None)
        assert session.release(lease)
        assert server_state() == ("idle", None)
    finally:
        session.close()


def test_a_connection_left_in_a_transaction_is_caught(
    session, pg_admin, store_schema, lock
):
    """A statement that leaves its connection inside a transaction raises, loudly."""
    lease = acquired(session.acquire(lock, claim(1), LEASE_S))
    before = row_of(pg_admin, store_schema, lock)
    assert before is not None
    # The one reach into the session: force its connection into a transaction.
    session._conn.execute("BEGIN")
    with pytest.raises(LeaderrunError, match=r"left in a transaction \(INTRANS\)"):
        session.renew(lease, 600.0)
    after = row_of(pg_admin, store_schema, lock)
    assert after is not None
    assert after["expires_at"] == before["expires_at"], "others never saw it"


# --- schema and privileges ------------------------------------------------------------


def assert_acquire_and_init_refused(
    store: PostgresLeaseStore, lock: LockId, expected: str
) -> None:
    """Both acquire and init fail with SchemaMissingError saying ``expected``."""
    session = store.connect()
    try:
        with pytest.raises(SchemaMissingError) as raised:
            session.acquire(lock, claim(1), LEASE_S)
        assert raised.value.message == expected
    finally:
        session.close()
    with pytest.raises(SchemaMissingError) as raised:
        store.init()
    assert raised.value.message == expected


def test_a_missing_schema_says_what_to_do(pg_dsn, lock):
    """A schema that does not exist is SchemaMissingError naming it and the fix."""
    missing = new_name("lr_missing")
    store = PostgresLeaseStore(pg_dsn, missing)
    expected = f"schema {missing!r} does not exist; create it or pass another --schema"
    assert_acquire_and_init_refused(store, lock, expected)


@pytest.fixture
def role_dsn(pg_dsn: str, pg_admin: Admin, fresh_schema: str) -> Iterator[str]:
    """A DSN for a new role that may use ``fresh_schema`` but not create in it."""
    role, password = new_name("lr_role"), uuid.uuid4().hex
    with pg_admin() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(fresh_schema), sql.Identifier(role)
            )
        )
    yield make_conninfo(pg_dsn, user=role, password=password)
    with pg_admin() as conn:
        conn.execute(
            sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(
                sql.Identifier(fresh_schema), sql.Identifier(role)
            )
        )
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_role_that_may_not_create_the_table_is_told_what_to_run(
    role_dsn, fresh_schema, lock
):
    """Without CREATE on the schema, the error names the table and the SQL to run."""
    store = PostgresLeaseStore(role_dsn, fresh_schema)
    role = conninfo_to_dict(role_dsn)["user"]
    expected = (
        f"table {fresh_schema}.{TABLE} does not exist and this role may not create "
        f"it; run `leaderrun init --schema {fresh_schema}` as a role that may create "
        f"tables in {fresh_schema}, or have a DBA run the SQL that `leaderrun init "
        f"--schema {fresh_schema} --print-sql --role {role}` prints"
    )
    assert_acquire_and_init_refused(store, lock, expected)


# --- secrets --------------------------------------------------------------------------


def test_no_password_when_the_server_is_unreachable(store_schema):
    """Connecting to a port nobody listens on fails without showing the password."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections refused
        port = sock.getsockname()[1]
        dsn = f"postgresql://app:{SECRET}@127.0.0.1:{port}/prod"
        with pytest.raises(DatabaseUnavailableError) as raised:
            PostgresLeaseStore(dsn, store_schema).connect()
    assert raised.value.message.startswith(f"cannot connect to app@127.0.0.1:{port}/")
    assert SECRET not in raised.value.message


def test_no_password_when_the_server_quotes_it_back(pg_dsn, store_schema):
    """Whatever the server quotes back, the password in it is masked."""
    _, secret = with_password(pg_dsn)
    dsn, _ = with_password(pg_dsn, options=f"-c statement_timeout={secret}")
    with pytest.raises(DatabaseUnavailableError) as raised:
        PostgresLeaseStore(dsn, store_schema).connect()
    assert secret not in raised.value.message
    assert f'"statement_timeout": "{MASK}"' in raised.value.message


def test_no_password_when_a_statement_fails(pg_dsn, pg_admin, store_schema, lock):
    """A statement on a killed connection fails as unavailable, without the password."""
    app = new_name("lr_killed")
    dsn, secret = with_password(pg_dsn, application_name=app)
    session = PostgresLeaseStore(dsn, store_schema).connect()
    try:
        lease = acquired(session.acquire(lock, claim(1), LEASE_S))
        with pg_admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            )
        with pytest.raises(DatabaseUnavailableError) as raised:
            session.renew(lease, LEASE_S)
    finally:
        session.close()
    assert raised.value.message.startswith("statement on ")
    assert secret not in raised.value.message


# --- the slot, chosen by the server's now() ------------------------------------------

HOURLY = OncePer(Schedule("0 * * * *"), tz="Europe/Berlin")


@pytest.mark.parametrize(
    "client_ahead_s",
    [0.0, 3 * 3600.0, -86400.0, 1e-3],
    ids=["same-clock", "3h-ahead", "a-day-behind", "1ms-ahead"],
)
def test_the_server_picks_the_slot_of_its_own_now(
    pg_dsn, pg_admin, store_schema, open_session, lock, client_ahead_s
):
    """The table is built around the client's clock; a client far off is
    answered with the server's now and asks again around it, so the slot is
    the server's either way, and the row records the cadence."""
    store = PostgresLeaseStore(
        pg_dsn, store_schema, wall_clock=lambda: time.time() + client_ahead_s
    )
    session = open_session(store)
    before_s = time.time()
    result = session.acquire(lock, claim(1), LEASE_S, once_per=HOURLY)
    after_s = time.time()
    assert result.lease is not None
    assert result.window_start is not None
    # The server's clock is this host's: its now was between before and after.
    expected = {HOURLY.slot_at(before_s).start_s, HOURLY.slot_at(after_s).start_s}
    assert result.window_start.timestamp() in expected
    cadence = cadence_of(pg_admin, store_schema, lock)
    assert cadence is not None
    assert json.loads(cadence) == json.loads(HOURLY.describe())


def test_a_run_without_a_cadence_keeps_the_last_one(
    session, pg_admin, store_schema, lock
):
    first = session.acquire(lock, claim(1), LEASE_S, once_per=HOURLY)
    assert session.release(acquired(first))
    plain = session.acquire(lock, claim(2), LEASE_S)
    assert plain.lease is not None
    assert plain.window_start is None
    assert cadence_of(pg_admin, store_schema, lock) == HOURLY.describe()


def cadence_of(admin: Admin, schema: str, lock: LockId) -> str | None:
    query = sql.SQL("SELECT cadence FROM {} WHERE lock_key = %s").format(
        table_of(schema)
    )
    with admin() as conn:
        row = conn.execute(query, (lock.key,)).fetchone()
    assert row is not None
    return cast(str | None, row[0])
