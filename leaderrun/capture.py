"""``--capture-output``: the command's output, relayed as it comes, its tail kept.

Without the option the command writes to leaderrun's own stdout and stderr, and
leaderrun never touches them. With it, the command writes to pipes that one
thread of leaderrun (the drain) empties as fast as they fill: every chunk goes
into the tail, a ring of the last N bytes, and is handed on to a relay for
leaderrun's stdout or stderr.

The rule is the one for leaderrun's own messages (``signal-first``,
:mod:`leaderrun.logsink`): the drain never waits for a reader someone else
controls. A relay is a :class:`~leaderrun.logsink.LogSink`, a bounded buffer
with its own writer thread, the only thread that may block in ``write(2)``. When
the reader of leaderrun's stdout or stderr stalls, the relay's buffer fills and
later chunks are dropped, counted, and reported once at the end; the tail keeps
them all the same. So the command is never held up longer than writing to a
pipe leaderrun keeps empty, the supervisor, the renewal and the release never
wait for the relay, and each stream reaches its reader in the order written.

When leaderrun's stdout and stderr are one file (``2>&1``, a terminal, a journal
stream), the command gets one pipe for both, so their interleaving is kept
exactly, on the way out and in the tail. With two targets, the tail holds the
two streams in the order leaderrun read them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading

from leaderrun.clock import boottime
from leaderrun.logsink import PIPE_BUF_BYTES, LogSink

log = logging.getLogger("leaderrun")

RELAY_CAPACITY_BYTES = 1024 * 1024
"""Output waiting to be relayed beyond this many bytes, per stream, is dropped:
a reader slower than the command by more than this loses the overflow."""

EOF_WAIT_S = 0.5
"""Once the command's group is gone, how long the drain may take to read what
is left in the pipes before the tail is taken (and the lease released). The
pipes are at their end as soon as the last writer died; only a process we could
not stop keeps them open."""

RELAY_FLUSH_S = 1.0
"""At the end, how long the relays may take to write what they hold: a slow
reader gets the command's last output, a stalled one cannot hold the exit."""


