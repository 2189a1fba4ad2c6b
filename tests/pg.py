"""The PostgreSQL server for the test suite: where it comes from, and its fixtures.

The first of these routes that applies wins (``choose_route`` decides):

1. ``--pg-dsn``, whose default is ``LEADERRUN_TEST_DSN``: an existing server, used
   as it is. It must answer; a DSN that was given but fails is an error, not a skip.
2. A throwaway cluster made for this session with the local ``initdb``/``pg_ctl``.
   It listens on TCP 127.0.0.1 on a free port, so that fault tests can put a proxy
   in front of it, and on a Unix socket in its own directory.
3. A container started with testcontainers, when a Docker-compatible engine
   answers (tests/pg_container.py); the image is ``LEADERRUN_TEST_PG_IMAGE``,
   by default ``postgres:16``.
4. Otherwise the tests that need the database skip, unless ``CI`` is set: there they
   fail, because a CI run whose database tests quietly skipped proves nothing.

``--pg-route local`` or ``container`` (``LEADERRUN_TEST_PG_ROUTE``) insists on one
route, and fails when it is not available: to test the container route on a
machine that also has the server programs.

Fixtures: ``pg_cluster``, ``pg_dsn`` and ``pg_admin`` (session), ``lock_name`` (per
test). A test that uses ``pg_dsn`` (directly or through another fixture) is marked
``pg`` automatically, so ``-m "not pg"`` deselects every database test.
"""

from __future__ import annotations

import enum
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import psycopg
import pytest
from psycopg.rows import TupleRow

if TYPE_CHECKING:
    from tests.pg_container import ContainerPgCluster

DSN_ENV = "LEADERRUN_TEST_DSN"
ROUTE_ENV = "LEADERRUN_TEST_PG_ROUTE"
NO_PG_MESSAGE = (
    f"no PostgreSQL: set {DSN_ENV}, install initdb/pg_ctl, or run a Docker engine"
)

LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT_S = 5
PG_CTL_TIMEOUT_S = 30
START_ATTEMPTS = 4  # a free port can be taken between the probe and postgres's bind

# What postgres logs when its TCP port is taken; only then is a new port worth a try.
_PORT_CLASH_LOG_LINES = ("could not bind", "could not create any TCP/IP sockets")

_CLUSTER_KEY = pytest.StashKey["PgCluster"]()
_CHOICE_KEY = pytest.StashKey["RouteChoice"]()


class ClusterError(Exception):
    """The local cluster could not be created, started or stopped."""


