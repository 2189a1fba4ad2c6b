"""Shift a process's wall clock with libfaketime, preloaded directly.

Not through the ``faketime`` wrapper: the wrapper names a POSIX semaphore after
its own pid, creates it with O_EXCL and gives up ("sem_open: File exists") when
one by that name is left in /dev/shm, and libfaketime leaves them whenever the
process that made one execs or is killed. Once pids wrap, a test failed that way
in CI. The preloaded library, finding such a name taken, just goes on without
shared memory, which these tests do not use.

The ``faketime`` fixture also removes the semaphores and segments the library
left during the test, so a run leaves /dev/shm as it found it.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SHM = Path("/dev/shm")
LEFTOVERS = ("sem.faketime_sem_*", "faketime_shm_*")


def faketime_library() -> str | None:
    """libfaketime's preload library, if the Debian package is installed."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


def faketime_env(offset: str) -> dict[str, str]:
    """Environment that shifts the wall clock of a process by ``offset`` (``+1h``).

    Fails in CI when the Debian package ``faketime`` is missing (``.ci/run``
    installs it), skips elsewhere. The monotonic clocks stay real:
    libfaketime 0.9.10 breaks clock_nanosleep when it fakes them too, and
    CLOCK_BOOTTIME is the clock leaderrun's deadline must keep.
    """
    library = faketime_library()
    if library is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("libfaketime is missing; .ci/run installs package faketime")
        pytest.skip("libfaketime is missing (Debian package faketime)")
    return {
        "LD_PRELOAD": library,
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _leftovers() -> set[Path]:
    return {path for pattern in LEFTOVERS for path in SHM.glob(pattern)}


@pytest.fixture
def faketime() -> Iterator[Callable[[str], dict[str, str]]]:
    """:func:`faketime_env`, and afterwards the removal of what libfaketime left."""
    before = _leftovers()
    yield faketime_env
    for path in _leftovers() - before:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
