"""Host clocks for SQLite store tests: set by hand, wall-shifted, or stuck."""

from __future__ import annotations

import threading
import uuid

from leaderrun.stores.host import HostClock, Instant


def other_boot_id() -> str:
    """A boot id that is not this boot's."""
    return str(uuid.uuid4())


class SetClock(HostClock):
    """Clocks that read what the test set: no sleeping to see a lease end."""

    def __init__(self, boot_id: str, boot_s: float, unix_s: float) -> None:
        super().__init__(boot_id)
        self.boot_s = boot_s
        self.unix_s = unix_s

    def now(self) -> Instant:
        """The instant the test set."""
        return Instant(self.boot_id, self.boot_s, self.unix_s)

    def advance(self, seconds: float) -> None:
        """Let both clocks run ``seconds``."""
        self.boot_s += seconds
        self.unix_s += seconds


class ShiftedWall(HostClock):
    """The real clocks, with the wall clock stepped by ``offset_s``."""

    def __init__(self, offset_s: float) -> None:
        real = HostClock.read()
        super().__init__(real.boot_id, real.boottime_offset_s)
        self.offset_s = offset_s

    def now(self) -> Instant:
        """The real instant, its wall clock shifted."""
        real = super().now()
        return Instant(real.boot_id, real.boot_s, real.unix_s + self.offset_s)


class StuckClock(HostClock):
    """The real clocks, but a read blocks until released: a stalled write.

    It is read inside the write transaction, with the write lock held, so a
    stuck read stands for a disk that stopped answering mid-transaction.
    """

    def __init__(self) -> None:
        real = HostClock.read()
        super().__init__(real.boot_id, real.boottime_offset_s)
        self.entered = threading.Event()
        self.release = threading.Event()

    def now(self) -> Instant:
        """Block until released, then read the real clocks."""
        self.entered.set()
        self.release.wait(60)
        return super().now()