class Tail:
    """The last ``size_bytes`` bytes appended, as a ring; one appending thread."""

    def __init__(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes
        self._data = bytearray()
        self._cut = False
        self._lock = threading.Lock()

    def append(self, data: bytes) -> None:
        """Keep ``data``, dropping the oldest bytes beyond the size."""
        with self._lock:
            self._data += data
            excess = len(self._data) - self.size_bytes
            if excess > 0:
                # bytearray drops its head in place, without copying the rest.
                del self._data[:excess]
                self._cut = True

    def text(self) -> str:
        """The tail decoded as UTF-8, with ``errors='replace'``.

        A tail that was cut may begin inside a character: its leftover
        continuation bytes are dropped rather than shown as a replacement.
        """
        with self._lock:
            data = bytes(self._data)
            cut = self._cut
        if cut:
            skip = 0
            while skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:
                skip += 1
            data = data[skip:]
        return data.decode("utf-8", errors="replace")


def same_file(fd_a: int, fd_b: int) -> bool:
    """Whether two descriptors reach the same file, pipe, socket or terminal."""
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _Relay:
    """One output stream of the command: the pipe's read end and its relay."""

    def __init__(self, read_fd: int, target_fd: int, what: str, target: str) -> None:
        self.read_fd = read_fd
        self.what = what
        """Which of the command's output this is, for the report."""
        self.target = target
        """Which of leaderrun's streams it goes to."""
        self.reported = 0
        self.sink = LogSink(
            target_fd, capacity_bytes=RELAY_CAPACITY_BYTES, notice=self._count
        )

    def _count(self, dropped: int) -> bytes:
        # The sink writes its notice into the stream: the command's output is
        # not the place for ours, which goes to the log once, at the end.
        self.reported += dropped
        return b""

    def dropped(self) -> int:
        """Chunks not relayed so far (a full buffer, a closed stream)."""
        return self.reported + self.sink.dropped


class Capture:
    """Pipes for the command's stdout and stderr, one drain, and the tail.

    Made before the lease is taken (a pipe can fail: EMFILE), handed to the
    child as its ``stdout`` and ``stderr``, then :meth:`spawned` once it runs.

    Args:
        size_bytes: how much of the end of the output to keep.
        stdout_fd: leaderrun's stdout, where the command's stdout is relayed.
        stderr_fd: leaderrun's stderr, likewise.

    Raises:
        OSError: the pipes could not be made.
    """

    def __init__(self, size_bytes: int, stdout_fd: int = 1, stderr_fd: int = 2) -> None:
        self.tail = Tail(size_bytes)
        self._relays: list[_Relay] = []
        self._write_fds: list[int] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        streams = [("stdout and stderr", "stdout", stdout_fd)]
        if not same_file(stdout_fd, stderr_fd):
            streams = [("stdout", "stdout", stdout_fd), ("stderr", "stderr", stderr_fd)]
        for what, target, target_fd in streams:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_fd, False)
            self._relays.append(_Relay(read_fd, target_fd, what, target))
            self._write_fds.append(write_fd)
        # One pipe for both when they reach one file: the order is the command's.
        self.child_stdout = self._write_fds[0]
        self.child_stderr = self._write_fds[-1]

    def spawned(self) -> None:
        """The child holds the write ends now: drop ours, and start draining.

        Raises:
            RuntimeError: the drain thread could not start (a pids limit).
        """
        for fd in self._write_fds:
            os.close(fd)
        self._write_fds = []
        thread = threading.Thread(
            target=self._drain, name="leaderrun-output-drain", daemon=True
        )
        thread.start()
        self._thread = thread

    def _drain(self) -> None:
        """Read every pipe until its end (or until told to stop); never block else."""
        open_relays = {relay.read_fd: relay for relay in self._relays}
        poller = select.poll()
        for fd in (*open_relays, self._wake_r):
            poller.register(fd, select.POLLIN)
        while open_relays:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    return
                relay = open_relays[fd]
                try:
                    # At most PIPE_BUF bytes: each relay write is then atomic on
                    # a pipe shared with leaderrun's own messages.
                    data = os.read(fd, PIPE_BUF_BYTES)
                except BlockingIOError:
                    continue
                if not data:
                    poller.unregister(fd)
                    del open_relays[fd]
                    continue
                self.tail.append(data)
                relay.sink.write(data)

    def finish(self, wait_s: float = EOF_WAIT_S) -> str:
        """The command's group is gone: drain what is left, return the tail.

        Waits at most ``wait_s`` for the pipes' end; what a survivor writes
        later is not read.
        """
        thread = self._thread
        if thread is not None:
            thread.join(wait_s)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")  # a survivor holds a pipe: stop anyway
            thread.join()
        return self.tail.text()

    def close(self, flush_s: float = RELAY_FLUSH_S) -> None:
        """Let the relays write what they hold, for at most ``flush_s`` in all.

        Then say once, per stream, how much a stalled reader cost. Only the
        first call does anything.
        """
        if self._closed:
            return
        self._closed = True
        started_s = boottime()
        for relay in self._relays:
            relay.sink.flush(max(0.0, flush_s - (boottime() - started_s)))
        for relay in self._relays:
            dropped = relay.dropped()
            if dropped:
                log.warning(
                    "%d chunk(s) of the command's %s were not relayed: leaderrun's "
                    "%s was not being read (the last --capture-output bytes were "
                    "kept)",
                    dropped,
                    relay.what,
                    relay.target,
                    extra={"event": "dropped"},
                )
        for fd in (*self._write_fds, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._write_fds = []
        if self._thread is None or not self._thread.is_alive():
            for relay in self._relays:
                with contextlib.suppress(OSError):
                    os.close(relay.read_fd)
