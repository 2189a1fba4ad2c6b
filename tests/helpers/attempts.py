"""A call on a thread of its own, so that a test survives one that never returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Attempt:
    """A store call on a thread of its own: the test survives one that never ends."""

    started: list[Attempt] = []  # noqa: RUF012 - every attempt of the session

    def __init__(self, call: Callable[[], Any]) -> None:
        Attempt.started.append(self)
        self.began_s = time.monotonic()
        self.took_s = 0.0
        self.value: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.value = call()
        except BaseException as exc:
            self.error = exc
        finally:
            self.took_s = time.monotonic() - self.began_s

    @classmethod
    def all_ended(cls, limit_s: float) -> bool:
        """Wait up to ``limit_s`` for every attempt to end; whether they all did."""
        deadline_s = time.monotonic() + limit_s
        for attempt in cls.started:
            attempt._thread.join(max(0.0, deadline_s - time.monotonic()))
        return not any(attempt._thread.is_alive() for attempt in cls.started)

    def error_within(self, limit_s: float) -> BaseException:
        """The error the call raised within ``limit_s``; fails if it did not."""
        self._thread.join(limit_s)
        assert not self._thread.is_alive(), (
            f"the call was still waiting after {limit_s:.3g}s: it is not bounded"
        )
        assert self.error is not None, f"the call returned {self.value!r}"
        return self.error
