"""--capture-output's pure parts and its pipes: the tail, one pipe for one file,
the relay that reaches each stream in order."""

from __future__ import annotations

import os
import sys

import pytest

from leaderrun.capture import Capture, Tail, same_file
from leaderrun.supervisor import Child


@pytest.mark.parametrize(
    ("chunks", "size", "kept"),
    [
        ([b"abc"], 8, "abc"),
        ([b"abc", b"def"], 4, "cdef"),
        ([b"0123456789"], 3, "789"),
        ([b"x" * 10, b"y"], 1, "y"),
        ([], 4, ""),
    ],
)
def test_the_tail_keeps_the_last_bytes(chunks, size, kept):
    """Whatever the chunks, the tail is the last ``size`` bytes appended."""
    tail = Tail(size)
    for chunk in chunks:
        tail.append(chunk)
    assert tail.text() == kept


def test_a_cut_tail_drops_a_character_it_cut_in_two():
    """A tail that begins inside a UTF-8 character starts at the next one."""
    tail = Tail(3)
    tail.append("aé€b".encode())  # 1 + 2 + 3 + 1 bytes: the cut falls in the €
    assert tail.text() == "b"
    tail.append(b"\xff")  # not UTF-8 at all: replaced, not dropped
    assert tail.text() == "b\ufffd"


def test_same_file_tells_one_pipe_from_two():
    """Two descriptors of one pipe are one file; two pipes are two; a closed fd none."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    dup = os.dup(w1)
    try:
        assert same_file(w1, dup)
        assert not same_file(w1, w2)
        os.close(r2)
        os.close(w2)
        assert not same_file(w1, w2)
    finally:
        for fd in (r1, w1, dup):
            os.close(fd)


ALTERNATE = "import os\nfor i in range(50): os.write(1 + i % 2, b'%d\\n' % i)"


def run_captured(out_fd: int, err_fd: int, size: int = 4096) -> Capture:
    capture = Capture(size, out_fd, err_fd)
    child = Child(
        [sys.executable, "-c", ALTERNATE],
        os.environ,
        stdout=capture.child_stdout,
        stderr=capture.child_stderr,
    )
    capture.spawned()
    os.waitpid(child.pid, 0)
    capture.finish()
    capture.close()
    return capture


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_one_target_gets_one_pipe_and_the_command_s_own_order():
    """stdout and stderr on one pipe: the child writes one pipe, in its order."""
    r, w = os.pipe()
    try:
        capture = run_captured(w, w)
        assert capture.child_stdout == capture.child_stderr
        expected = b"".join(b"%d\n" % i for i in range(50))
        assert read_all(r) == expected
        assert capture.tail.text() == expected.decode()
    finally:
        os.close(r)
        os.close(w)


def test_two_targets_get_their_own_stream_each_in_order():
    """Separate targets each receive their own lines, in the order written."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        capture = run_captured(out_w, err_w, size=8)
        assert capture.child_stdout != capture.child_stderr
        assert read_all(out_r) == b"".join(b"%d\n" % i for i in range(0, 50, 2))
        assert read_all(err_r) == b"".join(b"%d\n" % i for i in range(1, 50, 2))
        assert len(capture.tail.text()) == 8
    finally:
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)
