"""The one clock leaderrun's deadlines use: ``CLOCK_BOOTTIME``.

``time.monotonic()`` stops while the machine is suspended, but the database's
clock does not; ``CLOCK_BOOTTIME`` keeps counting, so a deadline measured on it
cannot be overslept. The wall clock (``time.time()``) never enters lease math.
"""

from __future__ import annotations

import time


def boottime() -> float:
    """Seconds on ``CLOCK_BOOTTIME``: monotonic, and counting through suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
