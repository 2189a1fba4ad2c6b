"""The watchdog: stops the child's group on time when leaderrun itself cannot.

The supervisor enforces the kill deadline from leaderrun's main thread. If the
whole leaderrun process is stopped (SIGSTOP, a debugger, a swap storm, a frozen
cgroup), no thread of it runs, the lease expires in the database, another node
takes over, and the old child runs on: the one gap a plain lease leaves
(lease-safety F2).

The watchdog is a second, tiny process that shares nothing with leaderrun but a
pipe. The supervisor tells it the child's process group, then the kill deadline
after every renewal; if a deadline passes without being moved, the watchdog does
what the supervisor would have done: SIGTERM to the group and to every
descendant of leaderrun, SIGKILL after the kill grace. It also SIGKILLs the
group when the pipe closes without a disarm, i.e. when leaderrun died abruptly
(``kill -9``): the parent-death signal reaches only the direct child, not the
grandchildren in its group.

It is forked (twice, so that it is not leaderrun's child and never shows up
among the processes the supervisor reaps and waits for) from the main thread
at the start of a run, before the lease is taken, so that a run that needs one
and cannot have one takes nothing. It closes every inherited descriptor but its
pipe and stderr, starts its own session so that terminal signals and a ``kill
-STOP`` of leaderrun's group do not reach it, calls itself ``lrun-watchdog`` (so
``pkill leaderrun`` does not match it), ignores TERM, INT and HUP, and exits
only when the pipe closes: leaderrun's own end, however it came.

Neither side ever blocks on the other: the supervisor's end of the pipe is
non-blocking (a message that does not fit waits for the next tick, the newest
deadline replacing an older one), so a stopped or wedged watchdog cannot stop
the supervisor; and the watchdog signals first and logs after, through its own
never-blocking log sink, so a stalled stderr cannot delay its kill.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import logging
import math
import os
import select
import signal
import struct
import warnings
from collections.abc import Callable

from leaderrun import procfs
from leaderrun.clock import boottime
from leaderrun.logsink import EXIT_FLUSH_S, stderr_sink

log = logging.getLogger("leaderrun")

WATCHDOG_LATE_S = 0.1
"""The watchdog acts this long after the deadline the supervisor itself acts on.

A running supervisor has then already begun the stop and told the watchdog, so
the child never gets SIGTERM twice. It is within the kill-confirm allowance K of
the timing inequality, as the watchdog's SIGKILL lands at most this much later.
"""

WATCHDOG_TICK_S = 0.05
"""The watchdog re-reads CLOCK_BOOTTIME this often (select counts monotonic time)."""

NAME = b"lrun-watchdog"
"""The watchdog's process name (``comm``): ``pkill leaderrun`` must not match it."""

IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""What ``pkill``, a terminal or a logout send: the watchdog outlives them all, to
end only with leaderrun (its pipe closing)."""

# 16 bytes, atomic on a pipe (<= PIPE_BUF): kind, the process group (ARM), and
# an instant on CLOCK_BOOTTIME.
_MESSAGE = struct.Struct("<B3xid")
_ARM, _DEADLINE, _STOPPING, _DISARM = 1, 2, 3, 4
_PR_SET_NAME = 15

libc = ctypes.CDLL(None, use_errno=True)
"""The C library, for prctl(). Loaded at import, before any fork: dlopen() in a
forked child of a threaded parent can deadlock on the loader's lock."""


