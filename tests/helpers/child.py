"""A child for acceptance tests: a handshake, then one line per signal received.

Usage: ``python child.py [--ignore-term] [--grandchild] [--events FILE]
[--exit-after SECONDS] [--exit-code N]``

It prints ``ready <pid>`` once its handlers are installed, then ``<SIGNAME> <pid>``
for every signal it gets. SIGTERM and SIGINT end it with the shell's 128+N
unless ``--ignore-term`` is given. ``--grandchild`` starts a copy of itself in
the same process group first, whose lines appear on the same stdout. With
``--events``, it appends ``start``/``stop`` lines stamped with CLOCK_BOOTTIME
(one clock for every process on the host) and its fencing token, so tests can
check that no two children of one lock ever ran at the same time.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from leaderrun.supervisor import FORWARDED_SIGNALS as SIGNALS  # what it may get


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def event(path: str | None, what: str) -> None:
    if path is None:
        return
    token = os.environ.get("LEADERRUN_FENCING_TOKEN", "-")
    stamp = time.clock_gettime(time.CLOCK_BOOTTIME)
    with open(path, "a") as f:
        f.write(f"{what} {token} {os.getpid()} {stamp:.6f}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--events")
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--exit-code", type=int, default=0)
    args = parser.parse_args()

    def on_signal(signum: int, frame: object) -> None:
        say(f"{signal.Signals(signum).name} {os.getpid()}")
        if signum in (signal.SIGTERM, signal.SIGINT) and not args.ignore_term:
            event(args.events, "stop")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for signum in SIGNALS:
        signal.signal(signum, on_signal)
    grandchild = None
    if args.grandchild:
        argv = [sys.executable, __file__]
        if args.ignore_term:
            argv.append("--ignore-term")
        grandchild = subprocess.Popen(argv)
    event(args.events, "start")
    say(f"ready {os.getpid()}")
    deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
    while deadline is None or time.monotonic() < deadline:
        time.sleep(0.05)
    event(args.events, "stop")
    if grandchild is not None:
        grandchild.terminate()
        grandchild.wait()
    sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
