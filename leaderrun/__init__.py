"""leaderrun: run a command on exactly one node at a time, with a PostgreSQL lease.

The command line is ``leaderrun --lock-id NAME -- COMMAND``; see ``leaderrun --help``
and ``man leaderrun``. As a library, :class:`LeaderElector`, :func:`leader_only` and
:func:`is_leader` elect one leader among a service's replicas (``docs/library.md``).
This package is kept light to import: psycopg, typer and
rich are loaded only by the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# Resolved on first use (PEP 562): the command line imports this package on
# every start, and the library's elector and decorators are not its business.
_LAZY = {
    "is_leader": "leaderrun.decorators",
    "leader_only": "leaderrun.decorators",
    "LeaderElector": "leaderrun.elector",
    "current_elector": "leaderrun.elector",
    "use_elector": "leaderrun.elector",
    "BusyError": "leaderrun.errors",
    "ConfigError": "leaderrun.errors",
    "DatabaseUnavailableError": "leaderrun.errors",
    "LeaderrunError": "leaderrun.errors",
    "NotLeaderError": "leaderrun.errors",
    "UnsafeTimingError": "leaderrun.errors",
    "LockId": "leaderrun.lease",
    "Timing": "leaderrun.lease",
    "make_timing": "leaderrun.lease",
}

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


def __getattr__(name: str) -> object:
    """Import a public name's module the first time the name is used."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'leaderrun' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
