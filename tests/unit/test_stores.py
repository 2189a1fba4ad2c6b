"""The store package without a database: choosing the store from the DSN, and
the SQL dialects' tables of named queries and columns.

Where a SQLite file may live is tested in ``test_host.py``; what the stores
decide, in ``tests/contract``.
"""

from pathlib import Path

import pytest

from leaderrun.errors import EXIT_USAGE, ConfigError
from leaderrun.stores import (
    NO_DSN_MESSAGE,
    configured,
    is_sqlite,
    open_store,
    postgres_sql,
    sql,
    sqlite,
    sqlite_path,
    table_label,
)
from leaderrun.stores.base import RUN_TABLE, TABLE
from leaderrun.stores.sqlite import SqliteLeaseStore


@pytest.mark.parametrize(
    ("dsn", "path"),
    [
        ("sqlite:///var/lib/leaderrun/leases.db", "/var/lib/leaderrun/leases.db"),
        ("sqlite:////var/lib/leaderrun/leases.db", "/var/lib/leaderrun/leases.db"),
        ("SQLite:///tmp/x.db", "/tmp/x.db"),
        ("sqlite:/tmp/x.db", "/tmp/x.db"),
        ("sqlite:///tmp/with%20space.db", "/tmp/with space.db"),
        ("  sqlite:///tmp/x.db ", "/tmp/x.db"),
    ],
)
def test_sqlite_path_takes_absolute_paths(dsn, path):
    """Three slashes (a file URI) and four (SQLAlchemy's absolute form) agree."""
    assert is_sqlite(dsn)
    assert sqlite_path(dsn) == Path(path)


@pytest.mark.parametrize(
    ("dsn", "needle"),
    [
        ("sqlite:leases.db", "must give an absolute path"),
        ("sqlite:./leases.db", "must give an absolute path"),
        ("sqlite://leases.db", "names a host"),
        ("sqlite://localhost/tmp/x.db", "names a host"),
        ("sqlite:///tmp/x.db?mode=ro", "takes no parameters"),
        ("sqlite:///tmp/x.db#frag", "takes no parameters"),
        ("sqlite:///tmp/", "must name a file"),
        ("sqlite://", "must give an absolute path"),
        ("sqlite::memory:", "must give an absolute path"),
    ],
)
def test_sqlite_path_refuses_what_two_processes_could_read_differently(dsn, needle):
    """A relative path, a host or parameters: exit 64, naming the DSN and an example."""
    with pytest.raises(ConfigError) as excinfo:
        sqlite_path(dsn)
    assert excinfo.value.exit_code == EXIT_USAGE
    assert needle in excinfo.value.message
    assert repr(dsn) in excinfo.value.message
    assert "sqlite:///var/lib/leaderrun/leases.db" in excinfo.value.message


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://db/app", "host=db dbname=app", "postgres://x", "sqlitedb=1"],
)
def test_other_dsns_are_postgresql(dsn):
    """Only the sqlite: scheme picks the embedded store."""
    assert not is_sqlite(dsn)


@pytest.mark.parametrize(
    ("dsn", "env", "expected"),
    [
        ("", {}, False),
        ("  ", {}, False),
        ("", {"PGPASSWORD": "x", "PGPASSFILE": "/p", "PGSSLMODE": "require"}, False),
        ("", {"PGHOST": ""}, False),
        ("", {"PGHOST": "db"}, True),
        ("", {"PGSERVICE": "leases"}, True),
        ("", {"PGDATABASE": "app"}, True),
        ("", {"PGUSER": "app"}, True),
        ("", {"PGPORT": "5433"}, True),
        ("", {"PGHOSTADDR": "10.0.0.1"}, True),
        ("host=db", {}, True),
        ("sqlite:///tmp/x.db", {}, True),
    ],
)
def test_configured_needs_a_dsn_or_libpq_variables_naming_a_server(dsn, env, expected):
    """A password alone names no server; PGHOST or PGSERVICE does."""
    assert configured(dsn, env) is expected


def test_no_dsn_at_all_is_refused_naming_both_choices():
    """No silent fallback: exit 64, and the message offers PostgreSQL and SQLite."""
    with pytest.raises(ConfigError) as excinfo:
        open_store("", "public", {})
    assert excinfo.value.exit_code == EXIT_USAGE
    assert excinfo.value.message == NO_DSN_MESSAGE
    assert "postgresql://" in NO_DSN_MESSAGE
    assert "sqlite:///" in NO_DSN_MESSAGE


def test_libpq_environment_still_picks_postgresql():
    """PGHOST set and no DSN: the PostgreSQL store, as before (nothing connects)."""
    store = open_store("", "public", {"PGHOST": "db.example"})
    assert type(store).__name__ == "PostgresLeaseStore"


def test_sqlite_dsn_picks_sqlite(tmp_path):
    """A sqlite: DSN gives the SQLite store on that file, busy wait = the budget."""
    store = open_store(f"sqlite://{tmp_path}/l.db", "public", {}, attempt_budget_s=2)
    assert isinstance(store, SqliteLeaseStore)
    assert (store.path, store.busy_s) == (tmp_path / "l.db", 2)
    assert store.describe() == f"sqlite://{tmp_path}/l.db"


def test_schema_is_refused_for_sqlite(tmp_path):
    """--schema means nothing to a SQLite file; saying so beats ignoring it."""
    with pytest.raises(ConfigError, match="--schema 'jobs' is for PostgreSQL"):
        open_store(f"sqlite://{tmp_path}/l.db", "jobs", {})


def test_missing_directory_is_a_usage_error(tmp_path):
    """The file may be created, its directory is not: exit 64 naming it."""
    with pytest.raises(ConfigError) as excinfo:
        open_store(f"sqlite://{tmp_path}/nope/l.db", "public", {})
    assert excinfo.value.exit_code == EXIT_USAGE
    assert f"directory '{tmp_path}/nope' does not exist" in excinfo.value.message


def test_table_label():
    """What `leaderrun init` prints for each store."""
    assert table_label("host=db", "jobs") == "jobs.leader_lease"
    assert table_label("sqlite:///a/b.db", "public") == "leader_lease in /a/b.db"


def test_each_sql_dialect_names_every_query_the_shared_session_runs():
    """PostgreSQL and SQLite each give the text of exactly sql.QUERIES."""
    assert sorted(postgres_sql.QUERIES) == sorted(sql.QUERIES)
    assert sorted(sqlite.QUERIES) == sorted(sql.QUERIES)


def test_the_columns_of_a_table_are_read_from_its_ddl():
    """columns_of lists the DDL's columns in order, not its table constraints."""
    assert sql.columns_of(postgres_sql.RUN_DDL)[-3:] == (
        "exit_status",
        "outcome",
        "output",
    )
    assert "PRIMARY" not in sql.columns_of(postgres_sql.RUN_DDL)
    assert postgres_sql.TABLE_COLUMNS[TABLE][:4] == (
        "lock_key",
        "lock_name",
        "holder",
        "token",
    )
    assert sqlite.SHAPES[sqlite.FORMAT][RUN_TABLE] == (
        frozenset(postgres_sql.TABLE_COLUMNS[RUN_TABLE]),
    )


def test_an_invalid_dsn_is_named_by_where_it_came_from():
    """--dsn or --listen-dsn: the one-line error says which, never the password."""
    with pytest.raises(ConfigError) as excinfo:
        open_store("x y password=sekret", "public", {}, labels={"dsn": "--listen-dsn"})
    assert excinfo.value.exit_code == EXIT_USAGE
    assert excinfo.value.message.startswith("invalid DSN (--listen-dsn): ")
    assert "sekret" not in excinfo.value.message