class PgCluster:
    """The session's PostgreSQL server, given by a DSN; it can't be restarted.

    ``host`` and ``port`` are what libpq actually used. ``datadir`` is None, which
    is how a test tells this server from a local one (see ``local``).
    """

    route = f"--pg-dsn / {DSN_ENV}"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.host = ""
        self.port = 0
        self.server_version = 0  # libpq's integer form: 150018 for 15.18
        self.datadir: Path | None = None
        self.socket_dir: Path | None = None
        self.as_postgres: list[str] = []
        self.has_pg_stat_statements = False

    @property
    def local(self) -> bool:
        """Whether this session owns the server, so tests may stop and restart it."""
        return self.datadir is not None

    @property
    def restartable(self) -> bool:
        """Whether ``stop``, ``start`` and ``restart`` work (not on an external one)."""
        return self.local

    def probe(self) -> None:
        """Connect once, to fail early and to learn the address and server version."""
        with psycopg.connect(self.dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            self.host = conn.info.host
            self.port = conn.info.port
            self.server_version = conn.info.server_version

    def start(self) -> None:
        """Start the server again after ``stop``; only a local cluster can."""
        raise ClusterError(f"can't start an external server ({self.route})")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; only a local cluster can."""
        raise ClusterError(f"can't stop an external server ({self.route})")

    def restart(self, mode: str = "fast") -> None:
        """Stop the server, then start it on the same address; only a local one can."""
        raise ClusterError(f"can't restart an external server ({self.route})")

    def summary(self) -> str:
        """Say in one line which server the session used."""
        version = _version_text(self.server_version)
        return f"{self.route}: PostgreSQL {version} at {self.host}:{self.port}"


class LocalPgCluster(PgCluster):
    """A throwaway cluster in a temporary directory, owned by this test session.

    initdb refuses to run as root, and CI runs as root, so then every server
    command goes through ``runuser -u postgres --`` (the ``as_postgres`` prefix).
    The directory comes from ``tempfile.mkdtemp`` and not from pytest's
    ``tmp_path_factory``, whose root is private to the user running pytest: the
    ``postgres`` user could not reach a data directory inside it.
    """

    route = "throwaway local cluster"

    def __init__(self, bindir: Path) -> None:
        root = Path(tempfile.mkdtemp(prefix="leaderrun-pg-"))
        super().__init__(dsn="")
        self.bindir = bindir
        self.root = root
        self.datadir: Path = root / "data"
        self.socket_dir: Path = root
        self.logfile = root / "postgres.log"
        self.host = LOOPBACK
        self.as_postgres = _as_postgres_prefix()
        self.has_pg_stat_statements = _has_pg_stat_statements(bindir)
        self.start_s = 0.0  # initdb and the first start, for the session summary
        self.stop_s = 0.0  # the final stop
        if self.as_postgres:
            shutil.chown(root, user="postgres")

    def create(self) -> None:
        """Run initdb, then start the server on a free port, retrying on a clash."""
        began = time.monotonic()
        self._pg(
            "initdb",
            "--pgdata",
            self.datadir,
            "--auth=trust",
            "--username=postgres",
            # Fixed, so a developer's locale can't give an SQL_ASCII database.
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a throwaway cluster needs no crash safety
            "--no-instructions",
        )
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            log_offset = self._log_size()
            try:
                self.start()
                break
            except ClusterError:
                if attempt == START_ATTEMPTS or not self._port_clashed(log_offset):
                    raise
        self.dsn = f"host={LOOPBACK} port={self.port} dbname=postgres user=postgres"
        self.start_s = time.monotonic() - began

    def start(self) -> None:
        """Start the server on ``self.port``, and wait until it accepts connections.

        The port does not change: a restarted server must be where clients and a
        test's proxy expect it.
        """
        options = [
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={LOOPBACK}",
            "-k",  # the Unix socket goes in our own directory, not /var/run
            str(self.root),
            "-F",  # fsync off: nothing here has to survive a power cut
            # Racing-start and fault tests open many connections at once.
            "-c",
            "max_connections=400",
        ]
        if self.has_pg_stat_statements:
            options += ["-c", "shared_preload_libraries=pg_stat_statements"]
        self._pg(
            "pg_ctl",
            "start",
            "--wait",
            f"--timeout={PG_CTL_TIMEOUT_S}",
            "--pgdata",
            self.datadir,
            "--log",
            self.logfile,
            "-o",
            shlex.join(options),
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` disconnects clients, ``immediate`` is a crash."""
        self._pg(
            "pg_ctl",
            "stop",
            "--wait",
            f"--timeout={PG_CTL_TIMEOUT_S}",
            "--pgdata",
            self.datadir,
            "--mode",
            mode,
        )

    def restart(self, mode: str = "fast") -> None:
        """Stop the server with ``mode``, then start it again on the same port."""
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        """Whether a server runs, or was left running by a failed or timed-out start."""
        return (self.datadir / "postmaster.pid").exists()

    def destroy(self) -> None:
        """Stop the server at once if it runs, and delete its files."""
        began = time.monotonic()
        try:
            if self.running:
                self.stop("immediate")
        finally:
            # Best effort: when the stop failed, its error is the one worth showing.
            shutil.rmtree(self.root, ignore_errors=True)
            self.stop_s = time.monotonic() - began

    def summary(self) -> str:
        """Say in one line which server the session used, and what it cost."""
        return (
            f"{self.route}: PostgreSQL {_version_text(self.server_version)} "
            f"on {LOOPBACK}:{self.port}, "
            f"initdb and start {self.start_s:.2f} s, stop {self.stop_s:.2f} s"
        )

    def _pg(self, program: str, *args: str | Path) -> None:
        """Run a server program as the owner of the cluster, or raise ClusterError."""
        argv = [*self.as_postgres, str(self.bindir / program), *map(str, args)]
        try:
            done = subprocess.run(
                argv,
                # As ``postgres``, the caller's cwd may be unreadable; ours is not.
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=PG_CTL_TIMEOUT_S * 2,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            message = f"{program} {args[0]} timed out{self._log_tail()}"
            raise ClusterError(message) from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise ClusterError(
                f"{shlex.join(argv)} failed with exit code {done.returncode}:\n"
                f"{output}{self._log_tail()}"
            )

    def _log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def _port_clashed(self, log_offset: int) -> bool:
        """Whether the last start failed because the TCP port was taken."""
        try:
            with self.logfile.open(errors="replace") as log:
                log.seek(log_offset)
                text = log.read()
        except FileNotFoundError:  # the server never got far enough to log
            return False
        return any(line in text for line in _PORT_CLASH_LOG_LINES)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- last lines of {self.logfile} ---\n{tail}"


def _as_postgres_prefix() -> list[str]:
    """The command prefix that runs server programs as a user initdb accepts."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def find_bindir() -> Path | None:
    """Return a directory with initdb, pg_ctl and postgres, or None if none is found."""
    candidates = []
    if initdb := shutil.which("initdb"):
        # PATH often holds symlinks; the real directory also has pg_config.
        candidates.append(Path(initdb).resolve().parent)
    # Debian and Ubuntu keep the server programs off PATH, one directory per version.
    debian = [
        d for d in Path("/usr/lib/postgresql").glob("*/bin") if d.parent.name.isdigit()
    ]
    candidates += sorted(
        debian, key=lambda bindir: int(bindir.parent.name), reverse=True
    )
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _has_pg_stat_statements(bindir: Path) -> bool:
    """Whether this server install has the pg_stat_statements library to preload.

    It is a contrib module, which some installs lack; preloading a missing library
    stops the server from starting, so look first.
    """
    libdirs = []
    pg_config = bindir / "pg_config"
    if pg_config.is_file():
        done = subprocess.run(
            [pg_config, "--pkglibdir"], capture_output=True, text=True, check=False
        )
        if done.returncode == 0:
            libdirs.append(Path(done.stdout.strip()))
    # pg_config may be missing (some distributions ship it in a -dev package):
    # then try the Debian layout and the one of a source build.
    libdirs += [bindir.parent / "lib", bindir.parent / "lib" / "postgresql"]
    return any((libdir / "pg_stat_statements.so").is_file() for libdir in libdirs)


def _postgres_user_exists() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


def _local_unavailable_reason() -> str | None:
    """Why no local cluster can be made here, or None if one can."""
    if find_bindir() is None:
        return "initdb, pg_ctl and postgres are not on PATH nor in /usr/lib/postgresql"
    if os.geteuid() == 0 and not _postgres_user_exists():
        return "initdb refuses to run as root, and there is no 'postgres' user to use"
    return None


def _free_port() -> int:
    """Return a TCP port on the loopback address that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


class Route(enum.Enum):
    """Where the session's PostgreSQL comes from; the value names it in the header."""

    DSN = f"--pg-dsn / {DSN_ENV}"
    LOCAL = "throwaway local cluster"
    CONTAINER = "testcontainers"
    NONE = "none"


ROUTE_CHOICES = ("auto", "local", "container")


@dataclass(frozen=True)
class RouteChoice:
    """The route the session takes, and for ``NONE`` why, and whether that fails."""

    route: Route
    reason: str = ""
    fail: bool = False  # NONE only: fail the database tests instead of skipping


def choose_route(
    *,
    dsn: str | None,
    local_problem: str | None,
    engine_problem: Callable[[], str | None],
    in_ci: bool,
    insist: str = "auto",
) -> RouteChoice:
    """Pick the session's PostgreSQL route from what this machine offers.

    ``local_problem`` and ``engine_problem()`` say why a route is out, or None;
    the engine is asked only when its answer matters, since asking costs a
    connection attempt. ``insist`` (``--pg-route``) names the only route to
    consider: its absence is then a failure, as a given DSN that fails is.
    """
    if dsn:
        return RouteChoice(Route.DSN)
    if insist != "container":
        if local_problem is None:
            return RouteChoice(Route.LOCAL)
        if insist == "local":
            return RouteChoice(Route.NONE, f"--pg-route local: {local_problem}", True)
    engine = engine_problem()
    if engine is None:
        return RouteChoice(Route.CONTAINER)
    if insist == "container":
        return RouteChoice(Route.NONE, f"--pg-route container: {engine}", True)
    return RouteChoice(Route.NONE, f"{local_problem}; {engine}", fail=in_ci)


def _session_route(config: pytest.Config) -> RouteChoice:
    """The session's route, chosen once: the header and the fixture must agree."""
    if (choice := config.stash.get(_CHOICE_KEY, None)) is None:
        from tests import pg_container  # testcontainers only when it may be used

        choice = choose_route(
            dsn=config.getoption("pg_dsn"),
            local_problem=_local_unavailable_reason(),
            engine_problem=pg_container.engine_problem,
            in_ci=_in_ci(),
            insist=config.getoption("pg_route"),
        )
        config.stash[_CHOICE_KEY] = choice
    return choice


def _version_text(server_version: int) -> str:
    """Turn libpq's integer version (150018) into PostgreSQL's own text (15.18)."""
    return f"{server_version // 10000}.{server_version % 10000}"


def _no_postgres(reason: str, *, fail: bool | None = None) -> NoReturn:
    """Skip the test for want of a database; fail it in CI, or when ``fail`` says so."""
    if _in_ci() if fail is None else fail:
        pytest.fail(
            f"{NO_PG_MESSAGE} ({reason}); with CI set or a --pg-route given, "
            "the database tests must run, not skip",
            pytrace=False,
        )
    pytest.skip(f"{NO_PG_MESSAGE} ({reason})")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("leaderrun")
    group.addoption(
        "--pg-dsn",
        metavar="DSN",
        default=os.environ.get(DSN_ENV),
        help=(
            "libpq connection string of a PostgreSQL server for the tests "
            f"(default: ${DSN_ENV}; without it, a throwaway local cluster)"
        ),
    )
    group.addoption(
        "--pg-route",
        choices=ROUTE_CHOICES,
        default=os.environ.get(ROUTE_ENV) or "auto",
        help=(
            "without a DSN, where PostgreSQL comes from: auto (local initdb/pg_ctl, "
            f"else a container), local, or container (default: ${ROUTE_ENV} or auto)"
        ),
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which PostgreSQL route the database tests will take, and its version."""
    choice = _session_route(config)
    if choice.route is Route.DSN:
        external = PgCluster(config.getoption("pg_dsn"))
        try:
            external.probe()
        except psycopg.Error as exc:
            return [f"postgresql: {external.route}, can't connect: {exc}".rstrip()]
        return [
            f"postgresql: {external.route}, PostgreSQL "
            f"{_version_text(external.server_version)} "
            f"at {external.host or 'the default socket'}:{external.port}"
        ]
    if choice.route is Route.CONTAINER:
        from tests import pg_container

        return [
            f"postgresql: {Route.CONTAINER.value}, image {pg_container.image()}; "
            "started on first use"
        ]
    if choice.route is Route.NONE:
        outcome = "fail" if choice.fail else "skip"
        return [f"postgresql: none ({choice.reason}); database tests will {outcome}"]
    bindir = find_bindir()
    assert bindir is not None  # the local route was chosen because it exists
    version = subprocess.run(
        [bindir / "postgres", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)": keep from "15.18" on.
    version = version.removeprefix("postgres (PostgreSQL) ")
    preload = (
        "pg_stat_statements preloaded"
        if _has_pg_stat_statements(bindir)
        else "no pg_stat_statements"
    )
    owner = ", run as the postgres user" if os.geteuid() == 0 else ""
    return [
        f"postgresql: {LocalPgCluster.route}, PostgreSQL {version} from {bindir}"
        f"{owner}, {preload}; started on first use"
    ]


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so that "not pg" sees the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``pg`` every test that uses the database, even when its module forgot."""
    for item in items:
        uses_pg = "pg_dsn" in getattr(item, "fixturenames", ())
        if uses_pg and item.get_closest_marker("pg") is None:
            item.add_marker(pytest.mark.pg)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Repeat which server the session used, once it is known, for CI logs."""
    if cluster := config.stash.get(_CLUSTER_KEY, None):
        terminalreporter.write_line(f"postgresql: {cluster.summary()}")


@pytest.fixture(scope="session")
def pg_cluster(pytestconfig: pytest.Config) -> Iterator[PgCluster]:
    """The session's PostgreSQL server: ``.dsn``, ``.host``, ``.port``, ``.datadir``.

    A local cluster or a container (``.restartable``) can also ``.stop(mode)``,
    ``.start()`` and ``.restart(mode)`` on the same port; a test that does so must
    leave it running. An external one raises ``ClusterError`` there. Only a
    local cluster's processes (``.local``) are ours to signal.
    """
    choice = _session_route(pytestconfig)
    if choice.route is Route.NONE:
        _no_postgres(choice.reason, fail=choice.fail)
    if choice.route is Route.DSN:
        external = PgCluster(pytestconfig.getoption("pg_dsn"))
        try:
            external.probe()
        except psycopg.Error as exc:
            pytest.fail(f"{external.route}: can't connect: {exc}", pytrace=False)
        pytestconfig.stash[_CLUSTER_KEY] = external
        yield external
        return

    cluster: LocalPgCluster | ContainerPgCluster
    if choice.route is Route.CONTAINER:
        from tests.pg_container import ContainerPgCluster, image

        cluster = ContainerPgCluster(image())
    else:
        bindir = find_bindir()
        assert bindir is not None  # the local route was chosen because it exists
        cluster = LocalPgCluster(bindir)
    pytestconfig.stash[_CLUSTER_KEY] = cluster
    try:
        try:
            cluster.create()
            cluster.probe()
        except (ClusterError, psycopg.Error) as exc:
            pytest.fail(f"{cluster.route}: {exc}", pytrace=False)
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_dsn(pg_cluster: PgCluster) -> str:
    """A libpq connection string for the session's server, as its superuser."""
    return pg_cluster.dsn


@pytest.fixture(scope="session")
def pg_admin(pg_dsn: str) -> Callable[[], psycopg.Connection[TupleRow]]:
    """A function that opens a new autocommit superuser connection.

    Use it as ``with pg_admin() as conn:``; the connection closes at the end of the
    block. Its ``application_name`` tells it apart from leaderrun's own sessions, so
    a test can ``pg_terminate_backend()`` those and not itself.
    """

    def connect() -> psycopg.Connection[TupleRow]:
        return psycopg.connect(
            pg_dsn,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="leaderrun-tests-admin",
        )

    return connect


@pytest.fixture
def lock_name() -> str:
    """A lock name no other test uses, so tests share the server and need no cleanup."""
    return f"test-{uuid.uuid4().hex[:12]}"
