"""The PostgreSQL lease store: all of leaderrun's SQL, and the only psycopg user.

Every lease statement is a single autocommit statement whose times come from the
server's ``now()`` (DESIGN rules 1, 2 and 9). Connections carry no session
state: no SET, no advisory locks, no prepared statements, so they work through
PgBouncer in transaction mode. Schema and table are always quoted identifiers,
and every value is a bound parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, LiteralString

import psycopg
from psycopg import errors as e
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from leaderrun.errors import (
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    SchemaMissingError,
)
from leaderrun.lease import Lease, LockId
from leaderrun.redact import dsn_secrets, redact
from leaderrun.store import AcquireResult, Claim, key_collision

log = logging.getLogger("leaderrun")

TABLE = "leader_lease"
"""The lease table's name (the seed's)."""

MAX_COMMAND_CHARS = 1000
"""The command shown in ``status`` is cut to this many characters."""

DEFAULT_CONNECT_TIMEOUT_S = 5
"""libpq connect_timeout in seconds (psycopg: 2 at least), unless the DSN sets it."""

_DDL: LiteralString = """
CREATE TABLE IF NOT EXISTS {table} (
    lock_key    bigint      PRIMARY KEY,
    lock_name   text,
    holder      text,
    token       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    host        text,
    pid         integer,
    command     text
)"""

_COMMENT: LiteralString = """
COMMENT ON TABLE {table} IS
'leaderrun leases. Never delete rows: the fencing token must keep increasing.'"""

# One statement: take the lock when it is free (holder NULL) or expired in the
# server's time, bumping the token in the same row; otherwise report the holder.
# In READ COMMITTED the ON CONFLICT path locks the row and re-checks the WHERE on
# its latest version, so of N racing contenders exactly one wins. The second
# branch reads the pre-statement snapshot: good enough to know how long to sleep.
_ACQUIRE: LiteralString = """
WITH attempt AS (
    INSERT INTO {table} AS l
        (lock_key, lock_name, holder, token, acquired_at, renewed_at, expires_at,
         host, pid, command)
    VALUES (%(key)s, %(name)s, %(holder)s, 1, now(), now(),
            now() + make_interval(secs => %(lease_s)s), %(host)s, %(pid)s, %(command)s)
    ON CONFLICT (lock_key) DO UPDATE
        SET lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder,
            token = l.token + 1, acquired_at = now(), renewed_at = now(),
            expires_at = EXCLUDED.expires_at, host = EXCLUDED.host,
            pid = EXCLUDED.pid, command = EXCLUDED.command
        WHERE (l.holder IS NULL OR l.expires_at <= now())
          AND l.lock_name IS NOT DISTINCT FROM EXCLUDED.lock_name
    RETURNING l.token
)
SELECT true, token, NULL::text, NULL::text, NULL::integer, NULL::float8, %(name)s
  FROM attempt
