"""Whose table it is: leaderrun never alters a table it did not create, and upgrades
its own only in ``init``, without stalling the holders that use it
(``own-tables-only``).

A foreign table is the seed library's (nest-leader-election) own
``leader_lease``, created exactly as that library does; an older table is
leaderrun's first version: no --once-per columns and no run history.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

from leaderrun.errors import DatabaseUnavailableError, SchemaMissingError
from leaderrun.slots import OncePer, Window
from leaderrun.stores.base import RUN_TABLE, TABLE, InitOutcome
from leaderrun.stores.postgres import PostgresLeaseStore
from leaderrun.stores.postgres_sql import TABLE_COLUMNS, foreign_table
from tests.helpers.attempts import Attempt
from tests.helpers.command import leaderrun
from tests.stores import LEASE_S, claim, open_transaction

pytestmark = [pytest.mark.pg, pytest.mark.slow]

Admin = Callable[[], psycopg.Connection[TupleRow]]

MARGIN_S = 1.5
"""Scheduling slack on a busy two-core host."""
INIT_HOLDS_OTHERS_UP_AT_MOST_S = 1.0
"""How long init's DDL may keep other sessions' statements queued behind it."""
INIT_GIVES_UP_WITHIN_S = 20.0
SEED_COLUMNS = ["id", "leader_id", "expires_at", "created_at"]
HOLDER = claim(1)

# The seed library's DDL (nest-leader-election, createLockTableIfNotExists),
# with the schema quoted.
SEED_DDL = (
    "CREATE TABLE IF NOT EXISTS {table} ("
    " id INT PRIMARY KEY,"
    " leader_id TEXT NOT NULL,"
    " expires_at TIMESTAMPTZ NOT NULL,"
    " created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),"
    " CHECK (expires_at > created_at))",
    "CREATE INDEX IF NOT EXISTS leader_lease_expires ON {table} (expires_at)",
)

# leaderrun's first lease table: no window columns, no leader_run beside it.
OLDER_DDL = (
    "CREATE TABLE {table} (lock_key bigint PRIMARY KEY, lock_name text,"
    " holder text, token bigint NOT NULL, acquired_at timestamptz NOT NULL,"
    " renewed_at timestamptz NOT NULL, expires_at timestamptz NOT NULL,"
    " host text, pid integer, command text)",
)


def schema_with(admin: Admin, prefix: str, ddl: tuple[str, ...]) -> Iterator[str]:
    """A throwaway schema holding a leader_lease made by ``ddl``."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        for statement in ddl:
            conn.execute(sql.SQL(statement).format(table=sql.Identifier(name, TABLE)))
    yield name
    with admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def seed_schema(pg_admin: Admin) -> Iterator[str]:
    """A schema where the seed library has made its own leader_lease."""
    yield from schema_with(pg_admin, "lr_seed", SEED_DDL)


@pytest.fixture
def older_schema(pg_admin: Admin) -> Iterator[str]:
    """A schema holding a leader_lease of leaderrun's first version."""
    yield from schema_with(pg_admin, "lr_old", OLDER_DDL)


def relations(admin: Admin, schema: str) -> list[tuple[Any, ...]]:
    """Every relation in ``schema``: name, kind, columns in order, comment."""
    with admin() as conn:
        return conn.execute(
            "SELECT c.relname, c.relkind,"
            " ARRAY(SELECT a.attname::text FROM pg_attribute a"
            "       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            "       ORDER BY a.attnum),"
            " obj_description(c.oid, 'pg_class')"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s ORDER BY c.relname",
            (schema,),
        ).fetchall()


def columns(admin: Admin, schema: str) -> list[str]:
    """The lease table's columns, in order."""
    found = {row[0]: row[2] for row in relations(admin, schema)}
    return list(found[TABLE])


# --- telling leaderrun's tables from others' ------------------------------------------


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ({}, None),
        ({TABLE: ("r", tuple(TABLE_COLUMNS[TABLE]))}, None),
        ({TABLE: ("r", ("lock_key", "holder", "token", "expires_at"))}, None),
        (
            {TABLE: ("r", tuple(SEED_COLUMNS))},
            "(a table with columns id, leader_id, expires_at, created_at)",
        ),
        (
            {TABLE: ("v", tuple(TABLE_COLUMNS[TABLE]))},
            "(a view with columns lock_key, ",
        ),
        ({RUN_TABLE: ("r", ("id",))}, "leader_run is not leaderrun's table"),
    ],
    ids=["nothing", "complete", "older", "seed", "view", "foreign-history"],
)
def test_a_table_is_leaderruns_by_its_core_columns(found, expected):
    """Only a table with lock_key, holder, token and expires_at is leaderrun's."""
    refusal = foreign_table("ops", found)
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert expected in refusal.message
        assert refusal.message.endswith(
            "pass --schema to keep leaderrun's tables in a schema of their own"
        )


# --- a foreign table ------------------------------------------------------------------


