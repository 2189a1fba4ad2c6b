"""``leaderrun`` and ``python -m leaderrun``: the CLI, then an exit without teardown.

A normal interpreter exit tears down every module psycopg and typer loaded,
which costs about as much as running the lease statements (bench/RESULTS.md).
By the time :func:`leaderrun.cli.main` returns, the command and its process
group are gone, the lease is released and the connection closed; all that is
left to do is flush our own output, so leaderrun leaves with ``os._exit``.

The garbage collector is off while leaderrun starts: importing typer, psycopg
and our modules allocates some 40 000 objects that live as long as the process,
and the collector would scan them again and again (8 ms or so, paid on every
node at every run). The command turns it back on once its modules are loaded
(``leaderrun.cli.collect_from_here``), after freezing what start-up built.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import threading
from typing import NoReturn

from leaderrun.logsink import EXIT_FLUSH_S, stderr_sink


def exit_code(code: object) -> int:
    """The process status for a ``SystemExit`` code, as the interpreter maps it.

    None is 0, an integer is itself, anything else is printed to stderr and is 1.
    """
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def main() -> NoReturn:
    """Run ``leaderrun`` with ``sys.argv``; flush stdout and stderr; ``os._exit``."""
    gc.disable()  # until the command's modules are loaded: see above
    from leaderrun.cli import main as cli_main

    try:
        cli_main()
    except SystemExit as exc:  # cli.main() always ends this way
        status = exit_code(exc.code)
    # As the interpreter would: let non-daemon threads (a release still under
    # way) finish before leaving.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    for stream in (sys.stdout, sys.stderr):
        # A closed pipe (`leaderrun --help | head -1`): nothing more can be said,
        # and the status matters more than the lost text.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    # Our own messages: a slow reader gets them, a stalled one cannot hold the
    # exit (the child is gone and the lease released; only words are at stake).
    stderr_sink().flush(EXIT_FLUSH_S)
    os._exit(status)


if __name__ == "__main__":
    main()
