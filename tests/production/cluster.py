"""Production topologies for the tests: a real PgBouncer, and a primary with a standby.

PgBouncer refuses to run as root and initdb too, so when the suite runs as root
(CI does) both go through the same ``runuser -u postgres --`` prefix as the
session's cluster in tests/pg.py. Every file they use lives in a directory from
``tempfile.mkdtemp`` handed to that user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.pg import (
    LOOPBACK,
    PG_CTL_TIMEOUT_S,
    ClusterError,
    LocalPgCluster,
    _as_postgres_prefix,
    _free_port,
    find_bindir,
)

PGBOUNCER_START_TIMEOUT_S = 15.0
REPLICATION_TIMEOUT_S = 30.0


def pgbouncer_binary() -> str | None:
    """The pgbouncer program (Debian puts it in /usr/sbin, off a user's PATH)."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


class PgBouncer:
    """A PgBouncer on a free loopback port in front of ``host:port``.

    ``auth_type = trust`` with every user allowed: the tests are about pooling,
    not about PgBouncer's own authentication.
    """

    def __init__(self, host: str, port: int, pool_mode: str = "transaction") -> None:
        self.host = host
        self.server_port = port
        self.pool_mode = pool_mode
        self.root = Path(tempfile.mkdtemp(prefix="leaderrun-pgbouncer-"))
        self.port = 0
        self.as_postgres = _as_postgres_prefix()
        if self.as_postgres:
            shutil.chown(self.root, user="postgres")

    @property
    def logfile(self) -> Path:
        """PgBouncer's own log."""
        return self.root / "pgbouncer.log"

    def dsn(self, user: str = "postgres", dbname: str = "postgres") -> str:
        """A libpq connection string through this PgBouncer."""
        return f"host={LOOPBACK} port={self.port} dbname={dbname} user={user}"

    def start(self) -> None:
        """Write the configuration, start the daemon, wait until it accepts."""
        binary = pgbouncer_binary()
        if binary is None:
            raise ClusterError("pgbouncer is not installed (apt-get install pgbouncer)")
        self.port = _free_port()
        (self.root / "userlist.txt").write_text('"postgres" ""\n')
        config = self.root / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={self.host} port={self.server_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {LOOPBACK}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            # Fewer server connections than clients: the point of a pooler, and
            # what makes session state leak from one client to the next. Session
            # mode pins one per client, so there the tests' three jobs get three.
            f"default_pool_size = {3 if self.pool_mode == 'session' else 2}\n"
            "max_client_conn = 200\n"
            "server_reset_query =\n"
            "admin_users = postgres\n"
            f"logfile = {self.logfile}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
        )
        for path in self.root.iterdir():
            if self.as_postgres:
                shutil.chown(path, user="postgres")
        done = subprocess.run(
            [*self.as_postgres, binary, "-d", str(config)],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PGBOUNCER_START_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterError(
                f"pgbouncer failed ({done.returncode}): {done.stderr}{self._log()}"
            )
        deadline = time.monotonic() + PGBOUNCER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((LOOPBACK, self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise ClusterError(f"pgbouncer did not listen on {self.port}{self._log()}")

    def stop(self) -> None:
        """Stop the daemon and delete its files."""
        pidfile = self.root / "pgbouncer.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            deadline = time.monotonic() + PGBOUNCER_START_TIMEOUT_S
            while pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def show(self, what: str) -> list[tuple[object, ...]]:
        """Rows of a ``SHOW`` command on the admin console (``SHOW POOLS``...)."""
        with psycopg.connect(
            self.dsn(dbname="pgbouncer"), autocommit=True, prepare_threshold=None
        ) as conn:
            # The admin console speaks only the simple query protocol.
            cursor = conn.cursor()
            cursor.execute(f"SHOW {what}".encode(), prepare=False)
            return cursor.fetchall()

    def _log(self) -> str:
        try:
            return "\n" + self.logfile.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""


class ReplicatedPair:
    """A primary and a streaming standby made with ``pg_basebackup``, both local.

    Separate from the session's cluster, because the failover tests stop the
    primary for good.
    """

    def __init__(self) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise ClusterError("initdb, pg_ctl and pg_basebackup are not installed")
        self.primary = LocalPgCluster(bindir)
        self.standby = LocalPgCluster(bindir)
        self.synchronous = False

    def create(self, synchronous: bool) -> None:
        """initdb and start the primary; clone it; start the standby, streaming."""
        self.synchronous = synchronous
        self.primary.create()
        if synchronous:
            with self.connect(self.primary) as conn:
                # '*': whichever standby connects first is the synchronous one.
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("SELECT pg_reload_conf()")
        self.standby._pg(
            "pg_basebackup",
            "--pgdata",
            self.standby.datadir,
            "--host",
            LOOPBACK,
            "--port",
            str(self.primary.port),
            "--username",
            "postgres",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--write-recovery-conf",  # standby.signal and primary_conninfo
            "--no-sync",
        )
        self.standby.port = _free_port()
        self.standby.start()
        self.standby.dsn = (
            f"host={LOOPBACK} port={self.standby.port} dbname=postgres user=postgres"
        )
        expected = "sync" if synchronous else "async"
        self.wait_for(
            lambda: self.replication_state() == expected,
            f"standby streaming in {expected} mode",
        )

    def multi_host_dsn(self) -> str:
        """Both servers, primary first, as a failover-aware client would list them."""
        return (
            f"host={LOOPBACK},{LOOPBACK} "
            f"port={self.primary.port},{self.standby.port} "
            "dbname=postgres user=postgres target_session_attrs=read-write"
        )

    def replication_state(self) -> str | None:
        """The standby's sync_state on the primary, once it streams."""
        with self.connect(self.primary) as conn:
            row = conn.execute(
                "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
            ).fetchone()
        return None if row is None else str(row[0])

    def wait_caught_up(self) -> None:
        """Wait until the standby has replayed everything the primary wrote."""
        with self.connect(self.primary) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        target = row[0]

        def replayed() -> bool:
            with self.connect(self.standby) as conn:
                done = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
            return bool(done and done[0])

        self.wait_for(replayed, f"standby replayed up to {target}")

    def promote(self) -> None:
        """Make the standby a primary, and wait until it accepts writes."""
        self.standby._pg(
            "pg_ctl",
            "promote",
            "--wait",
            f"--timeout={PG_CTL_TIMEOUT_S}",
            "--pgdata",
            self.standby.datadir,
        )

    def destroy(self) -> None:
        """Stop both servers and delete their files."""
        try:
            self.standby.destroy()
        finally:
            self.primary.destroy()

    @staticmethod
    def connect(cluster: LocalPgCluster) -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit superuser connection to one of the two servers."""
        return psycopg.connect(
            f"host={LOOPBACK} port={cluster.port} dbname=postgres user=postgres",
            autocommit=True,
            connect_timeout=5,
            application_name="leaderrun-tests-admin",
        )

    @staticmethod
    def wait_for(check, what: str, timeout_s: float = REPLICATION_TIMEOUT_S) -> None:
        """Poll ``check`` until it is true, or raise naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise ClusterError(f"timed out waiting for: {what}")
