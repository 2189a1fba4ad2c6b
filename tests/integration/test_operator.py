"""status, release and init as an operator runs them: the real command, on each store.

Leases are taken with the real store, so the states ``status`` shows come from
the same SQL that ``run`` uses; each test runs on SQLite and on PostgreSQL
(``sql_backend``), unless it is about what one of them alone has. What the
stores decide is in ``tests/contract/test_operator.py``; the one test with a
running ``leaderrun`` holder is ``tests/acceptance/test_operator.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from leaderrun.lease import parse_lock_id
from leaderrun.stores import table_label
from leaderrun.stores.base import REVOKED_HOLDER, TABLE, LeaseRecord
from leaderrun.stores.postgres_sql import setup_sql
from leaderrun.stores.sqlite import SqliteLeaseStore
from tests.helpers.command import leaderrun
from tests.stores import (
    Backend,
    PostgresBackend,
    SqliteBackend,
    acquired,
    claim,
    new_name,
)

pytestmark = pytest.mark.slow

Admin = Callable[[], psycopg.Connection[TupleRow]]
LONG_LEASE_S = 300.0


def on(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun ARGS`` on the store of ``backend``."""
    assert isinstance(backend, SqliteBackend | PostgresBackend)
    env = {}
    if isinstance(backend, PostgresBackend):
        env["LEADERRUN_SCHEMA"] = backend.schema
    return leaderrun(*args, dsn=backend.dsn, env=env)


def status_json(backend: Backend, *args: str) -> tuple[int, dict[str, Any]]:
    """``status --json``: its exit code and document."""
    result = on(backend, "status", "--json", *args)
    assert result.stderr == ""
    return result.returncode, json.loads(result.stdout)


def assert_unchanged(
    before: LeaseRecord, after: LeaseRecord, holder: str | None = None
) -> None:
    """The lease is as it was (but for ``holder``, if given): token and expiry.

    SQLite shows an expiry as now plus what the boot clock leaves, so two reads
    of the same row can differ by a microsecond.
    """
    assert after.holder == (before.holder if holder is None else holder)
    assert after.token == before.token
    assert after.expires_at.timestamp() == pytest.approx(
        before.expires_at.timestamp(), abs=0.01
    )


# --- status -----------------------------------------------------------------------


def test_status_of_a_held_lock(sql_backend, lock):
    """A held lock: exit 0, its holder, token and a lease ending in the future."""
    lease = sql_backend.take(lock, 1, LONG_LEASE_S)
    code, document = status_json(sql_backend, "--lock-id", str(lock))
    assert code == 0
    assert document["version"] == 1
    assert document["database_time"].endswith("Z")
    (entry,) = document["locks"]
    assert {k: entry[k] for k in ("lock", "key", "state", "holder", "host", "pid")} == {
        "lock": str(lock),
        "key": str(lock.key),
        "state": "held",
        "holder": "host1:1:nonce",
        "host": "host1",
        "pid": 1,
    }
    assert entry["token"] == lease.token
    assert LONG_LEASE_S - 30 < entry["expires_in_s"] <= LONG_LEASE_S
    assert 0 <= entry["renewed_ago_s"] < 30
    assert entry["command"] == "job"

    text = on(sql_backend, "status", "--lock-id", str(lock))
    assert text.returncode == 0
    header, line = text.stdout.splitlines()
    assert header.split()[:4] == ["LOCK", "KEY", "STATE", "HOLDER"]
    assert line.split()[:6] == [str(lock), str(lock.key), "held", "host1", "pid", "1"]
    assert " in 4m" in line  # 300 s, less the time this test took


def test_status_of_an_ended_lock(sql_backend, lock):
    """A lease that ran out in the store's time is expired, exit 3, negative seconds."""
    sql_backend.take(lock, 1)
    sql_backend.expire(lock)
    code, document = status_json(sql_backend, "--lock-id", str(lock))
    assert code == 3
    (entry,) = document["locks"]
    assert entry["state"] == "expired"
    assert entry["expires_in_s"] < 0
    text = on(sql_backend, "status", "--lock-id", str(lock))
    assert text.returncode == 3
    assert " expired " in text.stdout
    assert "s ago" in text.stdout


