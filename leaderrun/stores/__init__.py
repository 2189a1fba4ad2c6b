"""Where leases live; which store a DSN names: PostgreSQL, or SQLite for one host.

The stores and what they share are the modules of this package:
:mod:`~leaderrun.stores.base` (the contract), :mod:`~leaderrun.stores.sql` (the
session the SQL stores share), :mod:`~leaderrun.stores.postgres` with its
statements in :mod:`~leaderrun.stores.postgres_sql`,
:mod:`~leaderrun.stores.sqlite` with what it needs of the host in
:mod:`~leaderrun.stores.host`, and :mod:`~leaderrun.stores.memory` for tests.

``--dsn sqlite:///var/lib/leaderrun/leases.db`` picks the embedded store; any
other DSN (a ``postgresql://`` URI or ``key=value`` pairs) is PostgreSQL's. With
no DSN at all, PostgreSQL is still chosen when libpq's own variables name a
server (``PGHOST``, ``PGSERVICE``, ...); otherwise leaderrun refuses rather than
guess: a silent default could put two nodes on two different databases.

The store modules are imported only once chosen, so a SQLite run never loads
psycopg.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from leaderrun.config import DEFAULT_SCHEMA, MAX_IDENTIFIER_BYTES
from leaderrun.errors import ConfigError
from leaderrun.stores.base import FLAG_LABELS, ManagedStore

__all__ = [
    "ManagedStore",
    "configured",
    "is_sqlite",
    "no_dsn_message",
    "open_store",
    "sqlite_path",
    "table_label",
]

SQLITE_SCHEME = "sqlite"
"""The URI scheme of the embedded store: ``sqlite:///absolute/path.db``."""

LIBPQ_TARGET_VARIABLES = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGSERVICE",
)
"""libpq variables that say which server to use; any of them is a configuration.

``PGPASSWORD`` or ``PGPASSFILE`` alone is not: they say how to log in, not where.
"""


def no_dsn_message(label: str = "--dsn") -> str:
    """The refusal when nothing names a database; ``label`` names the option."""

    def given(value: str) -> str:
        # A flag takes its value after a space, a parameter after '='.
        return f"{label} {value}" if label.startswith("-") else f"{label}={value!r}"

    return (
        f"no database given: pass {given('postgresql://HOST/DB')} to share a lock "
        f"across a fleet, or {given('sqlite:///PATH/leases.db')} for the processes "
        "of one host (or set LEADERRUN_DSN, LEADERRUN_DSN_FILE, DATABASE_URL or "
        "libpq's PGHOST/PGSERVICE)"
    )


NO_DSN_MESSAGE = no_dsn_message()
"""The command line's refusal when nothing names a database."""


def is_sqlite(dsn: str) -> bool:
    """Whether the DSN names the embedded store (``sqlite:...``)."""
    return dsn.strip().lower().startswith(SQLITE_SCHEME + ":")


def sqlite_path(dsn: str, label: str = "--dsn") -> Path:
    """The absolute file path of a ``sqlite:///path`` DSN.

    ``sqlite:///var/lib/x.db`` (a file URI's form) and ``sqlite:////var/lib/x.db``
    (SQLAlchemy's absolute form) name the same file.

    Raises:
        ConfigError: a relative path, a host, parameters, or no file name.
    """
    parts = urlsplit(dsn.strip())
    example = "e.g. sqlite:///var/lib/leaderrun/leases.db"
    if parts.netloc:
        raise ConfigError(
            f"{label} {dsn!r} names a host; a SQLite file is local: use three "
            f"slashes and an absolute path, {example}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{label} {dsn!r} takes no parameters; use only {example}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        # cron starts jobs in $HOME, a shell wherever it is: a relative path could
        # give two entries two files, and both would run.
        raise ConfigError(
            f"{label} {dsn!r} must give an absolute path, so that every process "
            f"finds the same file whatever its working directory; {example}"
        )
    if path.endswith("/") or "\x00" in path:
        raise ConfigError(f"{label} {dsn!r} must name a file; {example}")
    return Path("/" + path.lstrip("/"))


def configured(dsn: str, env: Mapping[str, str]) -> bool:
    """Whether a database is named: a DSN, or libpq variables that name a server."""
    return bool(dsn.strip()) or any(env.get(name) for name in LIBPQ_TARGET_VARIABLES)


def open_store(
    dsn: str,
    schema: str,
    env: Mapping[str, str],
    *,
    attempt_budget_s: float = 5.0,
    create: bool = True,
    labels: Mapping[str, str] | None = None,
) -> ManagedStore:
    """The store the DSN names, ready to connect.

    Args:
        dsn: the resolved DSN (``config.resolve_dsn``); empty means libpq's
            environment, which must then name a server.
        schema: the PostgreSQL schema; SQLite has none, so only the default.
        env: leaderrun's environment, to see libpq's variables.
        attempt_budget_s: how long one statement may take (TCP timeouts for
            PostgreSQL, the lock wait for SQLite).
        create: create the table on first use if it is missing.
        labels: how messages name ``"dsn"`` and ``"schema"`` (the library's
            parameters); default their flags.

    Raises:
        ConfigError: no database named, or a bad DSN for the chosen store.
    """
    dsn_label = (labels or {}).get("dsn", FLAG_LABELS["dsn"])
    schema_label = (labels or {}).get("schema", FLAG_LABELS["schema"])
    if not configured(dsn, env):
        raise ConfigError(no_dsn_message(dsn_label))
    if is_sqlite(dsn):
        path = sqlite_path(dsn, dsn_label)
        if schema != DEFAULT_SCHEMA:
            raise ConfigError(
                f"{schema_label} {schema!r} is for PostgreSQL; a SQLite file has "
                f"one leader_lease table (drop {schema_label}, or use another file)"
            )
        from leaderrun.stores.host import vouched_fs_types
        from leaderrun.stores.sqlite import SqliteLeaseStore

        return SqliteLeaseStore(
            path,
            busy_s=attempt_budget_s,
            create=create,
            vouched_fs=vouched_fs_types(env),
            labels=labels,
        )
    # psycopg costs ~100 ms to import: only a PostgreSQL run pays for it.
    from leaderrun.stores.postgres import PostgresLeaseStore

    return PostgresLeaseStore(
        dsn, schema, attempt_budget_s=attempt_budget_s, create=create, labels=labels
    )


def table_label(dsn: str, schema: str) -> str:
    """The lease table as ``leaderrun init`` names it."""
    if is_sqlite(dsn):
        return f"leader_lease in {sqlite_path(dsn)}"
    return f"{schema}.leader_lease"


def setup_sql(dsn: str, schema: str, role: str) -> str:
    """What ``leaderrun init --print-sql`` prints for the store the DSN names.

    Raises:
        ConfigError: the role is not a PostgreSQL role name (PostgreSQL only).
    """
    if is_sqlite(dsn):
        from leaderrun.stores.sqlite import setup_sql as sqlite_setup_sql

        return sqlite_setup_sql()
    if not role or len(role.encode()) > MAX_IDENTIFIER_BYTES or "\x00" in role:
        raise ConfigError(
            f"--role {role!r} must be a PostgreSQL role name of 1 to "
            f"{MAX_IDENTIFIER_BYTES} bytes"
        )
    # The SQL text alone: it needs no connection, and not psycopg's C parts.
    from leaderrun.stores.postgres_sql import setup_sql as postgres_setup_sql

    return postgres_setup_sql(schema, role)
