"""The SQLite file's format: an older leaderrun's file is upgraded by init only,
a newer one and a stranger's are refused, and nothing leaderrun did not create is
ever altered. Real files, and the real command where the path is the behaviour."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from leaderrun.clock import boottime
from leaderrun.errors import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ConfigError,
    SchemaMissingError,
)
from leaderrun.lease import parse_lock_id
from leaderrun.stores.sqlite import APPLICATION_ID, FORMAT, SqliteLeaseStore
from tests.helpers import command
from tests.helpers import sqlite_format0 as format0
from tests.helpers.sqlite_clocks import SetClock
from tests.stores import claim

pytestmark = pytest.mark.slow

LIVE = parse_lock_id("live")
EXPIRED = parse_lock_id("expired")
FREE = parse_lock_id("free")
LIVE_FOR_S = 120.0


def old_rows() -> list[format0.Row]:
    """A live lease, an expired one and a released one, as format 0 kept them."""
    return [
        format0.Row(LIVE.key, "live", "old-host:4242:abc", 7, 600, 5, LIVE_FOR_S),
        format0.Row(EXPIRED.key, "expired", "old-host:1:def", 3, 900, 300, -290),
        format0.Row(FREE.key, "free", None, 2, 1200, 1100, -1100),
    ]


def leaderrun(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun ARGS`` on the file ``db`` to completion."""
    return command.leaderrun(*args, dsn=f"sqlite://{db}")


SUBCOMMANDS = {
    "run": ("--lock-id", "live", "--", "touch", "{marker}"),
    "status": ("status",),
    "release": ("release", "--lock-id", "expired"),
    "history": ("history",),
}
"""Every way into the file, with arguments; ``{marker}`` is a file the job touches."""


def every_subcommand(
    db: Path, marker: Path
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run each subcommand on the file; their results, by name."""
    return {
        name: leaderrun(*(a.replace("{marker}", str(marker)) for a in args), db=db)
        for name, args in SUBCOMMANDS.items()
    }


def assert_refused_untouched(
    db: Path, tmp_path: Path, code: int, message: str, *, init_too: bool = True
) -> None:
    """Every subcommand (and ``init``) exits ``code`` with the one line ``message``;
    the job never runs and the file is left exactly as it was."""
    before = fingerprint(db)
    marker = tmp_path / "ran"
    results = every_subcommand(db, marker)
    if init_too:
        results["init"] = leaderrun("init", db=db)
    for name, result in results.items():
        assert result.returncode == code, (name, result.stderr)
        assert result.stderr == f"leaderrun: {message}\n", name
    assert not marker.exists()
    assert fingerprint(db) == before


def fingerprint(db: Path) -> tuple[list[Any], list[Any], tuple[Any, ...]]:
    """Everything a refusal must leave as it was: schema, rows, header, journal."""
    with sqlite3.connect(db) as conn:
        schema = conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall()
        rows = [
            conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()
            for _, name, _ in schema
            if _ == "table"
        ]
        header = conn.execute(
            "SELECT * FROM pragma_application_id, pragma_user_version,"
            " pragma_journal_mode"
        ).fetchone()
    return schema, rows, header


def schema_of(db: Path) -> list[tuple[str, str]]:
    """The tables' names and DDL."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"
        ).fetchall()


# --- an older leaderrun's file -------------------------------------------------------


def test_an_older_file_is_refused_on_every_subcommand_and_left_as_it_was(tmp_path):
    """run, status, release and history refuse a format-0 file in one line that
    says to run init; the job does not run and the file is not touched."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    assert_refused_untouched(
        db,
        tmp_path,
        EXIT_UNAVAILABLE,
        f"{db} was written by an older leaderrun (file format 0, this one uses"
        f" {FORMAT}); run `leaderrun init --dsn sqlite://{db}` to upgrade it (live"
        " leases stay live)",
        init_too=False,
    )


def test_init_upgrades_an_older_file_and_its_live_lease_stays_live(tmp_path):
    """After `init`, the live lease is still held by its holder with the time it
    had left, the expired one is free to take with the next token, and the
    history is kept."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    upgraded = leaderrun("init", db=db)
    assert upgraded.returncode == 0, upgraded.stderr
    assert (
        upgraded.stdout == f"leader_lease in {db} upgraded to this version's format\n"
    )
    assert upgraded.stderr == (
        f"leaderrun: upgraded {db} to file format 1 (lease times on CLOCK_BOOTTIME,"
        " not the wall clock): 1 live lease(s) converted to the boot clock\n"
        f"leaderrun: upgraded {db} to file format 2 (the lease row records the"
        " cadence of its last slotted run): the lease table records each lock's"
        " cadence\n"
        f"leaderrun: upgraded {db} to file format 3 (run counters and the last"
        " success in the lease row, output in the run): runs are counted by"
        " outcome from now on\n"
    )

    store = SqliteLeaseStore(db)
    (live,) = store.snapshot(LIVE).records
    snapshot = store.snapshot(LIVE)
    left_s = (live.expires_at - snapshot.db_now).total_seconds()
    assert (live.holder, live.token) == ("old-host:4242:abc", 7)
    assert LIVE_FOR_S - 30 < left_s <= LIVE_FOR_S
    session = store.connect()
    try:
        refused = session.acquire(LIVE, claim(1), 30.0)
        assert refused.lease is None
        assert refused.holder == "old-host:4242:abc"
        assert refused.expires_in_s is not None
        assert LIVE_FOR_S - 30 < refused.expires_in_s <= LIVE_FOR_S
        taken = session.acquire(EXPIRED, claim(1), 30.0).lease
        freed = session.acquire(FREE, claim(2), 30.0).lease
    finally:
        session.close()
    assert taken is not None
    assert taken.token == 4
    assert freed is not None
    assert freed.token == 3
    assert {run.lock for run in store.history()} == {"live", "expired", "free"}
    assert fingerprint(db)[2][:2] == (APPLICATION_ID, FORMAT)
    again = leaderrun("init", db=db)
    assert (again.returncode, again.stderr) == (0, "")


