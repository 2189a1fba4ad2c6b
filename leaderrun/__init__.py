"""leaderrun: run a command on exactly one node at a time, with a PostgreSQL lease.

The command line is ``leaderrun --lock-id NAME -- COMMAND``; see ``leaderrun --help``
and ``man leaderrun``. This package is kept light to import: psycopg, typer and
rich are loaded only by the modules that need them.
"""

from __future__ import annotations

from leaderrun.errors import (
    BusyError,
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    UnsafeTimingError,
)
from leaderrun.lease import LockId, Timing, make_timing

__version__ = "0.1.0"

__all__ = [
    "BusyError",
    "ConfigError",
    "DatabaseUnavailableError",
    "LeaderrunError",
    "LockId",
    "Timing",
    "UnsafeTimingError",
    "__version__",
    "make_timing",
]
