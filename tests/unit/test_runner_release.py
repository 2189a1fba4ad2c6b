"""A release that hangs never holds leaderrun up longer than two attempt budgets."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from leaderrun.config import RawRunOptions, run_settings
from leaderrun.errors import CancelledBySignalError
from leaderrun.lease import Lease
from leaderrun.runner import Run, _Contender
from leaderrun.runs import RunEnd
from leaderrun.stores.base import Claim
from leaderrun.testing import FakeClock, InMemoryLeaseStore, InMemorySession

# A short lease, so the attempt budget (the bound under test) is under a second.
LEASE = "4s"


class HangingSession(InMemorySession):
    """A session whose release blocks until the test lets it go."""

    def __init__(self, store: InMemoryLeaseStore, gate: threading.Event) -> None:
        super().__init__(store)
        self.gate = gate
        self.close_called = threading.Event()

    def release(self, lease: Lease, end: RunEnd | None = None) -> bool:
        self.gate.wait()
        return super().release(lease, end)

    def close(self) -> None:
        self.close_called.set()
        super().close()


def test_a_cancel_does_not_wait_for_a_hanging_release(caplog):
    """SIGTERM between acquire and start: a stuck release is left behind in time."""
    settings = run_settings(
        RawRunOptions(lock_id="cancel", dsn="sqlite:///unused", lease_duration=LEASE),
        ("true",),
        {},
        now_s=0.0,
    )
    budget_s = settings.timing.attempt_budget_s
    store = InMemoryLeaseStore(FakeClock())
    gate = threading.Event()
    session = HangingSession(store, gate)
    lease = session.acquire(
        settings.lock, Claim("me", "host", 1, "true"), settings.timing.lease_s
    ).lease
    assert lease is not None
    run = Run(settings, store, {}, host="host")

    contender = _Contender(give_up_s=0.0)
    contender.own(session)

    began_s = time.monotonic()
    with pytest.raises(CancelledBySignalError) as cancelled:
        run._cancel_on([signal.SIGTERM], contender, lease)
    waited_s = time.monotonic() - began_s

    assert cancelled.value.exit_code == 128 + signal.SIGTERM
    # The bound is the behaviour: two attempt budgets, plus scheduling slack.
    assert 2 * budget_s <= waited_s < 2 * budget_s + 1.0
    assert "the release took longer than" in caplog.text
    assert not session.close_called.is_set(), "closed under a thread still using it"
    gate.set()
    assert session.close_called.wait(5), "the release thread closes the session"
