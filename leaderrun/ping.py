"""``--ping URL``: tell a monitor that the command started and how it ended.

The healthchecks.io ping protocol, which Healthchecks, its self-hosted forks and
several other monitors accept: ``URL/start`` when the command starts, then
``URL/<exit status>`` (0 is a success, anything else a failure), both with the
same ``rid`` query parameter so that the monitor pairs them, and the captured
output's tail as the body of the last one. Only the node that runs the command
pings; a node that skips (75) says nothing, as a skip is normal on a fleet.

The only module that speaks HTTP; it is imported only when ``--ping`` is given,
and ``urllib.request`` (with ``http.client`` and ``ssl``, some 20 ms) only on the
ping thread, so that neither delays the command's start.

A ping never holds up what matters: the start ping goes on a thread once the
child runs; the end ping goes after the release, and leaderrun waits for the
two at most :data:`PING_BOUND_S` (a DNS lookup that hangs included: the thread is
abandoned, not joined). A ping changes no exit status, and its URL, which holds
the check's key, appears in no message (:func:`leaderrun.redact.url_shown`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from leaderrun import __version__
from leaderrun.clock import boottime
from leaderrun.redact import url_shown

log = logging.getLogger("leaderrun")

PING_BOUND_S = 2.5
"""After the release, the most leaderrun waits for its pings before it exits."""

ATTEMPT_TIMEOUT_S = 1.0
"""One attempt's socket timeout (to connect, and for each read of the answer)."""

RETRY_PAUSE_S = 0.2
"""The pause before the second attempt; it doubles for each one after."""

MAX_ATTEMPTS = 3
"""Attempts per ping, all within its bound."""


def ping_target(url: str, event: str, rid: str) -> str:
    """The URL to ping for ``event`` (``start``, or an exit status) of run ``rid``.

    ``https://hc-ping.com/KEY`` becomes ``https://hc-ping.com/KEY/start?rid=RID``;
    a query the URL already has (``?create=1``) is kept.
    """
    parts = urlsplit(url)
    query = f"{parts.query}&rid={rid}" if parts.query else f"rid={rid}"
    path = f"{parts.path.rstrip('/')}/{event}"
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


@dataclass
class _Ping:
    event: str
    body: bytes | None
    deadline_s: float
    sent: bool = False
    done: bool = False
    """Sent, or given up."""
    retry: bool = True
    """Whether a failed attempt may be followed by another."""

    @property
    def name(self) -> str:
        """How messages call it: the start ping, or the end ping with its status."""
        return "start ping" if self.event == "start" else f"end ping ({self.event})"


class Pinger:
    """The pings of one run, sent in order by one thread.

    Args:
        url: the monitor's URL, validated (:func:`leaderrun.config.ping_url`).
        clock: CLOCK_BOOTTIME, or a fake.
    """

    def __init__(self, url: str, clock: Callable[[], float] = boottime) -> None:
        self.url = url
        self.shown = url_shown(url)
        self.clock = clock
        self.rid = str(uuid.uuid4())
        """The run id that pairs the start ping with the end ping."""
        self._cond = threading.Condition()
        self._queue: collections.deque[_Ping] = collections.deque()
        self._last: _Ping | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Ping ``/start`` in the background: the command has just started."""
        self._queue_ping("start", None)

    def end(self, status: int, body: bytes | None) -> None:
        """Ping ``/<status>`` in the background, with ``body`` if there is one.

        A start ping still being tried gets no further attempt once its
        current one ends: the two go in order, and the end matters more.
        """
        with self._cond:
            for earlier in self._queue:
                earlier.retry = False
        self._queue_ping(str(status), body)

    def wait(self) -> bool:
        """Wait until the last ping was sent or its bound passed; True if sent."""
        last = self._last
        if last is None:
            return True
        with self._cond:
            self._cond.wait_for(
                lambda: last.done, max(0.0, last.deadline_s - self.clock())
            )
            sent = last.sent
        if not sent:
            log.warning(
                "the monitor at %s did not take the %s within %gs; exiting without it",
                self.shown,
                last.name,
                PING_BOUND_S,
                extra={"event": "ping"},
            )
        return sent

    def _queue_ping(self, event: str, body: bytes | None) -> _Ping:
        ping = _Ping(event, body, self.clock() + PING_BOUND_S)
        with self._cond:
            self._queue.append(ping)
            self._last = ping
            self._cond.notify_all()
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name="leaderrun-ping", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    # No thread now (a pids limit): the next ping tries again,
                    # and the run goes on without this one.
                    log.warning("cannot start a thread to ping %s", self.shown)
                else:
                    self._thread = thread
        return ping

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                ping = self._queue[0]
            try:
                sent = self._send(ping)
            except Exception as exc:  # a bug of ours must not kill the thread
                log.debug("the %s failed: %s", ping.name, type(exc).__name__)
                sent = False
            with self._cond:
                ping.sent, ping.done = sent, True
                self._queue.popleft()
                self._cond.notify_all()

    def _send(self, ping: _Ping) -> bool:
        """Try a ping up to :data:`MAX_ATTEMPTS` times within its deadline."""
        reason = "not tried"
        for attempt in range(MAX_ATTEMPTS):
            left_s = ping.deadline_s - self.clock()
            if attempt and not ping.retry:
                break
            if attempt:
                pause_s = RETRY_PAUSE_S * 2 ** (attempt - 1)
                if pause_s >= left_s:
                    break
                time.sleep(pause_s)
                left_s = ping.deadline_s - self.clock()
            if left_s <= 0:
                break
            reason = self._attempt(ping, min(ATTEMPT_TIMEOUT_S, left_s))
            if not reason:
                log.debug("pinged %s at %s (rid %s)", ping.event, self.shown, self.rid)
                return True
            if reason.startswith("HTTP 4"):
                break  # refused (an unknown check): asking again will not help
        log.warning(
            "the monitor at %s did not take the %s: %s",
            self.shown,
            ping.name,
            reason,
            extra={"event": "ping"},
        )
        return False

    def _attempt(self, ping: _Ping, timeout_s: float) -> str:
        """One request; '' if the monitor took it, else why not (never the URL)."""
        # Here, on the ping thread: the command's start does not wait for it.
        import http.client
        import urllib.error
        import urllib.request

        request = urllib.request.Request(  # noqa: S310 - http(s) only, checked in config
            ping_target(self.url, ping.event, self.rid),
            data=ping.body,
            method="GET" if ping.body is None else "POST",
            headers={
                "User-Agent": f"leaderrun/{__version__}",
                "Content-Type": "text/plain; charset=utf-8",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
                response.read(4096)
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except urllib.error.URLError as exc:
            return _why(exc.reason)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return _why(exc)
        return ""


def _why(error: object) -> str:
    """A failure in words that cannot contain the URL: no exception's own text."""
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    if isinstance(error, str):
        return "the request failed"  # URLError's own text may quote the URL
    return type(error).__name__