def test_the_upgrade_converts_every_time_at_the_instant_of_the_upgrade(tmp_path):
    """Each wall-clock time becomes this boot's clock plus what it was from now,
    so the time a lease has left is exactly kept; the wall times stay for show."""
    db = tmp_path / "leases.db"
    unix_s = 1_800_000_000.0
    format0.make_file(db, old_rows(), now_s=unix_s)
    clock = SetClock("895cc76a-b98d-4110-abf7-5b27b41054c2", 5000.0, unix_s)
    SqliteLeaseStore(db, clock=clock).init()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT lock_name, holder, token, boot_id, acquired_boot_s,"
            " expires_boot_s, acquired_unix_s, renewed_unix_s"
            " FROM leader_lease ORDER BY token DESC"
        ).fetchall()
    assert rows == [
        ("live", "old-host:4242:abc", 7, clock.boot_id, 4400.0, 5120.0, unix_s - 600,
         unix_s - 5),
        ("expired", "old-host:1:def", 3, clock.boot_id, 4100.0, 4710.0, unix_s - 900,
         unix_s - 300),
        ("free", None, 2, clock.boot_id, 3800.0, 3900.0, unix_s - 1200,
         unix_s - 1100),
    ]  # fmt: skip


def test_an_upgraded_file_has_the_schema_of_a_new_one(tmp_path):
    """The upgrade rebuilds the table rather than patching it: no drift."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    format0.make_file(old, old_rows(), now_s=time.time())
    SqliteLeaseStore(old).init()
    SqliteLeaseStore(new).init()
    assert schema_of(old) == schema_of(new)


def test_the_first_release_s_file_upgrades_too(tmp_path):
    """A file of the first release (no --once-per columns, no history) upgrades,
    and gets the history table."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time(), first_release=True)
    SqliteLeaseStore(db).init()
    assert schema_of(db) == schema_of(make_new(tmp_path / "new.db"))
    assert SqliteLeaseStore(db).snapshot(LIVE).records[0].token == 7


def make_new(db: Path) -> Path:
    SqliteLeaseStore(db).init()
    return db


@pytest.mark.parametrize("statement", sorted(format0.STATEMENTS))
def test_an_older_leaderrun_still_running_fails_loudly_on_an_upgraded_file(
    tmp_path, statement
):
    """Every lease statement of a format-0 leaderrun errors on the upgraded file
    (its columns are gone), so it can never read boot seconds as Unix time."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    SqliteLeaseStore(db).init()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match=r"no such column|no column"):
            conn.execute(format0.STATEMENTS[statement], format0.PARAMS).fetchall()
    finally:
        conn.close()


def test_an_older_leaderrun_creates_nothing_in_a_new_file(tmp_path):
    """Its CREATE TABLE IF NOT EXISTS meets leaderrun's tables and does nothing."""
    db = make_new(tmp_path / "leases.db")
    before = schema_of(db)
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute(format0.LEASE_DDL)
        conn.execute(format0.RUN_DDL)
    assert schema_of(db) == before


# --- a newer leaderrun's file, and files that are not leaderrun's ---------------------


def test_a_newer_file_is_refused_everywhere_and_left_as_it_was(tmp_path):
    """A format this version does not know is refused by every subcommand and by
    init, saying to upgrade leaderrun."""
    db = make_new(tmp_path / "leases.db")
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {FORMAT + 1}")
    assert_refused_untouched(
        db,
        tmp_path,
        EXIT_UNAVAILABLE,
        f"{db} was written by a newer leaderrun (file format {FORMAT + 1}, this one"
        f" knows up to {FORMAT}); upgrade leaderrun on this host",
    )


SEED_TABLE = """
CREATE TABLE leader_lease (
    id INTEGER PRIMARY KEY,
    leader_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
)"""
"""The NestJS seed library's table: the same name, another shape."""