UNION ALL
SELECT false, token, holder, host, pid,
       extract(epoch FROM expires_at - now())::float8, lock_name
  FROM {table}
 WHERE lock_key = %(key)s AND NOT EXISTS (SELECT FROM attempt)"""

# A compare-and-swap on (holder, token): every takeover bumps the token, so a
# match proves nobody acquired in between, and a stale renewal matches nothing.
# An expired lease is not renewed either: a renewal held up (a frozen server, a
# row lock) until after expiry comes too late for its holder, which has stopped
# its child; reviving the row would only keep every contender out for one more
# lease.
_RENEW: LiteralString = """
UPDATE {table}
   SET expires_at = now() + make_interval(secs => %(lease_s)s), renewed_at = now()
 WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s
   AND expires_at > now()"""

# Release keeps the row, and so the token, for the life of the table.
_RELEASE: LiteralString = """
UPDATE {table}
   SET holder = NULL, expires_at = now()
 WHERE lock_key = %(key)s AND holder = %(holder)s AND token = %(token)s"""


ConnectionFactory = Callable[[], "psycopg.Connection[Any]"]
"""Opens a new psycopg connection; given to a store instead of a DSN."""


def _statement(template: LiteralString, schema: str) -> sql.Composed:
    return sql.SQL(template).format(table=sql.Identifier(schema, TABLE))


class PostgresLeaseStore:
    """Leases in ``<schema>.leader_lease`` of one PostgreSQL database.

    Args:
        dsn: a libpq connection string or URI; empty means libpq's environment.
        schema: the schema of the lease table.
        attempt_budget_s: how long one attempt may take; sets the TCP timeouts
            so a dead peer frees a blocked socket read in about that time.
        create: create the table on first use if it is missing.
        connection_factory: opens each connection instead of ``dsn`` (which then
            only names the server in messages). Every connection it returns is
            switched to autocommit without prepared statements (DESIGN rule 9).
    """

    def __init__(
        self,
        dsn: str,
        schema: str = "public",
        *,
        attempt_budget_s: float = 5.0,
        create: bool = True,
        connection_factory: ConnectionFactory | None = None,
    ) -> None:
        self.schema = schema
        self._factory = connection_factory
        self.create = create
        self._secrets = dsn_secrets(dsn)
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"invalid DSN: {self._clean(exc)}; use key=value pairs or a "
                "postgresql:// URI"
            ) from None
        self._params: dict[str, Any] = params
        defaults: dict[str, Any] = {
            "connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
            "application_name": "leaderrun",
            # Liveness aids only: they free a socket read blocked on a vanished
            # peer so the renewal can reconnect. Safety never depends on them.
            "keepalives": 1,
            "keepalives_idle": max(1, int(attempt_budget_s)),
            "keepalives_interval": 1,
            "keepalives_count": 3,
            "tcp_user_timeout": max(1000, int(attempt_budget_s * 1000)),
        }
        if "," in str(params.get("host", "")):
            # Only a primary can hold a lease; libpq skips the others.
            defaults["target_session_attrs"] = "read-write"
        extra = {k: v for k, v in defaults.items() if k not in params}
        self._conninfo = make_conninfo(dsn, **extra)
        self._acquire = _statement(_ACQUIRE, schema)
        self._renew = _statement(_RENEW, schema)
        self._release = _statement(_RELEASE, schema)

    def describe(self) -> str:
        """``user@host:port/dbname`` as far as the DSN says; never a password."""
        p = self._params
        if self._factory is not None and not p:
            return "the connection factory's database"
        where = p.get("host") or p.get("hostaddr") or "(libpq default host)"
        port = f":{p['port']}" if p.get("port") else ""
        user = f"{p['user']}@" if p.get("user") else ""
        db = f"/{p['dbname']}" if p.get("dbname") else ""
        return f"{user}{where}{port}{db}"

    def connect(self) -> PostgresSession:
        """Open an autocommit session without prepared statements.

        Raises:
            DatabaseUnavailableError: the server cannot be reached or refused us.
        """
        try:
            if self._factory is None:
                conn = psycopg.connect(
                    self._conninfo, autocommit=True, prepare_threshold=None
                )
            else:
                conn = self._factory()
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.rollback()
                conn.autocommit = True
                conn.prepare_threshold = None
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(
                f"cannot connect to {self.describe()}: {self._clean(exc)}"
            ) from None
        log.debug(
            "connected to %s (backend pid %s, server %s)",
            self.describe(),
            conn.info.backend_pid,
            conn.info.server_version,
        )
        return PostgresSession(self, conn)

    def init(self) -> None:
        """Create the lease table if it is missing (idempotent).

        Raises:
            SchemaMissingError: the schema is missing or the role may not create.
            DatabaseUnavailableError: the server cannot be reached.
        """
        session = self.connect()
        try:
            session.ensure_table()
        finally:
            session.close()

    def _clean(self, exc: BaseException) -> str:
        """The first line of a driver error, with the password masked."""
        text = (
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        )
        return redact(text, self._secrets)


class PostgresSession:
    """One connection to the store, used by one thread at a time."""

    def __init__(
        self, store: PostgresLeaseStore, conn: psycopg.Connection[Any]
    ) -> None:
        self._store = store
        self._conn = conn

    def acquire(self, lock: LockId, claim: Claim, lease_s: float) -> AcquireResult:
        """Take the lock if free or expired; else describe its holder.

        Raises:
            ConfigError: the lock's key is taken by a lock of another name.
            SchemaMissingError: no table, and it cannot be created.
            DatabaseUnavailableError: the statement could not run.
        """
        params = {
            "key": lock.key,
            "name": lock.name,
            "holder": claim.holder,
            "lease_s": lease_s,
            "host": claim.host,
            "pid": claim.pid,
            "command": claim.command[:MAX_COMMAND_CHARS],
        }
        try:
            row = self._fetch(self._store._acquire, params)
        except SchemaMissingError:
            if not self._store.create:
                raise
            self.ensure_table()
            row = self._fetch(self._store._acquire, params)
        if row is None:
            # The row did not exist in our snapshot, yet another statement
            # inserted it first: someone just took the lock.
            return AcquireResult(lease=None)
        acquired, token, holder, host, pid, expires_in_s, name = row
        if acquired:
            return AcquireResult(lease=Lease(lock, claim.holder, int(token)))
        if name != lock.name:
            raise key_collision(lock, name)
        return AcquireResult(
            lease=None,
            holder=holder,
            holder_host=host,
            holder_pid=pid,
            expires_in_s=expires_in_s,
        )

    def renew(self, lease: Lease, lease_s: float) -> bool:
        """Extend our lease by ``lease_s`` from the server's now; False if lost."""
        params = {**_lease_params(lease), "lease_s": lease_s}
        return self._execute(self._store._renew, params) == 1

    def release(self, lease: Lease) -> bool:
        """End our lease now, keeping the row; False if it was no longer ours."""
        return self._execute(self._store._release, _lease_params(lease)) == 1

    def ensure_table(self) -> None:
        """``CREATE TABLE IF NOT EXISTS`` the lease table, tolerating a racing twin.

        Raises:
            SchemaMissingError: the schema is missing or the role may not create.
        """
        table = f"{self._store.schema}.{TABLE}"
        try:
            self._conn.execute(_statement(_DDL, self._store.schema))
            self._conn.execute(_statement(_COMMENT, self._store.schema))
        except (e.UniqueViolation, e.DuplicateTable, e.DuplicateObject):
            # Two first users raced CREATE TABLE IF NOT EXISTS; the other won. The
            # loser fails on the table's row type (42710) or its catalog row (23505).
            pass
        except e.InvalidSchemaName:
            raise SchemaMissingError(
                f"schema {self._store.schema!r} does not exist; create it or pass "
                "another --schema"
            ) from None
        except e.InsufficientPrivilege:
            raise SchemaMissingError(
                f"table {table} does not exist and this role may not create it; "
                "ask a DBA to run the SQL that `leaderrun init --print-sql` prints"
            ) from None
        except psycopg.Error as exc:
            raise DatabaseUnavailableError(
                f"cannot create {table}: {self._store._clean(exc)}"
            ) from None
        log.info("created table %s", table)

    def close(self) -> None:
        """Close the connection; never raises."""
        try:
            self._conn.close()
        except Exception:
            log.debug("closing the connection failed", exc_info=True)

    def _fetch(
        self, statement: sql.Composed, params: dict[str, Any]
    ) -> tuple[Any, ...] | None:
        with self._errors():
            cursor = self._conn.execute(statement, params)
            row = cursor.fetchone()
        self._check_idle()
        return row

    def _execute(self, statement: sql.Composed, params: dict[str, Any]) -> int:
        with self._errors():
            count = self._conn.execute(statement, params).rowcount
        self._check_idle()
        return count

    def _check_idle(self) -> None:
        # Rule 9: a lease statement left inside a transaction would freeze now()
        # and hide the renewal from everyone else. Fail loudly, never silently.
        status = self._conn.info.transaction_status
        if status != TransactionStatus.IDLE:
            raise LeaderrunError(f"lease connection left in state {status.name}")

    def _errors(self) -> _StatementErrors:
        return _StatementErrors(self._store)


class _StatementErrors:
    """Maps driver errors of one statement to leaderrun's errors."""

    def __init__(self, store: PostgresLeaseStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is None or not isinstance(exc, psycopg.Error):
            return
        table = f"{self._store.schema}.{TABLE}"
        if isinstance(exc, e.UndefinedTable):
            raise SchemaMissingError(f"table {table} does not exist") from None
        if isinstance(exc, e.InvalidSchemaName):
            raise SchemaMissingError(
                f"schema {self._store.schema!r} does not exist; create it or pass "
                "another --schema"
            ) from None
        if isinstance(exc, e.InsufficientPrivilege):
            raise DatabaseUnavailableError(
                f"this role lacks privileges on {table}: "
                f"{self._store._clean(exc)}; `leaderrun init --print-sql` prints "
                "the GRANTs it needs"
            ) from None
        # Everything else (a lost connection, a read-only standby after a
        # failover, a statement or lock timeout) is worth retrying elsewhere.
        raise DatabaseUnavailableError(
            f"statement on {self._store.describe()} failed: {self._store._clean(exc)}"
        ) from None


def _lease_params(lease: Lease) -> dict[str, Any]:
    return {"key": lease.lock.key, "holder": lease.holder, "token": lease.token}
