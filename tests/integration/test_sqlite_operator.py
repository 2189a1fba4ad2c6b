"""status, release and init on a SQLite file: the real command on a real file.

The PostgreSQL twin is ``test_operator.py``; both stores decide a release with
the same ``store.release_outcome``, so this checks the SQLite SQL under it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from leaderrun.lease import Lease, LockId, parse_lock_id
from leaderrun.stores.base import REVOKED_HOLDER, Claim
from leaderrun.stores.sqlite import SqliteLeaseStore

pytestmark = pytest.mark.slow

SHORT_LEASE_S = 0.5
LONG_LEASE_S = 300.0


def leaderrun(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun ARGS --dsn sqlite://DB`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "leaderrun", *args, "--dsn", f"sqlite://{db}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def claim(n: int) -> Claim:
    return Claim(holder=f"node{n}:{n}:nonce", host=f"node{n}", pid=n, command="job")


def take(db: Path, lock: LockId, lease_s: float, n: int = 1) -> Lease:
    session = SqliteLeaseStore(db).connect()
    try:
        result = session.acquire(lock, claim(n), lease_s)
    finally:
        session.close()
    assert result.lease is not None, result
    return result.lease


def row(db: Path, lock: LockId) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute(
            "SELECT holder, token, expires_boot_s FROM leader_lease WHERE lock_key = ?",
            (lock.key,),
        ).fetchone()
    assert found is not None
    return dict(found)


def status_json(db: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = leaderrun("status", "--json", *args, db=db)
    assert result.stderr == ""
    return result.returncode, json.loads(result.stdout)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "leases.db"
    SqliteLeaseStore(path).init()
    return path


@pytest.fixture
def lock() -> LockId:
    return parse_lock_id("nightly-backup")


def test_status_shows_held_expired_free_and_unknown_locks(db, lock):
    """Each state, its exit code, and times from the host clock."""
    lease = take(db, lock, LONG_LEASE_S)
    code, document = status_json(db, "--lock-id", str(lock))
    assert code == 0
    (entry,) = document["locks"]
    assert (entry["state"], entry["holder"], entry["token"]) == (
        "held",
        "node1:1:nonce",
        lease.token,
    )
    assert LONG_LEASE_S - 30 < entry["expires_in_s"] <= LONG_LEASE_S
    assert document["database_time"].endswith("Z")

    short = parse_lock_id("short")
    take(db, short, SHORT_LEASE_S)
    time.sleep(SHORT_LEASE_S + 0.2)
    code, document = status_json(db, "--lock-id", "short")
    assert code == 3
    assert document["locks"][0]["state"] == "expired"
    assert document["locks"][0]["expires_in_s"] < 0

    code, document = status_json(db, "--lock-id", "never-taken")
    assert code == 3
    assert document["locks"][0]["token"] is None

    code, document = status_json(db)
    assert code == 0
    assert [entry["lock"] for entry in document["locks"]] == [str(lock), "short"]


def test_status_and_release_without_the_file_say_to_run_init(tmp_path):
    """No file: exit 69 naming `leaderrun init`; no file is created by looking."""
    missing = tmp_path / "missing.db"
    for args in (["status"], ["release", "--lock-id", "x"]):
        result = leaderrun(*args, db=missing)
        assert result.returncode == 69
        assert result.stderr == (
            f"leaderrun: {missing} has no leader_lease table; run `leaderrun init "
            f"--dsn sqlite://{missing}` (or any leaderrun run with it) first\n"
        )
    assert not missing.exists()


def test_release_refuses_a_live_lease_and_frees_an_expired_one(db, lock):
    """Live: 75, untouched. Expired: freed, token kept; the next holder gets + 1."""
    take(db, lock, LONG_LEASE_S)
    before = row(db, lock)
    refused = leaderrun("release", "--lock-id", str(lock), db=db)
    assert refused.returncode == 75
    assert "is held by node1 (pid 1) (fencing token 1)" in refused.stderr
    assert row(db, lock) == before

    other = parse_lock_id("other")
    lease = take(db, other, SHORT_LEASE_S)
    time.sleep(SHORT_LEASE_S + 0.2)
    freed = leaderrun("release", "--lock-id", "other", db=db)
    assert freed.returncode == 0, freed.stderr
    assert freed.stdout.startswith("released other: the lease of node1 (pid 1)")
    assert (row(db, other)["holder"], row(db, other)["token"]) == (None, lease.token)
    again = leaderrun("release", "--lock-id", "other", db=db)
    assert (again.returncode, "already free" in again.stderr) == (3, True)
    assert take(db, other, LONG_LEASE_S, 2).token == lease.token + 1


def test_forced_release_revokes_without_handing_over_early(db, lock):
    """--force: the old holder's renewal fails at once; nobody takes the lock
    before the revoked lease runs out; then the next holder gets a larger token."""
    lease_s = 2.0
    lease = take(db, lock, lease_s)
    before = row(db, lock)
    stale = leaderrun(
        "release", "--lock-id", str(lock), "--force", "--token", "99", db=db
    )
    assert stale.returncode == 75
    assert row(db, lock) == before
    forced = leaderrun("release", "--lock-id", str(lock), "--force", db=db)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith(f"revoked {lock} from node1 (pid 1)")
    after = row(db, lock)
    assert after == {**before, "holder": REVOKED_HOLDER}

    session = SqliteLeaseStore(db).connect()
    try:
        assert session.renew(lease, lease_s) is False
        early = session.acquire(lock, claim(2), lease_s)
        assert early.lease is None
        assert early.expires_in_s is not None
        assert early.expires_in_s > 0
        code, document = status_json(db, "--lock-id", str(lock))
        assert (code, document["locks"][0]["state"]) == (0, "revoked")
        time.sleep(early.expires_in_s + 0.1)
        later = session.acquire(lock, claim(2), lease_s)
    finally:
        session.close()
    assert later.lease is not None
    assert later.lease.token == lease.token + 1


def test_init_reports_created_then_already_exists(tmp_path):
    """init makes the file and table once; a second init changes nothing."""
    path = tmp_path / "new.db"
    first = leaderrun("init", db=path)
    assert (first.returncode, first.stdout) == (
        0,
        f"leader_lease in {path} created\n",
    )
    second = leaderrun("init", db=path)
    assert second.stdout == f"leader_lease in {path} already exists and is up to date\n"


def test_print_sql_makes_a_file_the_store_can_use(tmp_path, lock):
    """The SQL that `init --print-sql` prints, run by hand, gives a working file."""
    path = tmp_path / "by-hand.db"
    printed = leaderrun("init", "--print-sql", db=path)
    assert printed.returncode == 0
    assert not path.exists()  # printing touches nothing
    with sqlite3.connect(path) as conn:
        conn.executescript(printed.stdout)
    store = SqliteLeaseStore(path, create=False)
    assert take(path, lock, LONG_LEASE_S).token == 1
    assert store.snapshot(lock).records[0].holder == "node1:1:nonce"
