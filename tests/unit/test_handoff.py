"""The waiter's sleep: woken by its turn, a signal or the timeout, and nothing else.

The listener here is a pipe standing in for the database socket: what is under
test is which readiness ends the sleep, and what a refused or broken LISTEN does,
on the lease session or on a connection of its own (``--listen-dsn``). The real
connection is tested in tests/integration/test_notify.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from leaderrun.errors import DatabaseUnavailableError, ListenRefusedError
from leaderrun.handoff import Handoff
from leaderrun.lease import LockId

LOCK = LockId(7, "nightly")
HOLDER = "host:1:0123456789abcdef"
LONG_S = 30.0
"""A timeout that must not be reached when something else ends the sleep."""


class PipeListener:
    """A listener whose socket is a pipe; each written byte is one message.

    ``b"R"`` is a release of our lock, ``b"x"`` anything else (a notice, another
    channel), ``b"!"`` a broken connection.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.closed = False
        self.drains = 0

    def send(self, message: bytes) -> None:
        os.write(self.write_fd, message)

    def fileno(self) -> int:
        return self.read_fd

    def drain(self) -> bool:
        self.drains += 1
        data = b""
        try:
            while chunk := os.read(self.read_fd, 64):
                data += chunk
        except BlockingIOError:
            pass
        if b"!" in data:
            raise DatabaseUnavailableError("the listening connection failed: EOF")
        return b"R" in data

    def close(self) -> None:
        if not self.closed:
            os.close(self.read_fd)
            os.close(self.write_fd)
        self.closed = True


class ListeningStore:
    """A store with ``listen``; failures to raise are queued in ``errors``."""

    def __init__(self) -> None:
        self.listeners: list[PipeListener] = []
        self.errors: list[Exception] = []

    def listen(self, lock: LockId, holder: str) -> PipeListener:
        assert (lock, holder) == (LOCK, HOLDER)
        if self.errors:
            raise self.errors.pop(0)
        self.listeners.append(PipeListener())
        return self.listeners[-1]


class ListeningSession:
    """A lease session that listens on itself (``listen_here``)."""

    def __init__(self) -> None:
        self.listeners: list[PipeListener] = []

    def listen_here(self, lock: LockId, holder: str) -> PipeListener:
        assert (lock, holder) == (LOCK, HOLDER)
        self.listeners.append(PipeListener())
        return self.listeners[-1]


class SteppingClock:
    """A monotonic clock that jumps by ``step_s`` each time it is read."""

    def __init__(self, step_s: float) -> None:
        self.now_s = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now_s += self.step_s
        return self.now_s


@pytest.fixture
def signals() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


@pytest.fixture
def store() -> ListeningStore:
    return ListeningStore()


def test_a_release_ends_the_sleep(store, signals):
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    assert handoff.listen(None)
    store.listeners[0].send(b"R")
    assert handoff.wait(signals[0], LONG_S) is True


def test_other_traffic_on_the_connection_does_not_end_the_sleep(store, signals):
    handoff = Handoff(LOCK, HOLDER, listen_store=store, clock=SteppingClock(0.4))
    assert handoff.listen(None)
    store.listeners[0].send(b"x")
    # The clock passes the 1 s timeout after a few reads: the wait returns
    # False (timed out) after draining the noise, never True.
    assert handoff.wait(signals[0], 1.0) is False
    assert store.listeners[0].drains == 1


def test_a_signal_ends_the_sleep_without_a_release(store, signals):
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    handoff.listen(None)
    os.write(signals[1], b"\0")
    assert handoff.wait(signals[0], LONG_S) is False


def test_without_a_listener_the_sleep_lasts_the_timeout(signals):
    handoff = Handoff(LOCK, HOLDER)
    assert handoff.listen(object()) is False  # a session that cannot listen
    assert not handoff.listening
    assert handoff.wait(signals[0], 0.05) is False


def test_a_broken_listener_is_dropped_and_the_sleep_goes_on(store, signals):
    handoff = Handoff(LOCK, HOLDER, listen_store=store, clock=SteppingClock(0.4))
    handoff.listen(None)
    broken = store.listeners[0]
    broken.send(b"!")
    assert handoff.wait(signals[0], 1.0) is False
    assert broken.closed
    assert not handoff.listening
    # The next wake-up subscribes again (and the caller then looks once more).
    assert handoff.listen(None) is True
    assert len(store.listeners) == 2


def test_a_refused_listen_is_never_asked_again(store):
    store.errors.append(ListenRefusedError("LISTEN refused: not supported"))
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    assert handoff.listen(None) is False
    assert handoff.listen(None) is False
    assert store.listeners == []
    assert store.errors == []  # asked exactly once


def test_an_unreachable_listen_is_tried_again_at_the_next_wake(store):
    store.errors.append(DatabaseUnavailableError("too many connections for role"))
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    assert handoff.listen(None) is False
    assert handoff.listen(None) is True
    assert handoff.listening


def test_listen_subscribes_once(store):
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    assert handoff.listen(None) is True
    assert handoff.listen(None) is False
    assert len(store.listeners) == 1


def test_disabled_never_listens(store):
    handoff = Handoff(LOCK, HOLDER, listen_store=store, enabled=False)
    assert handoff.listen(None) is False
    assert store.listeners == []


def test_close_closes_the_listener_once(store):
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    handoff.listen(None)
    handoff.close()
    handoff.close()
    assert store.listeners[0].closed
    assert not handoff.listening


def test_the_lease_session_listens_once_and_is_woken(signals):
    """Without --listen-dsn the waiter listens on its lease session: one connection."""
    session = ListeningSession()
    handoff = Handoff(LOCK, HOLDER)
    assert handoff.listen(session) is True  # its next acquire carries the LISTEN
    assert handoff.listen(session) is False
    session.listeners[0].send(b"R")
    assert handoff.wait(signals[0], LONG_S) is True


def test_a_new_session_after_a_reconnect_listens_again():
    first, second = ListeningSession(), ListeningSession()
    handoff = Handoff(LOCK, HOLDER)
    assert handoff.listen(first) is True
    assert handoff.listen(second) is True
    assert first.listeners[0].closed  # forgotten (the session closes itself)
    assert len(second.listeners) == 1


def test_with_a_listen_store_the_lease_session_is_not_listened_on(store):
    session = ListeningSession()
    handoff = Handoff(LOCK, HOLDER, listen_store=store)
    assert handoff.listen(session) is True
    assert session.listeners == []
    assert len(store.listeners) == 1


def test_a_wake_up_heard_during_the_last_statement_ends_the_sleep_at_once(signals):
    """The session noted it while a statement ran: drain says so before select."""
    session = ListeningSession()
    handoff = Handoff(LOCK, HOLDER, clock=SteppingClock(100.0))
    handoff.listen(session)
    session.listeners[0].send(b"R")
    assert handoff.wait(signals[0], LONG_S) is True
    assert session.listeners[0].drains == 1
