"""The job that fault tests run under leaderrun: it records when it starts.

Usage: ``job.py EVENTS [--ignore-term] [--grandchildren N] [--daemonize]
[--exit-after SECONDS] [--chatter]``

Every process of the job (itself, its grandchildren in its process group, and
with ``--daemonize`` one that leaves the group with ``setsid`` after a double
fork) appends ``start <token> <pid> <boottime>`` to EVENTS, one ``write`` per
line on an ``O_APPEND`` file, and then runs until it is killed (or, for the job
itself, until ``--exit-after``). With ``--chatter`` the job writes a line to
its stdout and one to its stderr every 10 ms, from a thread, while it runs.
When each process disappeared is recorded by the test, not here: a SIGKILLed
process cannot say.

CLOCK_BOOTTIME is one clock for every process on the host. Under libfaketime
(``LD_PRELOAD``), the job first re-executes itself without it, so that its
stamps are on the real clock whatever leaderrun's clock says.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time


def append(path: str, line: str) -> None:
    """Add ``line`` to ``path`` in one write(2) on an O_APPEND file, so that
    lines from many processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record(path: str) -> None:
    token = os.environ.get("LEADERRUN_FENCING_TOKEN", "-")
    stamp = time.clock_gettime(time.CLOCK_BOOTTIME)
    append(path, f"start {token} {os.getpid()} {stamp:.6f}\n")


def idle_forever() -> None:
    while True:
        signal.pause()


def chatter() -> None:
    line = 0
    while True:
        line += 1
        for fd in (1, 2):
            os.write(fd, b"chatter %d\n" % line)
        time.sleep(0.01)


def main() -> None:
    if "LD_PRELOAD" in os.environ:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser()
    parser.add_argument("events")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchildren", type=int, default=0)
    parser.add_argument("--daemonize", action="store_true")
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--chatter", action="store_true")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(args.events)
    if args.chatter:
        threading.Thread(target=chatter, daemon=True).start()
    for _ in range(args.grandchildren):
        if os.fork() == 0:
            record(args.events)
            idle_forever()
    if args.daemonize and os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            record(args.events)
            idle_forever()
        os._exit(0)
    if args.exit_after is None:
        idle_forever()
    time.sleep(args.exit_after)


if __name__ == "__main__":
    main()
