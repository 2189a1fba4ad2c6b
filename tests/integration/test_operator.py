"""status, release and init as an operator runs them: the real command, a real server.

Leases are taken with the real store (``PostgresLeaseStore``), so the states
that ``status`` shows come from the same SQL that ``run`` uses; the one test
with a running ``leaderrun`` holder is in ``tests/acceptance/test_operator.py``.
"""

from __future__ import annotations

import json
import re
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

from leaderrun.lease import LockId, parse_lock_id
from leaderrun.stores.base import REVOKED_HOLDER, TABLE, Claim
from leaderrun.stores.postgres import PostgresLeaseStore
from leaderrun.stores.postgres_sql import setup_sql

pytestmark = [pytest.mark.pg, pytest.mark.slow]

Admin = Callable[[], psycopg.Connection[TupleRow]]
SHORT_LEASE_S = 0.5
"""A lease that runs out almost at once, to see the expired state for real."""
LONG_LEASE_S = 300.0


def leaderrun(
    *args: str, dsn: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun`` to completion (stdout is a pipe, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "leaderrun", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LEADERRUN_DSN": dsn, **(env or {})},
    )


def new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def claim(n: int) -> Claim:
    return Claim(holder=f"node{n}:{n}:nonce", host=f"node{n}", pid=n, command="job")


@pytest.fixture(scope="module")
def schema(pg_dsn: str, pg_admin: Admin) -> Iterator[str]:
    """A schema of this module's own, with the lease table."""
    name = new_name("lr_ops")
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    PostgresLeaseStore(pg_dsn, name).init()
    yield name
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def lock(lock_name: str) -> LockId:
    return parse_lock_id(lock_name)


@pytest.fixture
def take(pg_dsn: str, schema: str) -> Callable[..., Any]:
    """Take ``lock`` for contender ``n`` with a lease of ``lease_s``; return it."""

    def take_(lock: LockId, lease_s: float, n: int = 1) -> Any:
        session = PostgresLeaseStore(pg_dsn, schema).connect()
        try:
            result = session.acquire(lock, claim(n), lease_s)
        finally:
            session.close()
        assert result.lease is not None, result
        return result.lease

    return take_


def row(pg_admin: Admin, schema: str, lock: LockId) -> dict[str, Any]:
    with pg_admin() as conn:
        cursor = conn.execute(
            sql.SQL(
                "SELECT holder, token, expires_at, expires_at > now() AS live"
                " FROM {} WHERE lock_key = %s"
            ).format(sql.Identifier(schema, TABLE)),
            (lock.key,),
        )
        names = [c.name for c in cursor.description or ()]
        found = cursor.fetchone()
    assert found is not None
    return dict(zip(names, found, strict=True))


def status_json(dsn: str, schema: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = leaderrun("status", "--schema", schema, "--json", *args, dsn=dsn)
    assert result.stderr == ""
    return result.returncode, json.loads(result.stdout)


# --- status -----------------------------------------------------------------------


def test_status_of_a_held_lock(pg_dsn, schema, lock, take):
    """A held lock: exit 0, its holder, token and a lease ending in the future."""
    lease = take(lock, LONG_LEASE_S)
    code, document = status_json(pg_dsn, schema, "--lock-id", str(lock))
    assert code == 0
    assert document["version"] == 1
    assert document["database_time"].endswith("Z")
    (entry,) = document["locks"]
    assert {k: entry[k] for k in ("lock", "key", "state", "holder", "host", "pid")} == {
        "lock": str(lock),
        "key": str(lock.key),
        "state": "held",
        "holder": "node1:1:nonce",
        "host": "node1",
        "pid": 1,
    }
    assert entry["token"] == lease.token
    assert LONG_LEASE_S - 30 < entry["expires_in_s"] <= LONG_LEASE_S
    assert 0 <= entry["renewed_ago_s"] < 30
    assert entry["command"] == "job"

    text = leaderrun("status", "--schema", schema, "--lock-id", str(lock), dsn=pg_dsn)
    assert text.returncode == 0
    header, line = text.stdout.splitlines()
    assert header.split()[:4] == ["LOCK", "KEY", "STATE", "HOLDER"]
    assert line.split()[:6] == [str(lock), str(lock.key), "held", "node1", "pid", "1"]
    assert " in 4m" in line  # 300 s, less the time this test took


def test_status_of_an_expired_lock(pg_dsn, schema, lock, take):
    """A lease that ran out in database time is expired, exit 3, negative seconds."""
    take(lock, SHORT_LEASE_S)
    time.sleep(SHORT_LEASE_S + 0.2)
    code, document = status_json(pg_dsn, schema, "--lock-id", str(lock))
    assert code == 3
    (entry,) = document["locks"]
    assert entry["state"] == "expired"
    assert entry["expires_in_s"] < 0
    text = leaderrun("status", "--schema", schema, "--lock-id", str(lock), dsn=pg_dsn)
    assert text.returncode == 3
    assert " expired " in text.stdout
    assert "s ago" in text.stdout


def test_status_of_a_free_and_an_unknown_lock(pg_dsn, schema, lock, take):
    """Released: free with its last token. Never taken: free with no token."""
    lease = take(lock, LONG_LEASE_S)
    session = PostgresLeaseStore(pg_dsn, schema).connect()
    try:
        assert session.release(lease)
    finally:
        session.close()
    code, document = status_json(pg_dsn, schema, "--lock-id", str(lock))
    assert code == 3
    (entry,) = document["locks"]
    assert (entry["state"], entry["holder"], entry["token"]) == (
        "free",
        None,
        lease.token,
    )
    text = leaderrun("status", "--schema", schema, "--lock-id", str(lock), dsn=pg_dsn)
    assert text.returncode == 3
    cells = text.stdout.splitlines()[1].split()
    assert cells[:5] == [str(lock), str(lock.key), "free", "-", str(lease.token)]
    unknown = new_name("never")
    code, document = status_json(pg_dsn, schema, "--lock-id", unknown)
    assert code == 3
    (entry,) = document["locks"]
    assert (entry["lock"], entry["state"], entry["token"]) == (unknown, "free", None)


def test_status_lists_every_lock(pg_dsn, schema, take):
    """Without --lock-id: one row per lock, exit 0 whatever their states."""
    names = sorted(new_name("all") for _ in range(3))
    for n, name in enumerate(names):
        take(parse_lock_id(name), LONG_LEASE_S, n)
    code, document = status_json(pg_dsn, schema)
    assert code == 0
    listed = [entry["lock"] for entry in document["locks"]]
    assert [name for name in listed if name in names] == names  # sorted by name
    text = leaderrun("status", "--schema", schema, dsn=pg_dsn)
    assert text.returncode == 0
    assert sum(name in text.stdout for name in names) == 3


def test_status_of_an_unreachable_database_exits_69(refused_dsn):
    result = leaderrun("status", "--lock-id", "x", dsn=refused_dsn)
    assert result.returncode == 69
    assert result.stdout == ""
    assert result.stderr.startswith("leaderrun: cannot connect to ")
    assert result.stderr.count("\n") == 1


def test_status_without_the_table_says_what_to_run(pg_dsn, pg_admin):
    """A schema with no lease table: exit 69 naming `leaderrun init`; none created."""
    empty = new_name("lr_empty")
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(empty)))
    try:
        for args in (["status"], ["release", "--lock-id", "x"]):
            result = leaderrun(*args, "--schema", empty, dsn=pg_dsn)
            assert result.returncode == 69
            assert result.stderr == (
                f"leaderrun: table {empty}.{TABLE} does not exist; run `leaderrun "
                f"init --schema {empty}` as a role that may create tables in {empty},"
                f" or have a DBA run the SQL that `leaderrun init --schema {empty} "
                "--print-sql` prints\n"
            )
        with pg_admin() as conn:
            found = conn.execute(
                "SELECT to_regclass(%s)", (f'"{empty}".{TABLE}',)
            ).fetchone()
        assert found == (None,)
    finally:
        with pg_admin() as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(empty))
            )


