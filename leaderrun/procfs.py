"""What /proc says about processes: children, process groups, who may be signalled.

Shared by the supervisor and the watchdog, which must find the same processes.
Children come from ``/proc/PID/task/TID/children``, which kernels built without
CONFIG_PROC_CHILDREN do not have; there, and only there, every process's
``stat`` is scanned for its parent instead (slower, as complete).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

PROC = "/proc"

CAP_KILL = 5
"""The capability to signal any process (capability.h)."""


def _stat_fields(pid: int, proc: str = PROC) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None if gone.

    The name is in parentheses and may itself hold spaces and parentheses, so the
    fields are what follows the *last* ``)``: state, ppid, pgrp, session, ...
    """
    try:
        with open(f"{proc}/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    _, _, rest = text.rpartition(")")
    fields = rest.split()
    return fields if len(fields) >= 4 else None


def running(pid: int, proc: str = PROC) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie runs nothing)."""
    fields = _stat_fields(pid, proc)
    return fields is not None and fields[0] != "Z"


def process_group(pid: int, proc: str = PROC) -> int | None:
    """The process group of ``pid``, or None if it is gone."""
    fields = _stat_fields(pid, proc)
    return None if fields is None else int(fields[2])


def _pids(proc: str) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(entry) for entry in os.listdir(proc) if entry.isdigit()]
    return []


def _children_files(pid: int, proc: str) -> list[int] | None:
    """Children from the per-thread ``children`` files; None where there are none."""
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return []  # the process is gone: it has no children
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"{proc}/{pid}/task/{tid}"):
                continue  # that thread ended
            return None  # the thread is there, its file is not: no such files
        except OSError:
            continue
    return found


def _children_by_scan(pid: int, proc: str) -> list[int]:
    """Children found by reading every process's parent: the fallback."""
    found = []
    for other in _pids(proc):
        fields = _stat_fields(other, proc)
        if fields is not None and int(fields[1]) == pid:
            found.append(other)
    return found


def children(pid: int, proc: str = PROC) -> list[int]:
    """The direct children of ``pid`` (zombies included)."""
    listed = _children_files(pid, proc)
    return _children_by_scan(pid, proc) if listed is None else listed


def descendants(pid: int, proc: str = PROC) -> list[int]:
    """Every descendant of ``pid``, parents before their children."""
    found: list[int] = []
    stack = [pid]
    while stack:
        kids = children(stack.pop(), proc)
        found.extend(kids)
        stack.extend(kids)
    return found


def group_members(pgid: int, proc: str = PROC) -> list[int]:
    """Every process whose process group is ``pgid``."""
    return [p for p in _pids(proc) if process_group(p, proc) == pgid]


def may_signal(pid: int, kill: Callable[[int, int], None] = os.kill) -> bool:
    """Whether we may signal ``pid``; True also when it is gone (nothing to stop).

    False for a process that runs as another user while we lack CAP_KILL: a
    setuid program that set all its ids (sudo's command), seen from a non-root
    leaderrun. Such a process outlives every signal we could send.
    """
    try:
        kill(pid, 0)
    except PermissionError:
        return False
    except ProcessLookupError:
        return True
    return True


def uid_of(pid: int, proc: str = PROC) -> int | None:
    """The real uid of ``pid``, or None if it is gone."""
    try:
        with open(f"{proc}/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def name_of(pid: int, proc: str = PROC) -> str:
    """The command name of ``pid`` (``comm``), or ``?`` if it is gone."""
    try:
        with open(f"{proc}/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return "?"


def has_capability(cap: int, proc: str = PROC) -> bool:
    """Whether this process has capability ``cap`` in its effective set."""
    try:
        with open(f"{proc}/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0  # no /proc: root is the best guess
