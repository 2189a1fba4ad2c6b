"""leaderrun: run a command on exactly one node at a time, with a PostgreSQL lease.

The command line is ``leaderrun --lock-id NAME -- COMMAND``; see ``leaderrun --help``
and ``man leaderrun``. As a library, :class:`LeaderElector`, :func:`leader_only` and
:func:`is_leader` elect one leader among a service's replicas (``docs/library.md``).
This package is kept light to import: psycopg, typer and
rich are loaded only by the modules that need them.
"""

from __future__ import annotations

from leaderrun.decorators import is_leader, leader_only
from leaderrun.elector import LeaderElector, current_elector, use_elector
from leaderrun.errors import (
    BusyError,
    ConfigError,
    DatabaseUnavailableError,
    LeaderrunError,
    NotLeaderError,
    UnsafeTimingError,
)
from leaderrun.lease import LockId, Timing, make_timing

__version__ = "0.1.0"

__all__ = [
    "BusyError",
    "ConfigError",
    "DatabaseUnavailableError",
    "LeaderElector",
    "LeaderrunError",
    "LockId",
    "NotLeaderError",
    "Timing",
    "UnsafeTimingError",
    "__version__",
    "current_elector",
    "is_leader",
    "leader_only",
    "make_timing",
    "use_elector",
]
