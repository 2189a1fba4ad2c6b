"""Calls with a time bound that the caller's thread never waits past.

Every statement leaderrun sends can hang: a row lock held by someone's open
transaction, a frozen server, a blackholed socket, a SQLite file another process
keeps locked. The statement therefore runs on a worker thread, and the caller
waits for it at most its bound. If the bound passes, or a signal handler raises
in the waiting thread (the main thread's cancellable sections, see
:meth:`leaderrun.supervisor.SignalInbox.cancelling`), the call is *abandoned*:
``interrupt`` asks the statement to stop (a cancel request, ``sqlite3_interrupt``)
without blocking, and ``cleanup`` (closing the connection) runs on whichever
thread is last to touch the call, never concurrently with the statement: a
driver connection is not closed from under a thread that is still using it.

Pure standard library; the stores give the driver-specific ``interrupt`` and
``cleanup``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

_T = TypeVar("_T")


class CallTimedOut(Exception):
    """The call did not finish within its bound; it was abandoned."""

    def __init__(self, bound_s: float) -> None:
        super().__init__(f"no result within {bound_s:.3g}s")
        self.bound_s = bound_s


class _Call(Generic[_T]):
    """One call on its worker thread, and who cleans up after it."""

    def __init__(self, work: Callable[[], _T], cleanup: Callable[[], None]) -> None:
        self._work = work
        self._cleanup = cleanup
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._abandoned = False
        self._result: _T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._work()
        except BaseException as exc:  # handed to the caller, or dropped if abandoned
            self._error = exc
        with self._lock:
            self._done.set()
            late = self._abandoned
        if late:
            self._cleanup()

    def wait(self, bound_s: float) -> bool:
        return self._done.wait(bound_s)

    def abandon(self) -> bool:
        """Give up the call if it is still running; True if it was.

        The worker then runs the cleanup when the statement returns. False
        means it finished after all, and its outcome is there to take.
        """
        with self._lock:
            if self._done.is_set():
                return False
            self._abandoned = True
            return True

    def outcome(self) -> _T:
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # set when no error


def call_bounded(
    work: Callable[[], _T],
    bound_s: float,
    *,
    interrupt: Callable[[], None],
    cleanup: Callable[[], None],
    name: str = "leaderrun-statement",
) -> _T:
    """Run ``work`` on a worker thread; return its result within ``bound_s``.

    ``work``'s own exceptions are re-raised here. Once the call is abandoned,
    ``interrupt`` is called (it must not block) and ``cleanup`` runs exactly once,
    after ``work`` returned, on the worker thread or here.

    Raises:
        CallTimedOut: ``bound_s`` passed first; the call was abandoned.
        BaseException: whatever a signal handler raised while this thread
            waited (the call was abandoned first).
    """
    call: _Call[_T] = _Call(work, cleanup)
    worker = threading.Thread(target=call.run, name=name, daemon=True)
    try:
        worker.start()
        finished = call.wait(bound_s)
    except BaseException:
        # A signal handler raised in this (the main) thread while it waited, or
        # the worker could not start (a pids limit): give the statement up. A
        # result that came in meanwhile is dropped with its connection.
        if worker.ident is None:
            cleanup()
        elif call.abandon():
            interrupt()
        else:
            cleanup()
        raise
    if not finished and call.abandon():
        interrupt()
        raise CallTimedOut(bound_s)
    # Finished: the worker has only its exit left. Joining it keeps the rule that
    # no statement thread is alive when the main thread forks the child.
    worker.join()
    return call.outcome()
