"""``leaderrun metrics``: the fleet's locks as Prometheus metrics, in one scrape.

The one user of the Prometheus project's Python client (``prometheus_client``),
which formats and escapes the exposition; loaded only by this subcommand, never
on a run's path. Every scrape is one read of the lease table and one of the
newest run of each lock, from the database: any host can serve them. The run
counters live in the lease row (the release statement counts each run), so
they are real counters: monotonic, and kept when the history is pruned.

The label is the lock's name (its key when it has none): a fleet's locks are
few and named by people, never one per run or per holder.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from leaderrun.errors import ConfigError, LeaderrunError
from leaderrun.runs import RunOutcome, RunRecord
from leaderrun.stores.base import LeaseSnapshot
from leaderrun.views import LockStatus, statuses

log = logging.getLogger("leaderrun")

Read = Callable[[], tuple[LeaseSnapshot, Sequence[RunRecord]]]
"""One read of the store: the lease rows (with the database's now), and the
newest run of each lock."""


class LockCollector(Collector):
    """The locks of one store, read afresh at each collection.

    Args:
        read: reads the store; its errors are raised by :meth:`collect`,
            unless ``keep_going``.
        keep_going: for a server: a failed read is logged and exposed as
            ``leaderrun_database_up 0`` instead of failing the scrape.
    """

    def __init__(self, read: Read, *, keep_going: bool = False) -> None:
        self._read = read
        self._keep_going = keep_going

    def collect(self) -> Iterator[Metric]:
        """The metric families of every lock, from one read."""
        up = GaugeMetricFamily(
            "leaderrun_database_up", "1 if the last read of the lease table worked."
        )
        try:
            snapshot, last_runs = self._read()
        except LeaderrunError as exc:
            if not self._keep_going:
                raise
            log.error("cannot read the leases: %s", exc.message)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(statuses(snapshot, None, last_runs))


def families(found: Sequence[LockStatus]) -> Iterator[Metric]:
    """Every metric family for these locks; times as Unix seconds."""

    def gauge(name: str, text: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"leaderrun_{name}", text, labels=["lock"])

    held = gauge("lock_held", "1 while the lock is taken: held, or revoked and live.")
    token = gauge("lock_fencing_token", "The lock's fencing token, its last holder's.")
    expires = gauge(
        "lock_lease_expiry_timestamp_seconds", "When the lock's lease ends (or ended)."
    )
    started = gauge(
        "last_run_start_timestamp_seconds", "When the lock's newest run started."
    )
    ended = gauge(
        "last_run_end_timestamp_seconds", "When the lock's newest run ended, if it did."
    )
    duration = gauge(
        "last_run_duration_seconds", "How long the newest run took, or has taken."
    )
    success = gauge(
        "last_success_timestamp_seconds", "When the lock's last successful run ended."
    )
    runs = CounterMetricFamily(
        "leaderrun_runs",
        "Runs of the lock by outcome, ever (kept when the history is pruned).",
        labels=["lock", "outcome"],
    )
    for s in found:
        labels = [s.lock]
        held.add_metric(labels, 1 if s.taken else 0)
        if s.token is not None:
            token.add_metric(labels, s.token)
        if s.expires_at is not None:
            expires.add_metric(labels, s.expires_at.timestamp())
        if s.last_ok_at is not None:
            success.add_metric(labels, s.last_ok_at.timestamp())
        run = s.last_run
        if run is not None:
            started.add_metric(labels, run.started_at.timestamp())
            duration.add_metric(labels, run.duration_s)
            if run.finished_at is not None:
                ended.add_metric(labels, run.finished_at.timestamp())
        for outcome in RunOutcome:
            runs.add_metric([s.lock, outcome.value], s.counts.get(outcome.value, 0))
    yield from (held, token, expires, started, ended, duration, success, runs)


def registry_of(read: Read, *, keep_going: bool = False) -> CollectorRegistry:
    """A registry with only the locks' collector (no process or platform metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LockCollector(read, keep_going=keep_going))
    return registry


def exposition(read: Read) -> bytes:
    """The text exposition format of every lock, from one read.

    Raises:
        LeaderrunError: the store could not be read.
    """
    return generate_latest(registry_of(read))


def write_textfile(path: Path, text: bytes) -> None:
    """Write ``text`` to ``path`` atomically, for node_exporter's textfile collector.

    A temporary file in the same directory, flushed to disk, then renamed over
    ``path``: the collector never reads half a file, and a failed write leaves
    the previous one.

    Raises:
        ConfigError: the directory cannot be written.
    """
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise ConfigError(
            f"--textfile {str(path)!r}: cannot write in {str(directory)!r} "
            f"({exc.strerror or exc}); give a path in a writable directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464``, ``:9464`` for every address) as (host, port).

    Raises:
        ConfigError: not a host and a port from 1 to 65535.
    """
    host, colon, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--listen {text!r} is not HOST:PORT; use e.g. 127.0.0.1:9464, "
            ":9464 for every address, or [::1]:9464"
        )
    return host or "0.0.0.0", int(port)  # noqa: S104 - ":PORT" asks for every address


def serve(read: Read, host: str, port: int, stop: threading.Event) -> None:
    """Serve ``/metrics`` on ``host:port`` until ``stop`` is set.

    Raises:
        ConfigError: the address cannot be bound.
    """
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(
            port, addr=host, registry=registry_of(read, keep_going=True)
        )
    except OSError as exc:
        raise ConfigError(
            f"--listen {host}:{port}: cannot listen ({exc.strerror or exc}); "
            "choose a free port or an address of this host"
        ) from None
    log.info("serving metrics on http://%s:%d/metrics", host, port)
    stop.wait()
    server.shutdown()
    thread.join(timeout=5.0)
