"""The container route of tests/pg.py: PostgreSQL in a container (testcontainers).

For a developer with Docker (or Podman's Docker-compatible socket) and no
PostgreSQL server programs, the usual macOS and Windows/WSL set-up. testcontainers
is imported only when this route is considered, so that the other routes never
pay for docker-py's import or an engine's answer.

The container publishes PostgreSQL on a host port chosen here, not on a random
one, because a restarted container must come back where clients and the fault
tests' proxies expect it (as the local cluster does). Its ``pg_hba`` trusts every
connection (``POSTGRES_HOST_AUTH_METHOD=trust``), like the local cluster's
``initdb --auth=trust``, so tests may log in as roles they create without passwords.
"""

from __future__ import annotations

import gc
import os
import signal
import time
import warnings
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from tests.pg import (
    LOOPBACK,
    PG_CTL_TIMEOUT_S,
    START_ATTEMPTS,
    ClusterError,
    PgCluster,
    _free_port,
    _version_text,
)

if TYPE_CHECKING:
    from collections.abc import Callable

IMAGE_ENV = "LEADERRUN_TEST_PG_IMAGE"
DEFAULT_IMAGE = "postgres:16"
ENGINE_PING_TIMEOUT_S = 5
CONTAINER_PORT = 5432

# What pg_ctl's modes send to the postmaster; a container's postmaster is its
# PID 1, which the engine signals for us (``docker kill --signal``).
STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}

# The same server settings as the local cluster's start (tests/pg.py): many
# connections for the racing and fault tests, and no fsync for a throwaway.
POSTGRES_ARGS = "-c max_connections=400 -c fsync=off"


def image() -> str:
    """The PostgreSQL image to run: ``$LEADERRUN_TEST_PG_IMAGE``, else postgres:16."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def engine_problem() -> str | None:
    """Why no container can be started here, or None if an engine answers."""
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError:
        return "testcontainers is not installed (pip install -e '.[test]')"
    with warnings.catch_warnings():
        # docker-py does not close a socket whose connect failed: collect it here,
        # quietly, rather than let filterwarnings=error fail a test at random.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = DockerClient(timeout=ENGINE_PING_TIMEOUT_S).client
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # docker-py raises many types for "no engine here"
            return f"no container engine answers ({_first_line(exc)})"
        finally:
            gc.collect()
    return None


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


class Container(Protocol):
    """What this module uses of testcontainers' ``PostgresContainer``."""

    def with_env(self, key: str, value: str) -> Any: ...
    def with_bind_ports(self, container: int, host: int) -> Any: ...
    def with_command(self, command: str) -> Any: ...
    def start(self) -> Any: ...
    def stop(self) -> None: ...
    def get_container_host_ip(self) -> str: ...
    def get_wrapped_container(self) -> Any: ...


def postgres_container(image: str) -> Container:
    """A testcontainers ``PostgresContainer`` of ``image``, not started yet."""
    from testcontainers.community.postgres import PostgresContainer

    made: Container = PostgresContainer(
        image, username="postgres", dbname="postgres", driver=None
    )
    return made


class ContainerPgCluster(PgCluster):
    """PostgreSQL in a container this session started; it can stop and restart.

    Its processes are not ours to signal: they live in the container's PID
    namespace (under Docker Desktop, on another machine), so the pids
    ``pg_stat_activity`` shows mean nothing here. Tests that freeze server
    processes need the local cluster (``local``) and skip here with that reason.
    """

    route = "testcontainers"

    def __init__(
        self,
        image: str,
        make_container: Callable[[str], Container] = postgres_container,
    ) -> None:
        super().__init__(dsn="")
        self.image = image
        self._make_container = make_container
        self._container: Container | None = None
        self.start_s = 0.0  # the container's first start, for the session summary

    @property
    def restartable(self) -> bool:
        """A container is ours: it can be stopped and started again."""
        return True

    def create(self) -> None:
        """Start the container on a free host port, retrying if the port was taken."""
        began = time.monotonic()
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            container = self._make_container(self.image)
            container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
            container.with_bind_ports(CONTAINER_PORT, self.port)
            container.with_command(POSTGRES_ARGS)
            try:
                container.start()
            except Exception as exc:  # the engine's errors have no common base
                container.stop()
                if attempt == START_ATTEMPTS or "address already in use" not in str(
                    exc
                ):
                    raise ClusterError(f"{self.image}: {exc}") from exc
                continue
            self._container = container
            break
        assert self._container is not None  # the loop either set it or raised
        host = self._container.get_container_host_ip()
        # "localhost" may resolve to ::1 first; the engine publishes on IPv4.
        self.host = LOOPBACK if host == "localhost" else host
        self.dsn = f"host={self.host} port={self.port} dbname=postgres user=postgres"
        self._wait_ready()
        self.start_s = time.monotonic() - began

    def stop(self, mode: str = "fast") -> None:
        """Stop the server as ``pg_ctl stop --mode`` would; the container stops too."""
        wrapped = self._wrapped()
        wrapped.kill(signal=STOP_SIGNALS[mode].name)
        wrapped.wait(timeout=PG_CTL_TIMEOUT_S)

    def start(self) -> None:
        """Start the stopped container again, on the same host port, and wait for it."""
        self._wrapped().start()
        self._wait_ready()

    def restart(self, mode: str = "fast") -> None:
        """Stop the server with ``mode``, then start it again on the same port."""
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        """Remove the container and its data."""
        if self._container is not None:
            self._container.stop()

    def summary(self) -> str:
        """Say in one line which server the session used, and what it cost."""
        return (
            f"{self.route}: PostgreSQL {_version_text(self.server_version)} "
            f"in {self.image} on {self.host}:{self.port}, "
            f"started in {self.start_s:.2f} s"
        )

    def _wrapped(self) -> Any:
        if self._container is None:
            raise ClusterError(f"{self.image}: the container was never started")
        return self._container.get_wrapped_container()

    def _wait_ready(self) -> None:
        """Wait until the server accepts connections on the published port.

        The engine publishes the port before PostgreSQL listens on it, and
        testcontainers' own readiness check runs inside the container, not
        through the published port that the tests use.
        """
        deadline_s = time.monotonic() + PG_CTL_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline_s:
            try:
                self.probe()
                return
            except psycopg.Error as exc:
                last = exc
                time.sleep(0.2)
        raise ClusterError(
            f"{self.image}: no answer on {self.host}:{self.port} "
            f"within {PG_CTL_TIMEOUT_S} s ({last})"
        )