def test_a_foreign_leader_lease_table_is_refused_and_never_altered(tmp_path):
    """Another library's leader_lease: every subcommand, init included, exits 64
    naming what was found and to use another file; schema, rows, header and
    journal mode stay as they were."""
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute(SEED_TABLE)
        conn.execute("INSERT INTO leader_lease VALUES (1, 'pod-a', 1, 0)")
    assert_refused_untouched(
        db,
        tmp_path,
        EXIT_USAGE,
        f"{db} is not leaderrun's: a leader_lease table with columns id, leader_id,"
        " expires_at, created_at; leaderrun never alters what it did not create, so"
        " give it a file of its own, e.g. --dsn sqlite:///var/lib/leaderrun/leases.db",
    )
    assert fingerprint(db)[2][2] == "delete"  # not switched to WAL either


def test_a_foreign_leader_run_table_is_refused(tmp_path):
    """A leader_run that is not leaderrun's history is refused just the same."""
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE leader_run (id INTEGER PRIMARY KEY, job TEXT)")
    before = fingerprint(db)
    with pytest.raises(ConfigError, match="a leader_run table with columns id, job"):
        SqliteLeaseStore(db).connect()
    assert fingerprint(db) == before


@pytest.mark.parametrize(
    ("pragma", "found"),
    [
        ("user_version = 5", "its PRAGMA user_version is 5"),
        ("application_id = 1234", "its PRAGMA application_id is 1234"),
    ],
)
def test_another_application_s_database_is_refused(tmp_path, pragma, found):
    """A file another program has numbered or claimed is not stamped over."""
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
        conn.execute(f"PRAGMA {pragma}")
    before = fingerprint(db)
    for attempt in (SqliteLeaseStore(db).connect, SqliteLeaseStore(db).init):
        with pytest.raises(ConfigError, match=found):
            attempt()
    assert fingerprint(db) == before


def test_leaderrun_s_tables_go_beside_other_tables_left_untouched(tmp_path):
    """An unnumbered file with other tables gets leaderrun's beside them."""
    db = tmp_path / "shared.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes VALUES (1, 'keep me')")
    session = SqliteLeaseStore(db).connect()
    try:
        assert session.acquire(LIVE, claim(1), 30.0).lease is not None
    finally:
        session.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT * FROM notes").fetchall() == [(1, "keep me")]
        assert conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'notes'"
        ).fetchone() == ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",)


def test_without_create_an_older_file_still_names_init(tmp_path):
    """status and release (create off) refuse an older file the same way."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    with pytest.raises(SchemaMissingError, match="run `leaderrun init --dsn"):
        SqliteLeaseStore(db, create=False).connect()


def test_a_lease_of_another_boot_in_an_upgraded_file_is_expired(tmp_path):
    """Upgraded in an earlier boot, a lease that was live then is free now, and
    its token still grows."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    earlier = SetClock("00000000-0000-4000-8000-000000000000", 9e5, time.time())
    SqliteLeaseStore(db, clock=earlier).init()
    session = SqliteLeaseStore(db).connect()
    try:
        taken = session.acquire(LIVE, claim(1), 30.0).lease
    finally:
        session.close()
    assert taken is not None
    assert taken.token == 8


def test_two_inits_racing_upgrade_once(tmp_path):
    """Two inits at once: one upgrades, the other finds it done; both succeed."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "leaderrun", "init", "--dsn", f"sqlite://{db}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [(proc.wait(60), proc.communicate()[1]) for proc in procs]
    assert [code for code, _ in outcomes] == [0, 0]
    assert sum("upgraded" in stderr for _, stderr in outcomes) == 1
    assert SqliteLeaseStore(db).snapshot(LIVE).records[0].token == 7


def test_a_stamped_file_with_a_tampered_table_is_refused(tmp_path):
    """A leaderrun file whose lease table was replaced by hand is not trusted."""
    db = make_new(tmp_path / "leases.db")
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE leader_lease")
        conn.execute(SEED_TABLE)
    with pytest.raises(ConfigError, match="a leader_lease table with columns id"):
        SqliteLeaseStore(db).connect()


def test_a_new_file_is_stamped_with_this_format(tmp_path):
    """First use writes the application id and this format into the header."""
    db = make_new(tmp_path / "leases.db")
    assert fingerprint(db)[2] == (APPLICATION_ID, FORMAT, "wal")


def test_upgraded_status_and_release_work_on_the_boot_clock(tmp_path):
    """After the upgrade, operators see the live lease held and the expired one
    released by a plain release."""
    db = tmp_path / "leases.db"
    format0.make_file(db, old_rows(), now_s=time.time())
    SqliteLeaseStore(db).init()
    status = leaderrun("status", "--lock-id", "live", db=db)
    assert status.returncode == 0, status.stderr
    released = leaderrun("release", "--lock-id", "expired", db=db)
    assert released.returncode == 0, released.stderr
    with sqlite3.connect(db) as conn:
        (holder, boot_s) = conn.execute(
            "SELECT holder, expires_boot_s FROM leader_lease WHERE lock_name = 'live'"
        ).fetchone()
    assert holder == "old-host:4242:abc"
    assert boot_s > boottime() + LIVE_FOR_S - 30