class Watchdog:
    """The supervisor's end of the watchdog process.

    Args:
        kill_grace_s: SIGTERM to SIGKILL, as for the supervisor's own stop.
        clock: CLOCK_BOOTTIME (the watchdog's own loop always uses the real one).
    """

    def __init__(
        self, kill_grace_s: float, clock: Callable[[], float] = boottime
    ) -> None:
        self.kill_grace_s = kill_grace_s
        self.clock = clock
        self.fed_deadline_s = math.inf
        self.pid: int | None = None
        """The watchdog's pid, once started."""
        self.pidfd = -1
        """Readable once the watchdog has died (-1: not watched)."""
        self._write_fd = -1
        # Messages the pipe had no room for (the watchdog stopped or wedged);
        # sent before anything newer, at the next message or tick.
        self._unsent: collections.deque[bytes] = collections.deque()

    def start(self) -> None:
        """Fork the watchdog; call from the main thread, before any lease is taken.

        Raises:
            OSError: it could not be forked (a pids limit).
        """
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
        owner_pid = os.getpid()
        # No signal may run a Python handler of leaderrun's in the new process
        # (it would write to leaderrun's wakeup pipe) before the handlers are reset.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns when forking with threads alive. The only one
                # here may be the log writer, which holds no lock the new process
                # needs: it resets its own sink (leaderrun.logsink) and execs nothing.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the intermediate process
                os.close(write_fd)
                os.close(pid_r)
                _become_watchdog(read_fd, pid_w, owner_pid, self.kill_grace_s)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_fd)
            os.close(pid_w)
        os.waitpid(pid, 0)  # the intermediate exits at once; the watchdog lives on
        with os.fdopen(pid_r, "rb") as reply:
            told = reply.read()
        if not told:
            os.close(write_fd)
            raise OSError("the watchdog process could not be started")
        self.pid = int(told)
        # Non-blocking: a watchdog that stopped reading must not stop us.
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except OSError:
            # No pidfds here (Linux < 5.3, a seccomp profile): died() reads /proc.
            self.pidfd = -1

    def arm(self, pgid: int, deadline_s: float) -> None:
        """Watch the process group ``pgid`` (the child's) with its first deadline.

        One message: a watchdog that knew the group but not yet a deadline would
        never act, should leaderrun be stopped before its first feed.
        """
        self.fed_deadline_s = deadline_s
        self._send(_ARM, deadline_s, pgid)

    def feed(self, deadline_s: float) -> None:
        """Move the instant (CLOCK_BOOTTIME) at which the watchdog stops the group."""
        if deadline_s != self.fed_deadline_s:
            self.fed_deadline_s = deadline_s
            self._send(_DEADLINE, deadline_s)
        elif self._unsent:
            self._flush()

    def stopping(self, kill_at_s: float) -> None:
        """The supervisor sent SIGTERM: only SIGKILL at ``kill_at_s``, if it stalls."""
        self._send(_STOPPING, kill_at_s)

    def disarm(self) -> None:
        """The group is gone: never signal it again."""
        self._send(_DISARM, 0.0)
        self.fed_deadline_s = math.inf

    def died(self) -> bool:
        """Whether the watchdog process is gone (or a zombie: it runs nothing)."""
        if self.pid is None or self._write_fd < 0:
            return False
        if self.pidfd < 0:
            return not procfs.running(self.pid)
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(ready)

    def close(self) -> None:
        """Close the pipe; the watchdog exits when it reads the end."""
        for fd in (self._write_fd, self.pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._write_fd = self.pidfd = -1

    def _send(self, kind: int, value: float, pgid: int = 0) -> None:
        if self._write_fd < 0:
            return
        message = _MESSAGE.pack(kind, pgid, value)
        if kind == _DEADLINE and self._unsent:
            # Only the newest deadline matters; an older one waiting is replaced.
            last = self._unsent[-1]
            if last[0] == _DEADLINE:
                self._unsent.pop()
        self._unsent.append(message)
        self._flush()

    def _flush(self) -> None:
        while self._unsent:
            try:
                os.write(self._write_fd, self._unsent[0])
            except BlockingIOError:
                return  # the watchdog is not reading (stopped): try at the next
            except OSError:
                # The watchdog is gone: the supervisor sees its pidfd and says so.
                self._unsent.clear()
                return
            self._unsent.popleft()


def _become_watchdog(
    read_fd: int, pid_w: int, owner_pid: int, kill_grace_s: float
) -> None:
    """Runs in the forked process; never returns.

    The intermediate writes the watchdog's pid to ``pid_w`` before it exits.
    """
    status = 1
    try:
        gc.disable()  # no finalizer of an inherited object (a connection) may run
        signal.set_wakeup_fd(-1)
        for signum in signal.valid_signals():
            if signum in (signal.SIGKILL, signal.SIGSTOP):
                continue
            with contextlib.suppress(OSError, ValueError):
                signal.signal(signum, signal.SIG_DFL)
        # A reader of stderr that went away must not kill the watchdog, and
        # neither may `pkill`, a terminal or a logout: it ends with its pipe.
        for ignored in (signal.SIGPIPE, *IGNORED_SIGNALS):
            signal.signal(ignored, signal.SIG_IGN)
        os.setsid()
        watchdog_pid = os.fork()
        if watchdog_pid != 0:
            os.write(pid_w, str(watchdog_pid).encode())
            os._exit(0)  # the intermediate; the watchdog is reparented
        os.close(pid_w)
        libc.prctl(_PR_SET_NAME, NAME, 0, 0, 0)
        _close_inherited(read_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _watch(3, owner_pid, kill_grace_s)
        status = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("the watchdog failed")
    finally:
        with contextlib.suppress(BaseException):
            stderr_sink().flush(EXIT_FLUSH_S)
        os._exit(status)


def _close_inherited(read_fd: int) -> None:
    """Keep stderr and the pipe (as fd 3), /dev/null on 0 and 1; close the rest."""
    if read_fd != 3:
        os.dup2(read_fd, 3)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))


