"""Waiting in tests: poll a condition within a bound, never sleep and hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

WAIT_S = 60.0
"""The default bound: generous, since it only decides how long a failure takes."""

POLL_S = 0.01
"""How often the condition is checked."""


def wait_until(
    condition: Callable[..., object], what: str, timeout_s: float = WAIT_S
) -> Any:
    """Poll ``condition`` until it is truthy and return it; fail after ``timeout_s``.

    ``what`` says in the failure what was waited for.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(POLL_S)
