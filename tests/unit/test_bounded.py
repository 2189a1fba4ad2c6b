"""call_bounded: a result within the bound, or an abandoned call cleaned up once."""

import os
import signal
import threading

import pytest

from leaderrun.bounded import CallTimedOut, call_bounded


class Recorder:
    def __init__(self) -> None:
        self.interrupted = 0
        self.cleaned: list[str] = []  # the thread each cleanup ran on
        self.released = threading.Event()

    def interrupt(self):
        self.interrupted += 1
        self.released.set()

    def cleanup(self):
        self.cleaned.append(threading.current_thread().name)


def test_a_result_in_time_is_returned_and_nothing_is_cleaned_up():
    """A call that finishes within its bound is an ordinary call."""
    r = Recorder()
    assert call_bounded(lambda: 42, 5.0, interrupt=r.interrupt, cleanup=r.cleanup) == 42
    assert (r.interrupted, r.cleaned) == (0, [])


def test_the_work_s_own_error_is_raised_in_the_caller():
    """An exception of the statement reaches the caller as itself."""
    r = Recorder()

    def fail():
        raise ValueError("statement failed")

    with pytest.raises(ValueError, match="statement failed"):
        call_bounded(fail, 5.0, interrupt=r.interrupt, cleanup=r.cleanup)
    assert (r.interrupted, r.cleaned) == (0, [])


def test_a_call_past_its_bound_is_interrupted_and_cleaned_up_by_its_worker():
    """Past the bound the caller gets CallTimedOut at once; the statement is
    interrupted, and the connection is closed by the worker once it returns."""
    r = Recorder()
    finished = threading.Event()

    def hang():
        r.released.wait(10)  # a statement that returns once interrupted
        finished.set()

    with pytest.raises(CallTimedOut):
        call_bounded(hang, 0.05, interrupt=r.interrupt, cleanup=r.cleanup, name="w")
    assert r.interrupted == 1
    assert finished.wait(5)
    for _ in range(100):
        if r.cleaned:
            break
        threading.Event().wait(0.01)
    assert r.cleaned == ["w"], "cleaned up once, on the worker, after it returned"


def test_a_signal_handler_raising_in_the_waiting_thread_abandons_the_call():
    """A cancelling signal in the main thread's wait abandons the statement."""
    r = Recorder()

    class Cancelled(Exception):
        pass

    def handler(signum, frame):
        raise Cancelled

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with pytest.raises(Cancelled):
            call_bounded(
                lambda: r.released.wait(10),
                30.0,
                interrupt=r.interrupt,
                cleanup=r.cleanup,
            )
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert r.interrupted == 1