def test_the_seed_libraries_table_is_refused_by_acquire_and_left_alone(
    pg_dsn, pg_admin, seed_schema, lock
):
    """The library's acquire names the table's columns and --schema; nothing changes."""
    before = relations(pg_admin, seed_schema)
    session = PostgresLeaseStore(pg_dsn, seed_schema).connect()
    try:
        with pytest.raises(SchemaMissingError) as raised:
            session.acquire(lock, HOLDER, LEASE_S)
    finally:
        session.close()
    assert relations(pg_admin, seed_schema) == before
    message = raised.value.message
    assert message.startswith(f"{seed_schema}.{TABLE} is not leaderrun's table")
    assert ", ".join(SEED_COLUMNS) in message
    assert "--schema" in message


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("run", ["--lock-id", "job", "--", "echo", "ran"]),
        ("init", []),
        ("status", []),
        ("history", []),
    ],
)
def test_the_seed_libraries_table_is_refused_by_every_command(
    pg_dsn, pg_admin, seed_schema, command, args
):
    """run, init, status and history exit 69 in one line, and alter nothing."""
    before = relations(pg_admin, seed_schema)
    result = leaderrun(command, "--schema", seed_schema, *args, dsn=pg_dsn)
    assert relations(pg_admin, seed_schema) == before
    assert (result.returncode, result.stdout) == (69, "")
    assert result.stderr.startswith(
        f"leaderrun: {seed_schema}.{TABLE} is not leaderrun's table"
    )
    assert result.stderr.count("\n") == 1
    assert ", ".join(SEED_COLUMNS) in result.stderr
    assert columns(pg_admin, seed_schema) == SEED_COLUMNS


# --- an older table of leaderrun's own ------------------------------------------------


def test_an_older_lease_table_is_refused_on_the_hot_path_until_init_upgrades_it(
    pg_dsn, pg_admin, older_schema, lock
):
    """acquire says to run init and alters nothing; after init, runs are recorded."""
    store = PostgresLeaseStore(pg_dsn, older_schema)
    before = relations(pg_admin, older_schema)
    session = store.connect()
    try:
        with pytest.raises(SchemaMissingError) as raised:
            session.acquire(lock, HOLDER, LEASE_S, history_keep=5)
    finally:
        session.close()
    assert f"run `leaderrun init --schema {older_schema}`" in raised.value.message
    assert "upgrade" in raised.value.message
    assert relations(pg_admin, older_schema) == before

    assert store.init() is InitOutcome.upgraded  # the lease table was there already
    # Every column added since, in the order the DDL has them.
    assert columns(pg_admin, older_schema) == list(TABLE_COLUMNS[TABLE])
    session = store.connect()
    try:
        result = session.acquire(
            lock, HOLDER, LEASE_S, once_per=OncePer(Window(3600.0)), history_keep=5
        )
    finally:
        session.close()
    assert result.lease is not None
    assert result.lease.token == 1
    assert [r.token for r in store.history(lock, 5)] == [1]
    assert store.init() is InitOutcome.current  # nothing left to do


def test_init_behind_a_readers_lock_gives_up_without_holding_others_up(
    pg_dsn, pg_admin, older_schema
):
    """A reader's open transaction keeps init from altering the table: init gives
    up after a few short tries, and a session that queued behind its ALTER waited
    no longer than one try's lock_timeout."""
    store = PostgresLeaseStore(pg_dsn, older_schema)
    table = sql.Identifier(older_schema, TABLE)
    regclass = table.as_string()
    before = relations(pg_admin, older_schema)
    reader = sql.SQL("SELECT count(*) FROM {}").format(table)
    with open_transaction(pg_admin, reader):
        attempt = Attempt(store.init)
        deadline_s = time.monotonic() + INIT_GIVES_UP_WITHIN_S
        while not ddl_queued(pg_admin, regclass):
            assert time.monotonic() < deadline_s, "init never tried to alter the table"
            time.sleep(0.01)
        # A renewal or a status read, arriving now, queues behind init's ALTER.
        with pg_admin() as other:
            other.execute("SET statement_timeout = '10s'")
            began_s = time.monotonic()
            other.execute(reader)
            held_up_s = time.monotonic() - began_s
        assert held_up_s < INIT_HOLDS_OTHERS_UP_AT_MOST_S + MARGIN_S
        error = attempt.error_within(INIT_GIVES_UP_WITHIN_S)
    assert isinstance(error, DatabaseUnavailableError), repr(error)
    assert error.message.startswith(f"could not lock {older_schema}.{TABLE}")
    assert "try again" in error.message
    assert relations(pg_admin, older_schema)[0] == before[0]  # the lease table


def ddl_queued(admin: Admin, regclass: str) -> bool:
    """Whether an ACCESS EXCLUSIVE lock on the table is requested, not yet granted."""
    with admin() as conn:
        row = conn.execute(
            "SELECT count(*) > 0 FROM pg_locks WHERE relation = to_regclass(%s)"
            " AND mode = 'AccessExclusiveLock' AND NOT granted",
            (regclass,),
        ).fetchone()
    return bool(row and row[0])
