"""A loopback TCP proxy that a fault test controls: pass, hold, blackhole, reset.

One proxy per leaderrun contender sits between it and PostgreSQL, so a test can
cut one node off while the others carry on:

- ``pass``: bytes flow both ways.
- ``hold``: connections are accepted but nothing is forwarded yet (the kernel
  buffers it); ``pass`` lets it all through at once. For racing starts.
- ``blackhole``: a partition. Nothing is forwarded either way and nothing is
  closed, so neither end sees an RST or a FIN; only timeouts can tell. Every
  connection open at that moment stays dead after the partition heals (its
  bytes were lost), and new connections hang until ``pass``. ``drop_dead()``
  then closes them, as a connection that lost bytes finally times out.
- ``reset()``: every open connection is closed with an RST to the client
  (``SO_LINGER`` 0); new ones pass.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

PASS, HOLD, BLACKHOLE = "pass", "hold", "blackhole"


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = False  # blackholed once: never forwards again

    def close(self, rst: bool = False) -> None:
        if rst:
            with contextlib.suppress(OSError):
                self.client.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        for sock in (self.client, self.upstream):
            if not rst:
                # The other pump thread may be blocked in recv() on this socket,
                # and then close() alone sends nothing: the peer would never see
                # the end (a cancel request waits for the server to hang up).
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target``; see the module for the modes."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._mode = PASS
        self._changed = threading.Condition()
        self._links: list[_Link] = []
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def mode(self) -> str:
        """The current mode."""
        return self._mode

    def set_mode(self, mode: str) -> None:
        """Switch to ``pass``, ``hold`` or ``blackhole``."""
        with self._changed:
            if mode == BLACKHOLE:
                for link in self._links:
                    link.dead = True
            self._mode = mode
            self._changed.notify_all()

    def reset(self) -> int:
        """Close every open connection with an RST; return how many."""
        with self._changed:
            links, self._links = self._links, []
        for link in links:
            link.close(rst=True)
        return len(links)

    def drop_dead(self) -> int:
        """Close the connections a blackhole killed; return how many.

        Otherwise their server sessions stay open for good (nothing ever
        reaches the server again, not even an end), which a long soak of
        partitions would pile up to max_connections.
        """
        with self._changed:
            dead = [link for link in self._links if link.dead]
            self._links = [link for link in self._links if not link.dead]
        for link in dead:
            link.close()
        return len(dead)

    def upstream_ports(self) -> list[int]:
        """The local ports of the open upstream sockets (``client_port`` in PG)."""
        ports = []
        with self._changed:
            for link in self._links:
                with contextlib.suppress(OSError):
                    ports.append(link.upstream.getsockname()[1])
        return ports

    def wait_accepted(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` connections were accepted in all."""
        with self._changed:
            return self._changed.wait_for(lambda: self.accepted >= count, timeout_s)

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._changed:
            links, self._links = self._links, []
            self._mode = PASS
            self._changed.notify_all()
        for link in links:
            link.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        with self._changed:
            self.accepted += 1
            self._changed.notify_all()
            # A partitioned node cannot even reach the server.
            self._changed.wait_for(lambda: self._mode == PASS or self._closed)
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        link = _Link(client, upstream)
        with self._changed:
            self._links.append(link)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(link, src, dst), daemon=True
            ).start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        for chunk in self._chunks(link, src):
            with self._changed:
                self._changed.wait_for(
                    lambda: self._mode != HOLD or self._closed or link.dead
                )
            if link.dead or self._mode == BLACKHOLE:
                link.dead = True
                continue  # dropped on the floor: no RST, no FIN
            try:
                dst.sendall(chunk)
            except OSError:
                break
        if not link.dead:
            link.close()

    @staticmethod
    def _chunks(link: _Link, src: socket.socket) -> Iterator[bytes]:
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            yield chunk