def _watch(fd: int, owner_pid: int, kill_grace_s: float) -> None:
    pgid: int | None = None
    term_at_s = math.inf  # SIGTERM, then SIGKILL after the grace
    kill_at_s = math.inf  # SIGKILL only (the supervisor already sent SIGTERM)
    buffer = b""
    while True:
        now_s = boottime()
        if pgid is not None and now_s >= min(term_at_s, kill_at_s):
            if now_s >= term_at_s:
                # Signal first, log after (a stalled stderr must not delay it).
                _signal_all(pgid, owner_pid, signal.SIGTERM)
                log.error(
                    "watchdog: leaderrun (pid %d) missed its kill deadline by %.3gs "
                    "(stopped or paused?); stopping the command",
                    owner_pid,
                    now_s - term_at_s + WATCHDOG_LATE_S,
                    extra={"event": "watchdog"},
                )
                _wait_gone(owner_pid, now_s + kill_grace_s)
            _signal_all(pgid, owner_pid, signal.SIGKILL)
            term_at_s = kill_at_s = math.inf
        wait_s = min(WATCHDOG_TICK_S, max(0.0, min(term_at_s, kill_at_s) - now_s))
        if not select.select([fd], [], [], wait_s)[0]:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            if pgid is not None:
                # leaderrun ended without disarming: it was killed. Its direct
                # child died of the parent-death signal; the rest of the group
                # did not.
                _signal_all(pgid, None, signal.SIGKILL)
            return
        buffer += chunk
        while len(buffer) >= _MESSAGE.size:
            kind, group, value = _MESSAGE.unpack(buffer[: _MESSAGE.size])
            buffer = buffer[_MESSAGE.size :]
            if kind == _ARM:
                pgid, term_at_s = group, value
            elif kind == _DEADLINE:
                term_at_s = value
            elif kind == _STOPPING:
                term_at_s, kill_at_s = math.inf, value
            elif kind == _DISARM:
                pgid, term_at_s, kill_at_s = None, math.inf, math.inf


def _signal_all(pgid: int, owner_pid: int | None, signum: int) -> None:
    """Signal the group and every descendant of leaderrun (daemons included)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
    if owner_pid is None:
        return
    for pid in _others(owner_pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _wait_gone(owner_pid: int, until_s: float) -> None:
    """Wait until every descendant has exited (zombies count), or until ``until_s``."""
    while boottime() < until_s:
        if not any(procfs.running(pid) for pid in _others(owner_pid)):
            return
        select.select([], [], [], min(0.01, max(0.0, until_s - boottime())))


def _others(owner_pid: int) -> list[int]:
    """Every descendant of leaderrun but the watchdog itself.

    A leaderrun that is PID 1 (a container's entrypoint) adopts the orphaned
    watchdog, which must not stop itself with the command.
    """
    me = os.getpid()
    return [pid for pid in procfs.descendants(owner_pid) if pid != me]
