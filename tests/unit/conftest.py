"""Fixtures the unit tests share: a fake clock, and the in-memory store on it."""

from __future__ import annotations

import pytest

from leaderrun.testing import FakeClock, InMemoryLeaseStore


@pytest.fixture
def clock() -> FakeClock:
    """A clock that moves only when the test advances it."""
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> InMemoryLeaseStore:
    """The in-memory store, its "database clock" being ``clock``."""
    return InMemoryLeaseStore(clock)
