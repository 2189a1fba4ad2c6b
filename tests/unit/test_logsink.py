"""The log sink: never blocks the caller, drops and counts, reports the count."""

import contextlib
import logging
import os
import threading
import time

import pytest

from leaderrun.logsink import PIPE_BUF_BYTES, LogSink, SinkHandler


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def fill(write_fd: int) -> None:
    """Fill the pipe to the brim, leaving its write end blocking."""
    os.set_blocking(write_fd, False)
    for chunk in (65536, 4096, 1):
        try:
            while True:
                os.write(write_fd, b"x" * chunk)
        except BlockingIOError:
            pass
    os.set_blocking(write_fd, True)


def drain(read_fd: int) -> bytes:
    os.set_blocking(read_fd, False)
    data = b""
    try:
        while chunk := os.read(read_fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    os.set_blocking(read_fd, True)
    return data


def test_messages_are_written_in_order_by_the_writer(pipe):
    """What is queued reaches the descriptor, in order, once flushed."""
    read_fd, write_fd = pipe
    sink = LogSink(write_fd)
    for n in range(3):
        assert sink.write(f"line {n}\n".encode())
    assert sink.flush(5.0)
    assert drain(read_fd) == b"line 0\nline 1\nline 2\n"


def test_a_stalled_reader_never_blocks_the_caller(pipe):
    """On a full pipe nobody reads, writing returns at once: the message waits,
    and past the capacity messages are dropped and counted."""
    _, write_fd = pipe
    fill(write_fd)
    sink = LogSink(write_fd, capacity_bytes=1000)
    sink.write(b"first\n")
    deadline = time.monotonic() + 5
    while not sink._writing:  # the writer has taken it and is stuck in write(2)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    started = time.monotonic()
    results = [sink.write(b"x" * 100 + b"\n") for _ in range(50)]
    assert time.monotonic() - started < 1.0
    assert not all(results), "past the capacity, messages are dropped"
    assert sink.dropped == results.count(False)
    assert not sink.flush(0.1), "a stalled reader cannot be flushed to"


def test_the_dropped_count_is_reported_once_the_reader_is_back(pipe):
    """After a stall, the first write says how many messages were lost."""
    read_fd, write_fd = pipe
    fill(write_fd)
    sink = LogSink(
        write_fd, capacity_bytes=200, notice=lambda n: f"[{n} lost]\n".encode()
    )
    for n in range(1000):  # until the writer is stuck and the buffer is full
        sink.write(f"message {n:03d} ".encode() * 5 + b"\n")
        if sink.dropped:
            break
    lost = sink.dropped
    assert lost >= 1
    # The reader comes back: everything in the pipe is read, then the rest.
    received = b""
    deadline = time.monotonic() + 5
    while f"[{lost} lost]".encode() not in received and time.monotonic() < deadline:
        received += drain(read_fd)
        time.sleep(0.01)
    assert f"[{lost} lost]\n".encode() in received
    assert sink.flush(5.0)


def test_one_write_never_mixes_a_line_with_another_process_s(pipe):
    """Each write(2) holds whole lines and at most PIPE_BUF bytes (atomic on a
    pipe), unless one line alone is longer."""
    read_fd, write_fd = pipe
    sink = LogSink(write_fd)
    writes: list[bytes] = []
    real_write = sink._write_all

    def recording_write(data: bytes) -> None:
        writes.append(data)
        real_write(data)

    sink._write_all = recording_write  # type: ignore[method-assign]
    line = b"y" * 1000 + b"\n"
    received: list[bytes] = []

    def read_all() -> None:
        while sum(map(len, received)) < 12 * len(line):
            received.append(os.read(read_fd, 65536))

    reader = threading.Thread(target=read_all)
    reader.start()
    for _ in range(12):
        sink.write(line)
    assert sink.flush(5.0)
    reader.join(5)
    assert all(len(w) <= PIPE_BUF_BYTES and w.endswith(b"\n") for w in writes)
    assert sum(len(w) for w in writes) == 12 * len(line)


def test_a_closed_reader_drops_everything_without_an_error(pipe):
    """EPIPE: nobody will read; messages are dropped, the caller never sees it."""
    read_fd, write_fd = pipe
    os.close(read_fd)
    sink = LogSink(write_fd)
    sink.write(b"first\n")
    assert sink.flush(5.0)
    assert sink.write(b"second\n") is False


def test_the_handler_formats_on_the_caller_and_never_raises(pipe):
    """A record that cannot be formatted is written as what it was, without the
    traceback logging would print to stderr from the caller's thread."""
    read_fd, write_fd = pipe
    sink = LogSink(write_fd)
    handler = SinkHandler(sink)
    logger = logging.getLogger("leaderrun.test-logsink")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("hello %s", "world")
        logger.warning("broken %d", "not a number")
    finally:
        logger.removeHandler(handler)
    assert sink.flush(5.0)
    assert drain(read_fd) == (
        b"hello world\nleaderrun: unformattable message 'broken %d' ('not a number',)\n"
    )


def test_a_forked_process_starts_with_an_empty_sink_of_its_own(pipe):
    """After fork, the child neither repeats what its parent had queued nor
    touches the parent's lock: its first message starts its own writer."""
    _, write_fd = pipe
    fill(write_fd)  # the parent's writer blocks, holding its queue
    sink = LogSink(write_fd)
    sink.write(b"parent's\n")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = not sink._pending and sink.write(b"child's\n")
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
