"""Fixtures for the production topologies: PgBouncer pools, a replicated pair, roles.

Every test module here is marked ``production`` (and ``pg``, ``slow``):
``-m production`` runs just these, ``-m "not production"`` leaves them out. Like
the database tests, they fail rather than skip under CI when a component
(pgbouncer, pg_basebackup) is missing.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from leaderrun.stores.postgres_sql import OPERATOR_PRIVILEGES, RUN_PRIVILEGES
from tests.acceptance.conftest import Leaderrun
from tests.pg import ClusterError, PgCluster, _no_postgres
from tests.production.cluster import PgBouncer, ReplicatedPair, pgbouncer_binary


@pytest.fixture(scope="session")
def pgbouncers(pg_cluster: PgCluster) -> Iterator[Callable[[str], PgBouncer]]:
    """A function returning the session's PgBouncer for a pool mode, started once."""
    if pgbouncer_binary() is None:
        _no_postgres("pgbouncer is not installed (apt-get install pgbouncer)")
    started: dict[str, PgBouncer] = {}

    def get(pool_mode: str) -> PgBouncer:
        if pool_mode not in started:
            bouncer = PgBouncer(pg_cluster.host, pg_cluster.port, pool_mode)
            started[pool_mode] = bouncer
            try:
                bouncer.start()
            except ClusterError as exc:
                pytest.fail(f"pgbouncer: {exc}", pytrace=False)
        return started[pool_mode]

    yield get
    for bouncer in started.values():
        bouncer.stop()


@pytest.fixture
def bouncer(pgbouncers: Callable[[str], PgBouncer]) -> PgBouncer:
    """The session's PgBouncer in transaction pooling mode."""
    return pgbouncers("transaction")


@pytest.fixture
def through_bouncer(bouncer: PgBouncer, lock_name: str) -> Iterator[Leaderrun]:
    """leaderrun processes on this test's lock, connected through PgBouncer."""
    runner = Leaderrun(bouncer.dsn(), lock_name)
    yield runner
    runner.kill_all()


@pytest.fixture(params=["async", "sync"])
def pair(request: pytest.FixtureRequest) -> Iterator[ReplicatedPair]:
    """A fresh primary with a streaming standby, asynchronous or synchronous."""
    try:
        made = ReplicatedPair()
    except ClusterError as exc:
        _no_postgres(str(exc))
    try:
        made.create(synchronous=request.param == "sync")
    except (ClusterError, psycopg.Error) as exc:
        made.destroy()
        pytest.fail(f"replicated pair: {exc}", pytrace=False)
    yield made
    made.destroy()


@pytest.fixture
def make_role(pg_admin) -> Iterator[Callable[..., str]]:
    """A function that creates a login role (dropped at teardown) and returns its name.

    ``make_role(grants=[...], settings={...}, password=None)``: each grant is run
    with ``{role}`` filled in; each setting becomes ``ALTER ROLE ... SET``.
    """
    made: list[str] = []

    def make(
        grants: list[str] = (),  # type: ignore[assignment]
        settings: dict[str, str] | None = None,
        password: str | None = None,
    ) -> str:
        role = f"lr_{uuid.uuid4().hex[:10]}"
        with pg_admin() as conn:
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
            made.append(role)
            if password is not None:
                conn.execute(
                    psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        psycopg.sql.Identifier(role), psycopg.sql.Literal(password)
                    )
                )
            for grant in grants:
                conn.execute(grant.format(role=f'"{role}"'))
            for name, value in (settings or {}).items():
                conn.execute(
                    psycopg.sql.SQL("ALTER ROLE {} SET {} = {}").format(
                        psycopg.sql.Identifier(role),
                        psycopg.sql.Identifier(name),
                        psycopg.sql.Literal(value),
                    )
                )
        return role

    yield make
    with pg_admin() as conn:
        for role in made:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')


class Operator:
    """A schema with the lease table, and a way to make roles that use it."""

    def __init__(self, pg_dsn: str, schema: str, make_role: Callable[..., str]) -> None:
        self.pg_dsn = pg_dsn
        self.schema = schema
        self._make_role = make_role

    def grants(self) -> list[str]:
        """Exactly the grants the README and ``init --print-sql`` give an operator."""
        table = f'"{self.schema}".leader_lease'
        runs = f'"{self.schema}".leader_run'
        return [
            f'GRANT USAGE ON SCHEMA "{self.schema}" TO {{role}}',
            f"GRANT {', '.join(OPERATOR_PRIVILEGES)} ON {table} TO {{role}}",
            f"GRANT {', '.join(RUN_PRIVILEGES)} ON {runs} TO {{role}}",
        ]

    def role(self, grants: list[str] | None = None, **settings: str) -> str:
        """A new login role: the operator grants unless told otherwise, and settings."""
        return self._make_role(
            grants=self.grants() if grants is None else grants, settings=settings
        )

    def dsn(self, role: str, base: str | None = None) -> str:
        """The test server's DSN (or ``base``), connecting as ``role``."""
        return make_conninfo(base or self.pg_dsn, user=role)

    def leaderrun(self, role: str, lock: str) -> Leaderrun:
        """A factory of leaderrun processes as ``role`` on this schema's table."""
        return SchemaLeaderrun(self.dsn(role), lock, self.schema)


class SchemaLeaderrun(Leaderrun):
    """leaderrun with ``--schema`` set."""

    def __init__(self, dsn: str, lock: str, schema: str) -> None:
        super().__init__(dsn, lock)
        self.schema = schema

    def argv(self, *args: str, lock: str | None = None) -> list[str]:
        """As Leaderrun's, with ``--schema`` before ``args``."""
        return super().argv("--schema", self.schema, *args, lock=lock)


@pytest.fixture
def operator(pg_dsn, pg_admin, make_role) -> Iterator[Operator]:
    """A fresh schema holding the lease table, made by the superuser."""
    schema = f"lr_{uuid.uuid4().hex[:10]}"
    with pg_admin() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "leaderrun",
            "init",
            "--dsn",
            pg_dsn,
            "--schema",
            schema,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    yield Operator(pg_dsn, schema, make_role)
    with pg_admin() as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