def test_status_of_a_free_and_an_unknown_lock(sql_backend, lock):
    """Released: free with its last token. Never taken: free with no token."""
    lease = sql_backend.take(lock, 1)
    assert sql_backend.session().release(lease)
    code, document = status_json(sql_backend, "--lock-id", str(lock))
    assert code == 3
    (entry,) = document["locks"]
    assert (entry["state"], entry["holder"], entry["token"]) == (
        "free",
        None,
        lease.token,
    )
    text = on(sql_backend, "status", "--lock-id", str(lock))
    assert text.returncode == 3
    cells = text.stdout.splitlines()[1].split()
    assert cells[:5] == [str(lock), str(lock.key), "free", "-", str(lease.token)]
    unknown = new_name("never")
    code, document = status_json(sql_backend, "--lock-id", unknown)
    assert code == 3
    (entry,) = document["locks"]
    assert (entry["lock"], entry["state"], entry["token"]) == (unknown, "free", None)


def test_status_lists_every_lock(sql_backend, lock):
    """Without --lock-id: one row per lock, by name, exit 0 whatever their states."""
    names = sorted(f"{lock.name}-{n}" for n in range(3))
    for n, name in enumerate(names):
        sql_backend.take(parse_lock_id(name), n, LONG_LEASE_S)
    code, document = status_json(sql_backend)
    assert code == 0
    listed = [entry["lock"] for entry in document["locks"]]
    assert [name for name in listed if name in names] == names
    text = on(sql_backend, "status")
    assert text.returncode == 0
    assert sum(name in text.stdout for name in names) == 3


def test_status_on_a_terminal_is_a_table_without_the_key(sql_backend, lock):
    """stdout a terminal: rich's table (state in colour), the 64-bit key left out."""
    sql_backend.take(lock, 1, LONG_LEASE_S)
    env = {"LEADERRUN_DSN": sql_backend.dsn, "COLUMNS": "200", "TERM": "xterm"}
    if isinstance(sql_backend, PostgresBackend):
        env["LEADERRUN_SCHEMA"] = sql_backend.schema
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "leaderrun", "status"],
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", **env},
        )
        os.close(follower)
        chunks = []
        # Read while it writes (a full terminal buffer would block it) until
        # EIO: the other end closed when the process exited.
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
    out = b"".join(chunks).decode()
    assert proc.returncode == 0, err
    assert "\x1b[" in out  # styled
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    header = next(line for line in plain.splitlines() if line.startswith("LOCK"))
    assert header.split()[:3] == ["LOCK", "STATE", "HOLDER"]
    line = next(line for line in plain.splitlines() if line.startswith(str(lock)))
    assert line.split()[1:5] == ["held", "host1", "pid", "1"]
    assert str(lock.key) not in plain


# --- release ----------------------------------------------------------------------


def test_release_refuses_a_live_lease_and_names_its_holder(sql_backend, lock):
    """Without --force a live lease is left alone: exit 75, naming who holds it."""
    lease = sql_backend.take(lock, 1, LONG_LEASE_S)
    before = sql_backend.record(lock)
    result = on(sql_backend, "release", "--lock-id", str(lock))
    assert result.returncode == 75
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"leaderrun: {lock} is held by host1 (pid 1) (fencing token {lease.token})"
    )
    assert "--force" in result.stderr
    assert_unchanged(before, sql_backend.record(lock))


def test_release_frees_an_ended_lease_keeping_the_token(sql_backend, lock):
    """An ended lease: freed (exit 0), then already free (exit 3); token + 1 next."""
    lease = sql_backend.take(lock, 1)
    sql_backend.expire(lock)
    result = on(sql_backend, "release", "--lock-id", str(lock))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"released {lock}: the lease of host1 (pid 1)")
    after = sql_backend.record(lock)
    assert (after.holder, after.token) == (None, lease.token)
    again = on(sql_backend, "release", "--lock-id", str(lock))
    assert again.returncode == 3
    assert "already free" in again.stderr
    assert sql_backend.take(lock, 2).token == lease.token + 1


