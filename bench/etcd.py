"""A throwaway single-node etcd for the peers figure, and ``etcdctl lock``'s argv.

The bench installs nothing: it runs the ``etcd`` and ``etcdctl`` found on PATH
(Debian: etcd-server, etcd-client) and says why if there are none. The server
listens on loopback at free ports, keeps its data in a temporary directory, and
is stopped and removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import tool_version

START_TIMEOUT_S = 30.0
"""How long the server may take to answer /health."""

REQUEST_TIMEOUT_S = 5.0
"""The bound of one request to the server's JSON gateway."""

STOP_TIMEOUT_S = 10.0
"""How long the server may take to leave after SIGTERM before it is killed."""

WATCHERS = "etcd_debugging_mvcc_watcher_total"
"""etcd's gauge of open watches."""

UNSYNCED = "etcd_debugging_mvcc_slow_watcher_total"
"""etcd's gauge of watches not yet caught up ("unsynced")."""

SHM = Path("/dev/shm")
"""tmpfs, where there is one: etcd's data directory goes there (see etcd_server)."""


def missing() -> str | None:
    """Why etcd's figures cannot run here, or None if they can."""
    absent = [name for name in ("etcd", "etcdctl") if shutil.which(name) is None]
    if absent:
        return (
            f"{' and '.join(absent)} not on PATH "
            "(Debian: apt-get install etcd-server etcd-client)"
        )
    return None


@dataclass(frozen=True)
class Etcd:
    """A running etcd server: its client URL and its process."""

    endpoint: str
    process: subprocess.Popen[bytes]
    version: str

    @property
    def env(self) -> dict[str, str]:
        """The environment for etcdctl: API v3 (3.4's default, said anyway)."""
        return {**os.environ, "ETCDCTL_API": "3"}

    def lock_argv(self, name: str, ttl_s: int) -> list[str]:
        """``etcdctl lock`` on ``name``, session TTL ``ttl_s``; the command follows.

        ``--`` ends etcdctl's own options, so the command's are its own.
        """
        return [
            "etcdctl",
            f"--endpoints={self.endpoint}",
            "lock",
            f"--ttl={ttl_s:d}",
            name,
            "--",
        ]

    def contenders(self, name: str) -> int:
        """How many sessions hold or wait for the lock ``name`` (its keys' count).

        ``etcdctl lock`` puts one key ``name/<lease>`` per session; the oldest
        holds the lock, the others wait for it.
        """
        prefix = f"{name}/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        answer = self._post(
            "/v3/kv/range",
            {
                "key": b64encode(prefix).decode(),
                "range_end": b64encode(end).decode(),
                "count_only": True,
            },
        )
        # The JSON gateway writes int64 as a string, and leaves out a zero.
        return int(str(answer.get("count", 0)))

    def watching(self) -> bool:
        """Whether a watch is open and synced, so an event reaches it at once.

        A waiting ``etcdctl lock`` watches the key before its own, from a past
        revision: etcd puts such a watch in its "unsynced" group, which a loop
        catches up every 100 ms; an event meanwhile waits for that loop. Its key
        alone is not enough either: the watch comes after it. Measured here,
        a hand-off to a waiter whose watch was not yet synced took about 50 ms,
        against about 3 ms once it was: the first is the waiter's set-up, not
        the hand-off.
        """
        with urllib.request.urlopen(  # a loopback URL of our own
            f"{self.endpoint}/metrics", timeout=REQUEST_TIMEOUT_S
        ) as response:
            text = response.read().decode()
        gauges = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in (WATCHERS, UNSYNCED):
                gauges[name] = int(float(value))
        if len(gauges) != 2:
            raise RuntimeError(f"etcd's /metrics lacks {WATCHERS} or {UNSYNCED}")
        return gauges[WATCHERS] >= 1 and gauges[UNSYNCED] == 0

    def healthy(self) -> bool:
        """Whether the server answers, and says it is healthy."""
        try:
            with urllib.request.urlopen(  # a loopback URL of our own
                f"{self.endpoint}/health", timeout=REQUEST_TIMEOUT_S
            ) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(
            f"{self.endpoint}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            answer: dict[str, object] = json.load(response)
        return answer


@contextlib.contextmanager
def etcd_server() -> Iterator[Etcd]:
    """A single-node etcd on loopback, stopped and removed on exit.

    Its data directory is on tmpfs where there is one: the PostgreSQL it is
    compared with runs with fsync off, and etcd has no such switch in 3.4.
    """
    root = Path(
        tempfile.mkdtemp(prefix="bench-etcd-", dir=SHM if SHM.is_dir() else None)
    )
    client, peer = _free_port(), _free_port()
    log = (root / "etcd.log").open("wb")
    process = subprocess.Popen(
        [
            "etcd",
            "--name=bench",
            f"--data-dir={root / 'data'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=bench=http://127.0.0.1:{peer}",
            "--log-level=warn",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        server = Etcd(f"http://127.0.0.1:{client}", process, _version())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.healthy():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (root / "etcd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"etcd did not start:\n{tail}")
            time.sleep(0.1)
        yield server
    finally:
        # A server left stopped by a failed pause would ignore SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _version() -> str:
    line = tool_version(["etcd", "--version"], REQUEST_TIMEOUT_S)
    return line.removeprefix("etcd Version: ")


def _free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
