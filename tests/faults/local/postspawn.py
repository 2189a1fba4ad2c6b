"""Run ``leaderrun`` with a failure injected just after its command started.

Usage: ``postspawn.py pidfd|thread LEADERRUN-ARGS...``

``pidfd``: ``os.pidfd_open`` of the command fails with EMFILE (a full descriptor
table; ENOSYS before Linux 5.3 and EPERM under some seccomp profiles are caught
before the lease is taken). ``thread``: the renewal thread cannot start (a pids
cgroup limit). Only these calls are wrapped; leaderrun's code is untouched.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

from leaderrun.cli import main


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def inject(mode: str) -> None:
    if mode == "pidfd":
        real_open = os.pidfd_open

        def pidfd_open(pid: int, flags: int = 0) -> int:
            # Our own child is the command (the watchdog was double-forked away).
            if pid != os.getpid() and parent_of(pid) == os.getpid():
                raise OSError(errno.EMFILE, "Too many open files (injected)")
            return real_open(pid, flags)

        os.pidfd_open = pidfd_open
        return
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "leaderrun-renewer":
            raise RuntimeError("can't start new thread (injected)")
        real_start(self)

    threading.Thread.start = start  # type: ignore[method-assign]


if __name__ == "__main__":
    inject(sys.argv.pop(1))
    sys.argv[0] = "leaderrun"
    main()
