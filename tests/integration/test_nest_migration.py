"""docs/migrating-from-nest-leader-election.md: its recipe, run as written.

A fresh database gets nest-leader-election's table exactly as the library
creates it (its TypeORM entity and ``createLockTableIfNotExists``), in
``public``, and a NestJS replica's lease in it. leaderrun pointed at ``public``
must refuse it with the doc's message and touch nothing; the doc's blocks
(``migration-test: NAME``) then run unchanged but for the DSN, and both keep
their leader while the library's own statements (acquire, cleanup) run too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from leaderrun import LeaderElector
from tests.helpers.command import run

pytestmark = pytest.mark.pg

DOC = (
    Path(__file__).resolve().parents[2] / "docs/migrating-from-nest-leader-election.md"
)
DOC_DSN = "postgresql://app@db.internal/app"

# nest-leader-election 1.1.2, src/core/leader-elector.core.ts at db1c0c2
# (createLockTableIfNotExists; the TypeORM entity and migration have this shape).
SEED_DDL = """
CREATE TABLE IF NOT EXISTS public.leader_lease (
  id INT PRIMARY KEY,
  leader_id TEXT NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
  CHECK (expires_at > created_at)
);
CREATE INDEX IF NOT EXISTS leader_lease_expires ON public.leader_lease (expires_at);
"""
# The library's acquire-or-renew, run by every replica every tick; its cleanup
# job, run by every replica, for every lock id.
SEED_ACQUIRE = """
INSERT INTO public."leader_lease"("id","leader_id","expires_at","created_at")
VALUES (%s, %s, NOW() + INTERVAL '15000 ms', DEFAULT)
ON CONFLICT ("id") DO UPDATE SET "expires_at" = EXCLUDED."expires_at"
WHERE public."leader_lease".id = EXCLUDED.id
  AND public."leader_lease".leader_id = EXCLUDED.leader_id
RETURNING "created_at"
"""
SEED_CLEANUP = (
    """DELETE FROM leader_lease WHERE "expires_at" < NOW() - INTERVAL '5 seconds'"""
)
NEST_LOCK_ID = 12345
NEST_LEADER = "k3x9q2"  # the library's 6-character instanceId


def doc_block(name: str) -> str:
    """The fenced block under ``<!-- migration-test: NAME -->`` in the doc."""
    found = re.search(
        rf"<!-- migration-test: {name} -->\n```\w+\n(.*?)^```$",
        DOC.read_text(),
        re.MULTILINE | re.DOTALL,
    )
    assert found is not None, f"the doc has no migration-test block {name!r}"
    return found.group(1)


@pytest.fixture
def app_db(pg_admin, pg_dsn) -> Iterator[str]:
    """A new database with the library's table and a NestJS replica leading in it."""
    name = f"nest_{uuid.uuid4().hex[:10]}"
    with pg_admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(pg_dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SEED_DDL)
            assert nest_tick(conn, NEST_LEADER), "the NestJS replica leads"
        yield dsn
    finally:
        with pg_admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )


def nest_tick(conn: psycopg.Connection, leader_id: str) -> bool:
    """One tick of a NestJS replica: its acquire-or-renew, then its cleanup."""
    won = conn.execute(SEED_ACQUIRE, (NEST_LOCK_ID, leader_id)).fetchone()
    conn.execute(SEED_CLEANUP)
    return won is not None


def seed_rows(dsn: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, leader_id FROM public.leader_lease").fetchall()


def test_leaderrun_refuses_the_librarys_table_as_the_doc_says(app_db):
    """Exit 69 and the doc's one line; the library's table and lease are untouched."""
    done = run("--dsn", app_db, "--lock-id", "nightly-report", "--", "true")
    assert done.returncode == 69, done.stderr
    assert done.stderr.strip() == doc_block("refusal").strip()
    assert seed_rows(app_db) == [(NEST_LOCK_ID, NEST_LEADER)]
    with psycopg.connect(app_db) as conn:
        columns = conn.execute(
            "SELECT string_agg(column_name, ',' ORDER BY ordinal_position) "
            "FROM information_schema.columns WHERE table_name = 'leader_lease'"
        ).fetchone()
    assert columns == ("id,leader_id,expires_at,created_at",)


def test_the_library_api_refuses_it_in_its_own_terms(app_db):
    """LeaderElector does not lead on it, and its reason names its ``schema``
    parameter where the command line names ``--schema``."""
    elector = LeaderElector("nightly-report", dsn=app_db, lease_s=6)
    elector.poll()
    assert not elector.is_leader()
    expected = doc_block("refusal").strip().removeprefix("leaderrun: ")
    assert elector.last_error == expected.replace("pass --schema", "pass schema")
    assert seed_rows(app_db) == [(NEST_LOCK_ID, NEST_LEADER)]


def test_the_side_by_side_recipe_runs_and_both_keep_their_leader(app_db, tmp_path):
    """The doc's schema and shell blocks, as written; the NestJS leader stays, and
    the library's cleanup leaves leaderrun's row and token alone."""
    with psycopg.connect(app_db, autocommit=True) as conn:
        conn.execute(doc_block("schema"))
    report = tmp_path / "nightly-report.sh"
    report.write_text('#!/bin/sh\necho "report, token $LEADERRUN_FENCING_TOKEN"\n')
    report.chmod(0o755)
    recipe = doc_block("recipe")
    assert DOC_DSN in recipe
    env = {
        **os.environ,
        # The venv's leaderrun first, as an installed one would be.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    for round_ in (1, 2):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", recipe.replace(DOC_DSN, app_db)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # init says what it did first (created, then up to date); the job last.
        assert done.stdout.splitlines()[-1] == f"report, token {round_}"
        with psycopg.connect(app_db, autocommit=True) as conn:
            assert nest_tick(conn, NEST_LEADER), "the NestJS leader renews"
            assert not nest_tick(conn, "other1"), "and no other replica takes over"
    assert seed_rows(app_db) == [(NEST_LOCK_ID, NEST_LEADER)]
    with psycopg.connect(app_db) as conn:
        leaderrun_rows = conn.execute(
            "SELECT lock_name, token FROM leaderrun.leader_lease"
        ).fetchall()
    assert leaderrun_rows == [("nightly-report", 2)]
