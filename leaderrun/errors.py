"""Every error leaderrun raises on purpose, each with the exit status it maps to.

The docstring of each class is its default message; the command line prints
``leaderrun: <message>`` and exits with ``exit_code``.
"""

from __future__ import annotations

# Exit statuses with a meaning of their own; everything else is the child's.
EXIT_USAGE = 64  # EX_USAGE: bad flags or values (not click's 2, which children use)
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the database cannot be used; nothing ran
EXIT_OSERR = 71  # EX_OSERR: a system resource the run needs is missing; nothing ran
EXIT_BUSY = 75  # EX_TEMPFAIL: another node holds the lock
EXIT_LEASE_LOST = 122  # the lease was lost while the child ran; it was stopped
EXIT_TIMEOUT = 124  # --max-runtime passed; the child was stopped (as timeout(1))
EXIT_INTERNAL = 125  # leaderrun itself failed after the child started
EXIT_NOT_EXECUTABLE = 126  # as a shell does
EXIT_NOT_FOUND = 127  # as a shell does
EXIT_STATUS_FREE = 3  # `status`: the lock is free (the LSB "not running" code)


def signal_status(signum: int) -> int:
    """A shell's exit status for death by signal ``signum``: 128 + N."""
    return 128 + signum


class LeaderrunError(Exception):
    """leaderrun failed."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip().rstrip("."))

    @property
    def message(self) -> str:
        """The one-line message shown to the user."""
        return str(self.args[0])


class ConfigError(LeaderrunError):
    """The configuration is invalid."""

    exit_code = EXIT_USAGE


class UnsafeTimingError(ConfigError):
    """The timing options cannot stop the child before the lease expires."""


class DatabaseUnavailableError(LeaderrunError):
    """The database is unreachable or unusable; the command was not run."""

    exit_code = EXIT_UNAVAILABLE


class StatementTimeoutError(DatabaseUnavailableError):
    """A statement did not finish within its bound; it was cancelled."""


class ListenRefusedError(DatabaseUnavailableError):
    """The server (or a proxy in front of it) refused LISTEN."""


class InvariantError(LeaderrunError):
    """leaderrun broke one of its own invariants: a bug, please report it."""


class SchemaMissingError(DatabaseUnavailableError):
    """The lease table does not exist and this role may not create it."""


# Exit 69 like every table leaderrun cannot use (the database is unusable as
# configured, and nothing ran), not 64: only the database can tell. A waiting
# node does not retry it, as it does not retry a missing table.
class ForeignTableError(SchemaMissingError):
    """A table in leaderrun's place is not leaderrun's; it was left alone."""


class SystemResourceError(LeaderrunError):
    """A system resource the run needs (its watchdog, a pidfd) is unavailable."""

    exit_code = EXIT_OSERR


class BusyError(LeaderrunError):
    """Another node holds the lock; the command was not run."""

    exit_code = EXIT_BUSY


class CommandNotFoundError(LeaderrunError):
    """The command was not found."""

    exit_code = EXIT_NOT_FOUND


class CommandNotExecutableError(LeaderrunError):
    """The command cannot be executed."""

    exit_code = EXIT_NOT_EXECUTABLE


class CancelledBySignalError(LeaderrunError):
    """A signal arrived before the command started; nothing ran."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = signal_status(signum)


class NotLeaderError(LeaderrunError):
    """This process is not the leader; the function did not run."""

    exit_code = EXIT_BUSY