def test_release_of_a_lock_never_taken_exits_3(sql_backend):
    """Nothing to release: exit 3, in one line."""
    name = new_name("never")
    result = on(sql_backend, "release", "--lock-id", name)
    assert (result.returncode, result.stderr) == (
        3,
        f"leaderrun: {name} has never been taken; nothing to release\n",
    )


def test_forced_release_revokes_a_live_lease_once(sql_backend, lock):
    """--force: exit 0, the lease revoked (status shows it); again, already revoked."""
    sql_backend.take(lock, 1, LONG_LEASE_S)
    before = sql_backend.record(lock)
    forced = on(sql_backend, "release", "--lock-id", str(lock), "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith(f"revoked {lock} from host1 (pid 1)")
    after = sql_backend.record(lock)
    assert after.holder == REVOKED_HOLDER
    assert_unchanged(before, after, holder=REVOKED_HOLDER)
    code, document = status_json(sql_backend, "--lock-id", str(lock))
    assert (code, document["locks"][0]["state"]) == (0, "revoked")
    repeat = on(sql_backend, "release", "--lock-id", str(lock), "--force")
    assert (repeat.returncode, "already revoked" in repeat.stdout) == (0, True)


def test_forced_release_with_a_stale_token_changes_nothing(sql_backend, lock):
    """--token: the lock changed hands since status; the new holder is left alone."""
    lease = sql_backend.take(lock, 1, LONG_LEASE_S)
    before = sql_backend.record(lock)
    args = ("release", "--lock-id", str(lock), "--force")
    stale = on(sql_backend, *args, "--token", str(lease.token - 1))
    assert stale.returncode == 75
    assert stale.stderr == (
        f"leaderrun: {lock} has fencing token {lease.token} now, not "
        f"{lease.token - 1}: it changed hands since; nothing released (check "
        "`leaderrun status` again)\n"
    )
    assert_unchanged(before, sql_backend.record(lock))
    current = on(sql_backend, *args, "--token", str(lease.token))
    assert current.returncode == 0, current.stderr
    assert sql_backend.record(lock).holder == REVOKED_HOLDER


def test_forced_release_of_an_ended_lease_frees_it(sql_backend, lock):
    """With --force, an ended lease is freed, not revoked."""
    sql_backend.take(lock, 1)
    sql_backend.expire(lock)
    result = on(sql_backend, "release", "--lock-id", str(lock), "--force")
    assert result.returncode == 0
    assert result.stdout.startswith(f"released {lock}")
    assert sql_backend.record(lock).holder is None


def test_release_needs_a_lock_id(sql_backend):
    """release names no lock: a usage error, exit 64."""
    result = on(sql_backend, "release")
    assert result.returncode == 64
    assert result.stderr.startswith("leaderrun: no --lock-id given")


# --- init -------------------------------------------------------------------------


def test_init_creates_once_and_repeats_harmlessly(sql_backend):
    """init makes the tables once; a second init changes nothing, and says so."""
    fresh = sql_backend.fresh_store()
    if isinstance(fresh, SqliteLeaseStore):
        dsn, schema, env = f"sqlite://{fresh.path}", "public", {}
    else:
        dsn, schema = sql_backend.dsn, fresh.schema
        env = {"LEADERRUN_SCHEMA": schema}
    label = table_label(dsn, schema)
    first = leaderrun("init", dsn=dsn, env=env)
    assert (first.returncode, first.stdout) == (0, f"{label} created\n")
    second = leaderrun("init", dsn=dsn, env=env)
    assert (second.returncode, second.stdout) == (
        0,
        f"{label} already exists and is up to date\n",
    )


# --- only PostgreSQL ----------------------------------------------------------------


@pytest.fixture
def refused_dsn() -> Iterator[str]:
    """A DSN of a port that refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening
        yield f"host=127.0.0.1 port={sock.getsockname()[1]} connect_timeout=5"


def test_status_of_an_unreachable_database_exits_69(refused_dsn):
    """An unreachable server: exit 69 in one line, nothing on stdout."""
    result = leaderrun("status", "--lock-id", "x", dsn=refused_dsn)
    assert result.returncode == 69
    assert result.stdout == ""
    assert result.stderr.startswith("leaderrun: cannot connect to ")
    assert result.stderr.count("\n") == 1


@pytest.fixture
def empty_schema(pg_admin: Admin) -> Iterator[str]:
    """A schema without leaderrun's tables."""
    name = new_name("lr_init")
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def test_status_without_the_table_says_what_to_run(pg_dsn, pg_admin, empty_schema):
    """A schema with no lease table: exit 69 naming `leaderrun init`; none created."""
    for args in (["status"], ["release", "--lock-id", "x"]):
        result = leaderrun(*args, "--schema", empty_schema, dsn=pg_dsn)
        assert result.returncode == 69
        assert result.stderr == (
            f"leaderrun: table {empty_schema}.{TABLE} does not exist; run `leaderrun "
            f"init --schema {empty_schema}` as a role that may create tables in "
            f"{empty_schema}, or have a DBA run the SQL that `leaderrun init "
            f"--schema {empty_schema} --print-sql` prints\n"
        )
    with pg_admin() as conn:
        found = conn.execute(
            "SELECT to_regclass(%s)", (f'"{empty_schema}".{TABLE}',)
        ).fetchone()
    assert found == (None,)


def test_status_stuck_behind_a_table_lock_says_so_and_exits_69(pg_backend, pg_admin):
    """A migration's open transaction holds the table: status gives up after its
    statement bound (5 s) in one line that says stuck, not unreachable, and its
    statement does not stay queued on the server."""
    table = sql.Identifier(pg_backend.schema, TABLE)
    with pg_admin() as locker, locker.transaction():
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        began = time.monotonic()
        result = on(pg_backend, "status")
        took = time.monotonic() - began
        # The process exited after its cancel was sent; the server may take a
        # moment more to act on it.
        deadline = time.monotonic() + 5
        with pg_admin() as watcher:
            while (
                waiting := watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE %s = ANY(pg_blocking_pids(pid))",
                    (locker.info.backend_pid,),
                ).fetchone()
            ) != (0,) and time.monotonic() < deadline:
                time.sleep(0.05)
    assert (result.returncode, result.stdout) == (69, "")
    assert result.stderr.startswith(
        "leaderrun: the status of every lock did not finish within 5s on "
    )
    assert "open transaction" in result.stderr
    assert result.stderr.count("\n") == 1
    assert took < 30
    assert waiting == (0,)


