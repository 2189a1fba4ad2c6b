"""The container route's cluster, wired to a stand-in container or a real engine.

CI has no container engine, so the stand-in runs everywhere: it plays the
engine's part (publishing a port, signalling PID 1, starting the container
again) with the session's local cluster as the server, which checks what
``ContainerPgCluster`` asks of testcontainers and what it does with the answers.
The real-engine test runs only where one answers (it needs the image, by
default postgres:16, or ``LEADERRUN_TEST_PG_IMAGE``).
"""

import signal

import psycopg
import pytest

from tests import pg_container
from tests.pg import LocalPgCluster
from tests.pg_container import STOP_SIGNALS, ContainerPgCluster

pytestmark = [pytest.mark.pg, pytest.mark.slow]

MODES = {sig.name: mode for mode, sig in STOP_SIGNALS.items()}


class StandInContainer:
    """testcontainers' PostgresContainer, played by the session's local cluster."""

    def __init__(self, image: str, cluster: LocalPgCluster) -> None:
        self.image = image
        self.env: dict[str, str] = {}
        self.ports: dict[int, int] = {}
        self.command: str | None = None
        self.calls: list[str] = []
        self.engine_side = StandInEngineContainer(cluster, self.calls)

    def with_env(self, key, value):
        self.env[key] = value
        return self

    def with_bind_ports(self, container, host):
        self.ports[container] = host
        return self

    def with_command(self, command):
        self.command = command
        return self

    def start(self):
        self.calls.append("create")
        return self

    def stop(self):
        self.calls.append("remove")

    def get_container_host_ip(self):
        return "localhost"

    def get_wrapped_container(self):
        return self.engine_side


class StandInEngineContainer:
    """docker-py's Container: what ``docker kill``, ``wait`` and ``start`` do."""

    def __init__(self, cluster: LocalPgCluster, calls: list[str]) -> None:
        self.cluster = cluster
        self.calls = calls

    def kill(self, signal):
        self.calls.append(f"kill {signal}")
        self.cluster.stop(MODES[signal])  # PID 1 is the postmaster

    def wait(self, timeout):
        self.calls.append("wait")

    def start(self):
        self.calls.append("start")
        self.cluster.start()


@pytest.fixture
def stand_in(pg_cluster, monkeypatch):
    """A ContainerPgCluster whose container is the session's local cluster."""
    if not pg_cluster.local:
        pytest.skip("the stand-in container needs the throwaway local cluster")
    made = []

    def make(image):
        made.append(StandInContainer(image, pg_cluster))
        return made[-1]

    # The engine would publish the port chosen for it; the stand-in's server
    # already listens, so the port chosen is its.
    monkeypatch.setattr(pg_container, "_free_port", lambda: pg_cluster.port)
    cluster = ContainerPgCluster("postgres:16", make_container=make)
    cluster.create()
    yield cluster, made[0]
    assert pg_cluster.running, "the stand-in must leave the session's server up"


def test_the_container_is_asked_for_what_the_local_cluster_has(stand_in):
    """Trust authentication, the port chosen here, and the local server settings."""
    cluster, container = stand_in
    assert container.env == {"POSTGRES_HOST_AUTH_METHOD": "trust"}
    assert container.ports == {5432: cluster.port}
    assert container.command == "-c max_connections=400 -c fsync=off"
    assert cluster.host == "127.0.0.1"
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


@pytest.mark.parametrize(
    ("mode", "sent"), [("fast", signal.SIGINT), ("immediate", signal.SIGQUIT)]
)
def test_a_restart_signals_pid_1_and_comes_back_on_the_same_port(stand_in, mode, sent):
    """restart(mode) sends pg_ctl's signal for the mode, waits, starts, and answers."""
    cluster, container = stand_in
    port = cluster.port
    cluster.restart(mode)
    assert container.calls[-3:] == [f"kill {sent.name}", "wait", "start"]
    assert cluster.port == port
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_destroy_removes_the_container(stand_in):
    """destroy() removes the container (and so its data) through testcontainers."""
    cluster, container = stand_in
    cluster.destroy()
    assert container.calls[-1] == "remove"


def test_a_real_container_answers_and_restarts():
    """Where an engine answers: the image starts, answers, and survives a restart."""
    if problem := pg_container.engine_problem():
        pytest.skip(problem)
    cluster = ContainerPgCluster(pg_container.image())
    try:
        cluster.create()
        port = cluster.port
        cluster.restart("fast")
        assert cluster.port == port
        with psycopg.connect(cluster.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.destroy()
