"""A monitor on 127.0.0.1 for ``--ping`` tests: it records pings, or misbehaves.

:class:`Monitor` answers every request 200 and records it; ``hang=True`` makes it
accept connections and never answer (a monitor behind a stuck proxy).
:func:`refusing_url` is a URL on a port where nothing listens.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

KEY = "0d1b2c3e-5f60-4718-9a2b-3c4d5e6f7a8b"
"""The check's key, the secret of its URL: no message of leaderrun may show it."""


@dataclass(frozen=True)
class Ping:
    """One request the monitor received."""

    method: str
    path: str
    rid: str | None
    body: bytes
    at_s: float

    @property
    def event(self) -> str:
        """What follows the key: ``start``, or an exit status."""
        return self.path.rsplit("/", 1)[1]


class Monitor:
    """An HTTP server on 127.0.0.1 on a free port, in a thread of the test."""

    def __init__(self, *, hang: bool = False) -> None:
        self.pings: list[Ping] = []
        self.hang = hang
        self._release = threading.Event()
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._record()

            def do_POST(self) -> None:
                self._record()

            def _record(self) -> None:
                if monitor.hang:
                    monitor._release.wait(60)  # accepted, read, never answered
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                url = urlsplit(self.path)
                rid = parse_qs(url.query).get("rid", [None])[0]
                ping = Ping(self.command, url.path, rid, body, time.monotonic())
                monitor.pings.append(ping)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, format: str, *args: object) -> None:
                pass  # the test reads self.pings, not stderr

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/{KEY}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def refusing_url() -> Iterator[str]:
    """A URL whose port refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/{KEY}"