def test_init_makes_the_lease_table_keyed_by_lock(pg_dsn, pg_admin, empty_schema):
    """The one index of the lease table is its primary key, lock_key."""
    assert leaderrun("init", "--schema", empty_schema, dsn=pg_dsn).returncode == 0
    with pg_admin() as conn:
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            (empty_schema, TABLE),
        ).fetchall()
    assert len(indexes) == 1
    assert "UNIQUE INDEX" in indexes[0][0]
    assert "(lock_key)" in indexes[0][0]


def test_print_sql_needs_no_database_and_matches_setup_sql():
    """--print-sql connects to nothing: the DDL and least-privileged GRANTs."""
    result = leaderrun(
        "init", "--print-sql", "--schema", "ops", "--role", "app", dsn="port=1"
    )
    assert result.returncode == 0
    assert result.stdout == setup_sql("ops", "app")
    assert 'GRANT USAGE ON SCHEMA "ops" TO "app";' in result.stdout
    assert 'GRANT SELECT, INSERT, UPDATE ON "ops"."leader_lease" TO "app";' in (
        result.stdout
    )
    grants = result.stdout.split("-- The role")[1].split("\n", 2)[2]
    # No DELETE on the leases (tokens must keep increasing); the run history is
    # pruned by the acquire statement, so that needs DELETE.
    assert [line for line in grants.splitlines() if "DELETE" in line] == [
        'GRANT SELECT, INSERT, UPDATE, DELETE ON "ops"."leader_run" TO "app";'
    ]


def test_print_sql_refuses_an_empty_role():
    """An empty --role is a usage error, before anything is printed."""
    result = leaderrun("init", "--print-sql", "--role", "", dsn="port=1")
    assert (result.returncode, result.stdout) == (64, "")
    assert result.stderr == (
        "leaderrun: --role '' must be a PostgreSQL role name of 1 to 63 bytes\n"
    )