def test_status_stuck_behind_a_table_lock_says_so_and_exits_69(
    pg_dsn, pg_admin, schema
):
    """A migration's open transaction holds the table: status gives up after its
    statement bound (5 s) in one line that says stuck, not unreachable, and its
    statement does not stay queued on the server."""
    table = sql.Identifier(schema, TABLE)
    with pg_admin() as locker, locker.transaction():
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        began = time.monotonic()
        result = leaderrun("status", "--schema", schema, dsn=pg_dsn)
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


@pytest.fixture
def refused_dsn() -> Iterator[str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening
        yield f"host=127.0.0.1 port={sock.getsockname()[1]} connect_timeout=5"


# --- release ----------------------------------------------------------------------


def test_release_refuses_a_live_lease_and_names_its_holder(
    pg_dsn, pg_admin, schema, lock, take
):
    lease = take(lock, LONG_LEASE_S)
    before = row(pg_admin, schema, lock)
    result = leaderrun(
        "release", "--schema", schema, "--lock-id", str(lock), dsn=pg_dsn
    )
    assert result.returncode == 75
    assert result.stdout == ""
    assert result.stderr.startswith(
        f"leaderrun: {lock} is held by node1 (pid 1) (fencing token {lease.token})"
    )
    assert "--force" in result.stderr
    assert row(pg_admin, schema, lock) == before


def test_release_frees_an_expired_lease_keeping_the_token(
    pg_dsn, pg_admin, schema, lock, take
):
    lease = take(lock, SHORT_LEASE_S)
    time.sleep(SHORT_LEASE_S + 0.2)
    result = leaderrun(
        "release", "--schema", schema, "--lock-id", str(lock), dsn=pg_dsn
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"released {lock}: the lease of node1 (pid 1)")
    after = row(pg_admin, schema, lock)
    assert (after["holder"], after["token"]) == (None, lease.token)
    again = leaderrun("release", "--schema", schema, "--lock-id", str(lock), dsn=pg_dsn)
    assert again.returncode == 3
    assert "already free" in again.stderr
    assert take(lock, LONG_LEASE_S, 2).token == lease.token + 1


def test_release_of_a_lock_never_taken_exits_3(pg_dsn, schema):
    name = new_name("never")
    result = leaderrun("release", "--schema", schema, "--lock-id", name, dsn=pg_dsn)
    assert (result.returncode, result.stderr) == (
        3,
        f"leaderrun: {name} has never been taken; nothing to release\n",
    )


def test_forced_release_revokes_without_handing_over_early(
    pg_dsn, pg_admin, schema, lock, take
):
    """--force: the holder's renewal fails at once, but nobody takes the lock before
    the revoked lease runs out; then the next holder gets a larger token."""
    lease_s = 3.0
    lease = take(lock, lease_s)
    before = row(pg_admin, schema, lock)
    forced = leaderrun(
        "release", "--schema", schema, "--lock-id", str(lock), "--force", dsn=pg_dsn
    )
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith(f"revoked {lock} from node1 (pid 1)")
    after = row(pg_admin, schema, lock)
    assert after["holder"] == REVOKED_HOLDER
    assert (after["token"], after["expires_at"]) == (lease.token, before["expires_at"])

    store = PostgresLeaseStore(pg_dsn, schema)
    session = store.connect()
    try:
        assert session.renew(lease, lease_s) is False  # the old holder: lost, now
        early = session.acquire(lock, claim(2), lease_s)
        assert early.lease is None  # not before the revoked lease runs out
        assert early.expires_in_s is not None
        assert early.expires_in_s > 0
        code, document = status_json(pg_dsn, schema, "--lock-id", str(lock))
        assert (code, document["locks"][0]["state"]) == (0, "revoked")
        repeat = leaderrun(
            "release", "--schema", schema, "--lock-id", str(lock), "--force", dsn=pg_dsn
        )
        assert (repeat.returncode, "already revoked" in repeat.stdout) == (0, True)
        time.sleep(early.expires_in_s + 0.1)
        later = session.acquire(lock, claim(2), lease_s)
    finally:
        session.close()
    assert later.lease is not None
    assert later.lease.token == lease.token + 1


def test_forced_release_with_a_stale_token_changes_nothing(
    pg_dsn, pg_admin, schema, lock, take
):
    """--token: the lock changed hands since status; the new holder is left alone."""
    lease = take(lock, LONG_LEASE_S)
    before = row(pg_admin, schema, lock)
    args = ("release", "--schema", schema, "--lock-id", str(lock), "--force")
    stale = leaderrun(*args, "--token", str(lease.token - 1), dsn=pg_dsn)
    assert stale.returncode == 75
    assert stale.stderr == (
        f"leaderrun: {lock} has fencing token {lease.token} now, not "
        f"{lease.token - 1}: it changed hands since; nothing released (check "
        "`leaderrun status` again)\n"
    )
    assert row(pg_admin, schema, lock) == before
    current = leaderrun(*args, "--token", str(lease.token), dsn=pg_dsn)
    assert current.returncode == 0, current.stderr
    assert row(pg_admin, schema, lock)["holder"] == REVOKED_HOLDER


def test_forced_release_of_an_expired_lease_frees_it(
    pg_dsn, pg_admin, schema, lock, take
):
    take(lock, SHORT_LEASE_S)
    time.sleep(SHORT_LEASE_S + 0.2)
    result = leaderrun(
        "release", "--schema", schema, "--lock-id", str(lock), "--force", dsn=pg_dsn
    )
    assert result.returncode == 0
    assert result.stdout.startswith(f"released {lock}")
    assert row(pg_admin, schema, lock)["holder"] is None


def test_release_needs_a_lock_id(pg_dsn):
    result = leaderrun("release", dsn=pg_dsn)
    assert result.returncode == 64
    assert result.stderr.startswith("leaderrun: no --lock-id given")


# --- init and a least-privileged role ---------------------------------------------


@pytest.fixture
def empty_schema(pg_admin: Admin) -> Iterator[str]:
    name = new_name("lr_init")
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with pg_admin() as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


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


def test_init_creates_once_and_repeats_harmlessly(pg_dsn, pg_admin, empty_schema):
    first = leaderrun("init", "--schema", empty_schema, dsn=pg_dsn)
    assert (first.returncode, first.stdout) == (0, f"{empty_schema}.{TABLE} created\n")
    second = leaderrun("init", "--schema", empty_schema, dsn=pg_dsn)
    assert (second.returncode, second.stdout) == (
        0,
        f"{empty_schema}.{TABLE} already exists and is up to date\n",
    )
    with pg_admin() as conn:
        indexes = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
            (empty_schema, TABLE),
        ).fetchall()
    assert len(indexes) == 1
    assert "UNIQUE INDEX" in indexes[0][0]
    assert "(lock_key)" in indexes[0][0]


def test_print_sql_needs_no_database_and_matches_setup_sql():
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
    result = leaderrun("init", "--print-sql", "--role", "", dsn="port=1")
    assert (result.returncode, result.stdout) == (64, "")
    assert result.stderr == (
        "leaderrun: --role '' must be a PostgreSQL role name of 1 to 63 bytes\n"
    )


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
        "--schema",
        empty_schema,
        "--lock-id",
        name,
        "--",
        "sh",
        "-c",
        "echo $LEADERRUN_FENCING_TOKEN",
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
    pg_dsn, pg_admin, empty_schema, app_role
):
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


def test_status_on_a_terminal_is_a_table_without_the_key(pg_dsn, schema, lock, take):
    """stdout a terminal: rich's table (state in colour), the 64-bit key left out."""
    import os
    import pty

    take(lock, LONG_LEASE_S)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "leaderrun", "status", "--schema", schema],
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            env={
                "PATH": "/usr/bin:/bin",
                "LEADERRUN_DSN": pg_dsn,
                "COLUMNS": "200",
                "TERM": "xterm",
            },
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
    assert line.split()[1:5] == ["held", "node1", "pid", "1"]
    assert str(lock.key) not in plain
