"""leaderrun's own messages: handed off by the caller, written by one writer thread.

stderr belongs to someone else: journald, a container's log shim stuck on a slow
disk, ``2>&1 | tee /hung/nfs/log``, a terminal paused with Ctrl-S. When its
reader stalls, the pipe fills and ``write(2)`` blocks. A handler that writes from
the caller's thread would then stop the supervisor before its SIGTERM, or a
renewal thread while it holds the handler's lock, and the lease would run out
with the child still running (rule: nothing on a kill path waits for I/O someone
else controls).

So a record is formatted on the caller's thread and appended to a bounded buffer,
which never blocks; one writer thread drains the buffer into the descriptor and
is the only thread that ever waits on it. When the buffer is full a message is
dropped and counted, and the count is reported once writing works again. The
descriptor itself is left as it is (blocking): its open file description is
shared with the child's inherited stderr, and the child's output is the child's.

A forked process (the watchdog) starts with an empty buffer and no writer; its
first message starts its own.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from collections.abc import Callable

CAPACITY_BYTES = 256 * 1024
"""Messages waiting to be written beyond this many bytes are dropped and counted."""

PIPE_BUF_BYTES = 4096
"""Writes up to this size are atomic on a pipe: lines of leaderrun and of its
watchdog, which share the pipe, never interleave within a line."""

EXIT_FLUSH_S = 1.0
"""At exit, how long the last messages may take to be written before they are
abandoned (a reader that is only slow gets them; a stalled one cannot hold the
exit)."""


def _default_notice(dropped: int) -> bytes:
    return (
        f"leaderrun: {dropped} message(s) dropped: stderr was not being read\n"
    ).encode()


class LogSink:
    """A bounded, never-blocking path from any thread to one file descriptor.

    Args:
        fd: where the messages go (leaderrun's stderr).
        capacity_bytes: the most that may wait to be written.
        notice: the line that reports dropped messages, given their count.
    """

    def __init__(
        self,
        fd: int = 2,
        capacity_bytes: int = CAPACITY_BYTES,
        notice: Callable[[int], bytes] = _default_notice,
    ) -> None:
        self.fd = fd
        self.capacity_bytes = capacity_bytes
        self.notice = notice
        self.dropped = 0
        """Messages dropped since the last report (a full buffer, a dead stream)."""
        self._reset()
        _SINKS.add(self)

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._writing = False
        self._broken = False
        self._thread: threading.Thread | None = None

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for writing; never blocks. False if it was dropped."""
        with self._cond:
            if self._broken or self._pending_bytes + len(data) > self.capacity_bytes:
                self.dropped += 1
                return False
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._cond.notify()
            if self._thread is None:
                self._start_writer()
        return True

    def count_dropped(self) -> None:
        """Count a message that was never queued (it could not be formatted)."""
        with self._cond:
            self.dropped += 1

    def _start_writer(self) -> None:
        """Start the writer thread (the condition's lock is held)."""
        thread = threading.Thread(
            target=self._run, name="leaderrun-log-writer", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:
            # No thread can be started now (a pids limit): the messages wait,
            # and the next one tries again. Writing here would block.
            return
        self._thread = thread

    def _take(self) -> tuple[bytes, int]:
        """Whole messages up to PIPE_BUF_BYTES (one alone if longer); dropped count."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
            chunks = [self._pending.popleft()]
            size = len(chunks[0])
            while self._pending and size + len(self._pending[0]) <= PIPE_BUF_BYTES:
                size += len(self._pending[0])
                chunks.append(self._pending.popleft())
            self._pending_bytes -= size
            dropped, self.dropped = self.dropped, 0
            self._writing = True
        return b"".join(chunks), dropped

    def _run(self) -> None:
        while True:
            data, dropped = self._take()
            try:
                if dropped:
                    self._write_all(self.notice(dropped))
                self._write_all(data)
            except OSError:
                # EPIPE or EBADF: nobody will ever read these; drop the rest.
                with self._cond:
                    self.dropped += len(self._pending) + 1
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._broken = True
            with self._cond:
                self._writing = False
                self._cond.notify_all()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until everything queued is written; True if so."""
        with self._cond:
            if self._pending and self._thread is None:
                self._start_writer()
            return self._cond.wait_for(
                lambda: self._broken or not (self._pending or self._writing),
                timeout_s,
            )

    def _after_fork_in_child(self) -> None:
        # The writer thread did not survive the fork, and the parent writes what
        # it had queued: start empty, with a lock nobody can be holding.
        self._reset()
        self.dropped = 0


_SINKS: weakref.WeakSet[LogSink] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sink in list(_SINKS):
        sink._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SinkHandler(logging.Handler):
    """A logging handler that formats on the caller's thread and never blocks."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        """Format ``record`` and hand it to the sink."""
        try:
            text = self.format(record)
        except Exception:
            # A bad format string is a bug of ours; say what we can, without the
            # traceback logging would print to stderr from the caller's thread.
            text = f"leaderrun: unformattable message {record.msg!r} {record.args!r}"
        self.sink.write((text + "\n").encode("utf-8", "replace"))

    def handleError(self, record: logging.LogRecord) -> None:
        """Count the record as dropped; logging's default would write to stderr."""
        self.sink.count_dropped()


_STDERR: LogSink | None = None


def stderr_sink() -> LogSink:
    """This process's sink for its stderr (one per process: stderr is one)."""
    global _STDERR  # noqa: PLW0603 - stderr is a process-wide resource
    if _STDERR is None:
        _STDERR = LogSink(2)
    return _STDERR