@pytest.fixture
def app_role(pg_dsn: str, pg_admin: Admin) -> Iterator[tuple[str, str]]:
    """A login role with no privileges at all yet: (name, DSN)."""
    role, password = new_name("lr_app"), uuid.uuid4().hex
    with pg_admin() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    yield role, make_conninfo(pg_dsn, user=role, password=password)
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_least_privileged_role_runs_shows_and_releases_but_cannot_create(
    pg_dsn, pg_admin, empty_schema, app_role
):
    """A DBA runs --print-sql's output (twice); the role can then do everything but
    create the table or delete its rows."""
    role, role_dsn = app_role
    printed = leaderrun(
        "init", "--print-sql", "--schema", empty_schema, "--role", role, dsn=pg_dsn
    )
    with pg_admin() as conn:
        for _ in range(2):  # idempotent
            conn.execute(printed.stdout.encode())
    name = new_name("job")

    assert leaderrun("init", "--schema", empty_schema, dsn=role_dsn).returncode == 0
    ran = leaderrun(
        *("--schema", empty_schema, "--lock-id", name, "--"),
        *("sh", "-c", "echo $LEADERRUN_FENCING_TOKEN"),
        dsn=role_dsn,
    )
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "1\n", "")
    shown = leaderrun(
        "status", "--schema", empty_schema, "--lock-id", name, dsn=role_dsn
    )
    assert shown.returncode == 3  # released after the run
    released = leaderrun(
        "release", "--schema", empty_schema, "--lock-id", name, dsn=role_dsn
    )
    assert released.returncode == 3, released.stderr

    with psycopg.connect(role_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL("CREATE TABLE {} (x int)").format(
                    sql.Identifier(empty_schema, "other")
                )
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                sql.SQL("DELETE FROM {}").format(sql.Identifier(empty_schema, TABLE))
            )


def test_least_privileged_role_without_the_table_is_told_what_to_run(
    pg_admin, empty_schema, app_role
):
    """init and run, as a role that may not create: exit 69 with the SQL to run."""
    role, role_dsn = app_role
    with pg_admin() as conn:
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(empty_schema), sql.Identifier(role)
            )
        )
    hint = (
        f"run `leaderrun init --schema {empty_schema}` as a role that may create "
        f"tables in {empty_schema}, or have a DBA run the SQL that `leaderrun init "
        f"--schema {empty_schema} --print-sql --role {role}` prints"
    )
    for args in (
        ["init", "--schema", empty_schema],
        ["--schema", empty_schema, "--lock-id", "x", "--", "true"],
    ):
        result = leaderrun(*args, dsn=role_dsn)
        assert result.returncode == 69
        assert result.stderr == (
            f"leaderrun: table {empty_schema}.{TABLE} does not exist and this role "
            f"may not create it; {hint}\n"
        )


# --- only SQLite --------------------------------------------------------------------


def test_status_and_release_without_the_file_say_to_run_init(tmp_path):
    """No file: exit 69 naming `leaderrun init`; no file is created by looking."""
    missing = tmp_path / "missing.db"
    for args in (["status"], ["release", "--lock-id", "x"]):
        result = leaderrun(*args, dsn=f"sqlite://{missing}")
        assert result.returncode == 69
        assert result.stderr == (
            f"leaderrun: {missing} has no leader_lease table; run `leaderrun init "
            f"--dsn sqlite://{missing}` (or any leaderrun run with it) first\n"
        )
    assert not missing.exists()


def test_print_sql_makes_a_sqlite_file_the_store_can_use(tmp_path, lock):
    """The SQL that `init --print-sql` prints, run by hand, gives a working file."""
    path = tmp_path / "by-hand.db"
    printed = leaderrun("init", "--print-sql", dsn=f"sqlite://{path}")
    assert printed.returncode == 0
    assert not path.exists()  # printing touches nothing
    with sqlite3.connect(path) as conn:
        conn.executescript(printed.stdout)
    store = SqliteLeaseStore(path, create=False)
    with contextlib.closing(store.connect()) as session:
        assert acquired(session.acquire(lock, claim(1), LONG_LEASE_S)).token == 1
    assert store.snapshot(lock).records[0].holder == claim(1).holder
