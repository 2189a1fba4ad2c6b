"""Round trips: a loopback proxy in front of PostgreSQL counting the client's flights.

A *flight* is what the client sends before the server next answers: the
SSLRequest, the startup packet, a statement (Parse, Bind, Describe, Execute,
Sync), a Terminate. Every flight the server answers is one round trip; the
last (Terminate) is answered by nobody. TCP's own handshake is not seen here
(it is one more round trip before the first flight).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104
_CHUNK = 65536
_KINDS = {
    ord("P"): "statement",
    ord("Q"): "simple query",
    ord("X"): "terminate",
    ord("p"): "password",
}


@dataclass
class Connection:
    """The flights of one client connection, in order, each by its first message."""

    flights: list[str] = field(default_factory=list)
    answered: list[bool] = field(default_factory=list)

    def round_trips(self) -> int:
        """Flights the server answered."""
        return sum(self.answered)


def kind_of(data: bytes) -> str:
    """What a flight is, from its first bytes."""
    if data[:1] == b"\0":  # a length, not a message type: before the startup
        code = struct.unpack("!I", data[4:8])[0] if len(data) >= 8 else 0
        if code == SSL_REQUEST:
            return "SSL request"
        if code == GSS_REQUEST:
            return "GSS request"
        return "startup"
    return _KINDS.get(data[0], f"message {chr(data[0])!r}")


class FlightCounter:
    """A loopback TCP proxy to ``host:port``; ``connections`` records each one.

    Used as a ``with`` block; the client connects to ``port``.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.connections: list[Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FlightCounter:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            record = Connection()
            self.connections.append(record)
            thread = threading.Thread(
                target=self._pump, args=(client, record), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _pump(self, client: socket.socket, record: Connection) -> None:
        with (
            contextlib.closing(client),
            socket.create_connection(self.target) as server,
        ):
            last = ""  # who sent last: "c" or "s"
            while True:
                ready, _, _ = select.select([client, server], [], [], 1.0)
                if self._stop.is_set() and not ready:
                    return
                for sock in ready:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    if sock is client:
                        if last != "c":
                            record.flights.append(kind_of(data))
                            record.answered.append(False)
                        last = "c"
                        server.sendall(data)
                    else:
                        if last == "c":
                            record.answered[-1] = True
                        last = "s"
                        client.sendall(data)


@contextlib.contextmanager
def counting(host: str, port: int) -> Iterator[FlightCounter]:
    """A :class:`FlightCounter` in front of ``host:port`` for the ``with`` block."""
    with FlightCounter(host, port) as counter:
        yield counter
