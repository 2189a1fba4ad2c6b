"""The child and its signals: spawn, forward, stop the whole group, reap.

The only module that imports ``subprocess`` and installs signal handlers. It runs
in the main thread, and nothing here touches the database, so a renewal hung in
a socket read can never delay a kill (safety rules ``deadline-thread``,
``child-dies-with-us`` and ``release-last``, docs/safety.md).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import logging
import math
import os
import select
import shutil
import signal
import stat
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn, Protocol

from leaderrun import procfs
from leaderrun.clock import boottime
from leaderrun.errors import (
    CancelledBySignalError,
    CommandNotExecutableError,
    CommandNotFoundError,
    signal_status,
)
from leaderrun.lease import SUPERVISOR_TICK_S
from leaderrun.watchdog import WATCHDOG_LATE_S, Watchdog, libc

log = logging.getLogger("leaderrun")

FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
"""Signals sent to leaderrun that are passed on to the child's process group."""

CANCELLING_SIGNALS = frozenset(FORWARDED_SIGNALS) - {signal.SIGWINCH}
"""Signals that cancel a leaderrun still waiting for the lock (WINCH is a resize)."""

ESCALATING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
"""A second one of these turns into SIGKILL for the whole group."""

JOB_CONTROL_SIGNALS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
"""Ignored while the child runs: a stopped supervisor could not renew its lease."""

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

STANDBY_NAME = b"lrun-standby"
"""The process name of the command's process until it execs (``Standby``)."""
_PR_SET_CHILD_SUBREAPER = 36


class LeaseWatch(Protocol):
    """What the supervisor needs to know about the lease, without any I/O."""

    def snapshot(self) -> tuple[float, str | None]:
        """The kill deadline (on CLOCK_BOOTTIME) and the reason it was lost, if so."""
        ...

    def freeze(self) -> None:
        """Stop accepting renewals: the kill has begun and nothing may reverse it."""
        ...

    def fileno(self) -> int:
        """A descriptor that becomes readable when the lease is lost."""
        ...


class SignalInbox:
    """Records signals for the main loop, which acts on them outside the handler.

    Handlers only append the signal number; a wakeup pipe makes the main loop's
    ``poll`` return at once. Used as a context manager, it restores the previous
    handlers on exit.
    """

    def __init__(self) -> None:
        # A deque, because popleft() is atomic with respect to the handler, which
        # runs between any two bytecodes of the main thread.
        self._pending: collections.deque[int] = collections.deque()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[
            int, signal.Handlers | Callable[..., object] | int | None
        ] = {}
        self._previous_wakeup_fd = -1
        self._raising = False

    def __enter__(self) -> SignalInbox:
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._write_fd, warn_on_full_buffer=False
        )
        for signum in FORWARDED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self._raising and signum in CANCELLING_SIGNALS:
            self._raising = False  # once: the clean-up after it must not be cut
            raise CancelledBySignalError(
                signum, "cancelled by a signal while waiting for the lock; nothing ran"
            )
        self._pending.append(signum)

    @contextlib.contextmanager
    def cancelling(self) -> Iterator[None]:
        """A section of the main thread that a cancelling signal interrupts.

        Inside it, TERM, INT, HUP, QUIT, USR1 or USR2 raise
        :class:`~leaderrun.errors.CancelledBySignalError` from the handler, wherever the
        thread is waiting (a statement, a connect, a sleep), instead of being
        recorded for later. Only code that is safe to abandon at any point may
        run inside: waiting for the lock, before the command has started.
        """
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def fileno(self) -> int:
        """The read end of the wakeup pipe."""
        return self._read_fd

    def take(self) -> list[int]:
        """The signals received since the last call, oldest first."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 512):
                pass
        taken: list[int] = []
        while self._pending:
            taken.append(self._pending.popleft())
        return taken

    def wait(self, timeout_s: float) -> list[int]:
        """Sleep up to ``timeout_s`` or until a signal arrives; return what arrived."""
        if not self._pending:
            select.select([self._read_fd], [], [], max(0.0, timeout_s))
        return self.take()


def resolve_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The executable the child will run, checked before any lease is taken.

    Raises:
        CommandNotFoundError: not on PATH, or no such file (exit 127).
        CommandNotExecutableError: a directory, or not executable (exit 126).
    """
    name = argv[0]
    if "/" not in name:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        if found is None:
            raise CommandNotFoundError(f"command not found: {name!r}")
        return found
    if not os.path.exists(name):
        raise CommandNotFoundError(f"no such file: {name!r}")
    if os.path.isdir(name) or not os.access(name, os.X_OK):
        raise CommandNotExecutableError(
            f"not executable: {name!r}; check its mode (chmod +x) or run it through "
            "its interpreter"
        )
    return name


def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec. PR_SET_PDEATHSIG fires when the
    # *thread* that forked us ends, which is why leaderrun forks from the main
    # thread, which lives as long as the child does. If the parent is already
    # gone (killed between fork and prctl), no signal would ever come: give up.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(signal_status(signal.SIGKILL))


def become_subreaper() -> None:
    """Adopt orphaned descendants, so that daemonised grandchildren can be stopped."""
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.debug("PR_SET_CHILD_SUBREAPER failed: %s", os.strerror(ctypes.get_errno()))


class Standby:
    """The command's process, forked ahead of the grant, waiting for the word to exec.

    Forking leaderrun (a Python process of some 40 MB) takes milliseconds;
    forked before the lease is granted, while the acquire statement is on its
    way or while waiting for the lock, only the exec is left for the moment
    the lease is ours: the hand-off from one holder to the next is then the
    database's round trips and an exec. The process is forked from the main
    thread (``child-dies-with-us``: its parent-death signal is tied to that
    thread), leads a session and process group of its own, and runs nothing
    of the command until :meth:`start` sends it the environment, with the
    fencing token. A run that never gets the lease discards it.

    Args:
        path: the executable (``resolve_command``).
        argv: the command line, ``argv[0]`` as given.
        stdout: the descriptor the command writes to (``--capture-output``).
        stderr: the same for its standard error.
        env: the environment as far as it is known before the grant; the
            standby builds it ahead, and :meth:`start` sends only what differs
            (the fencing token), so that little is left to do after the grant.

    Raises:
        OSError: it could not be forked (a pids limit, no memory).
    """

    def __init__(
        self,
        path: str,
        argv: Sequence[str],
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._argv = list(argv)
        self._env = dict(env or {})
        go_read, self._go = os.pipe2(os.O_CLOEXEC)
        self._error, error_write = os.pipe2(os.O_CLOEXEC)
        parent_pid = os.getpid()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of a fork while other threads run (the log
                # writer); the child runs only _standby, which takes no lock.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:
            for fd in (go_read, self._go, self._error, error_write):
                os.close(fd)
            raise
        if pid == 0:
            _standby(
                parent_pid,
                (go_read, error_write),
                path,
                self._argv,
                (stdout, stderr),
                self._env,
            )
        os.close(go_read)
        os.close(error_write)
        self.pid = pid
        self._used = False

    def start(self, env: Mapping[str, str], within_s: float = math.inf) -> int:
        """Exec the command with ``env``; return once it runs, with its pid.

        The exec must come within ``within_s`` (what is left of the lease
        before its kill deadline): a standby that does not exec in time
        (stopped from outside while it waited) is killed, with whatever it
        became, so the command never starts late.

        Raises:
            CommandNotFoundError: exec found no such file (exit 127).
            CommandNotExecutableError: exec was refused, or did not come in
                time (exit 126).
        """
        self._used = True
        until_s = boottime() + within_s
        changed = [
            os.fsencode(k) + b"=" + os.fsencode(v)
            for k, v in env.items()
            if self._env.get(k) != v
        ]
        dropped = [os.fsencode(k) for k in self._env if k not in env]
        # Never empty (an empty message means "discarded"): a first NUL.
        payload = b"\0" + b"".join(item + b"\0" for item in changed + dropped)
        view = memoryview(payload)
        try:
            os.set_blocking(self._go, False)
            while view:
                if not self._ready(self._go, until_s, write=True):
                    raise self._late(within_s)
                view = view[os.write(self._go, view) :]
        except OSError as exc:  # it died (killed from outside): say so
            self._reap()
            raise CommandNotExecutableError(
                f"cannot execute {self._argv[0]!r}: its process ended before the "
                f"exec ({exc.strerror or exc})"
            ) from None
        finally:
            os.close(self._go)
            self._go = -1
        # Closed by the exec (close-on-exec), or an errno written before _exit.
        report = b""
        try:
            while True:
                if not self._ready(self._error, until_s):
                    raise self._late(within_s)
                chunk = os.read(self._error, 64)
                if not chunk:
                    break
                report += chunk
        finally:
            os.close(self._error)
            self._error = -1
        if not report:
            return self.pid
        self._reap()
        errno_value = int(report)
        if errno_value == errno.ENOENT:
            raise CommandNotFoundError(f"command not found: {self._argv[0]!r}")
        raise CommandNotExecutableError(
            f"cannot execute {self._argv[0]!r}: {os.strerror(errno_value)}"
        )

    @staticmethod
    def _ready(fd: int, until_s: float, *, write: bool = False) -> bool:
        """Wait until ``fd`` is ready or CLOCK_BOOTTIME reaches ``until_s``.

        In slices, since select's clock stops during a suspend and BOOTTIME does not.
        """
        while (left_s := until_s - boottime()) > 0:
            fds = [fd]
            ready = select.select(
                [] if write else fds, fds if write else [], [], min(left_s, _SLICE_S)
            )
            if ready[0] or ready[1]:
                return True
        return False

    def _late(self, within_s: float) -> CommandNotExecutableError:
        """Kill the standby, or the command it just became; the error to raise."""
        with contextlib.suppress(OSError):
            if (
                os.getpgid(self.pid) == self.pid
            ):  # its own group: it and anything it forked
                os.killpg(self.pid, signal.SIGKILL)
            os.kill(self.pid, signal.SIGKILL)
        self._reap()
        return CommandNotExecutableError(
            f"cannot execute {self._argv[0]!r}: its process, forked ahead, did not "
            f"exec within {within_s:.3g}s of the grant (stopped from outside?); "
            "it was killed and the lease given back"
        )

    def discard(self) -> None:
        """The lease never came: end the waiting process; never raises."""
        if self._used:
            return
        self._used = True
        for fd in (self._go, self._error):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._go = self._error = -1
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)  # even if stopped; runs nothing yet
        self._reap()

    def _reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def _standby(
    parent_pid: int,
    pipes: tuple[int, int],
    path: str,
    argv: list[str],
    output: tuple[int | None, int | None],
    env: Mapping[str, str],
) -> NoReturn:
    """The forked child: wait for the word, then exec; never returns.

    Before anything else it gives up leaderrun's signal handling (a signal to
    it must neither run leaderrun's handlers nor wake leaderrun's loop) and
    restores what Python ignores (as ``subprocess``'s ``restore_signals``);
    then it ties its life to leaderrun's (``child-dies-with-us``), leads a new
    session, keeps only the descriptors the command gets, and builds the
    environment. After the grant only the changes are read and applied.
    """
    go, error = pipes
    status = 127
    try:
        signal.set_wakeup_fd(-1)
        for signum in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        _die_with_parent(parent_pid)
        # Named apart, as the watchdog is: `pkill leaderrun` stops leaderrun,
        # which then ends its standby itself (nothing ran), rather than racing it.
        libc.prctl(_PR_SET_NAME, STANDBY_NAME, 0, 0, 0)
        # A new session: the command has its own process group (signalled as
        # a whole) and no controlling terminal, so a Ctrl-C or Ctrl-Z at the
        # terminal reaches leaderrun alone, which forwards it exactly once.
        os.setsid()
        stdout, stderr = output
        if stdout is not None:
            os.dup2(stdout, 1)
        if stderr is not None:
            os.dup2(stderr, 2)
        low, high = sorted(pipes)
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, _MAX_FD)
        ready = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        payload = _read_all(go)
        if not payload:
            status = 0  # discarded: no lease, nothing runs
        else:
            for item in payload.split(b"\0"):
                if b"=" in item:
                    key, value = item.split(b"=", 1)
                    ready[key] = value
                elif item:
                    ready.pop(item, None)
            os.execve(path, argv, ready)  # noqa: S606 (no shell: argv as given)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(error, str(exc.errno or errno.EIO).encode())
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(error, str(errno.EIO).encode())
    os._exit(status)


_SLICE_S = 0.1
"""The longest select() while a standby is awaited, between two BOOTTIME reads."""

_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536
"""The descriptors the standby closes run up to this (close_range makes it cheap)."""


class Child:
    """The command, running as the leader of its own session and process group."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        helpers: Collection[int] = (),
        stdout: int | None = None,
        stderr: int | None = None,
        *,
        standby: Standby | None = None,
        within_s: float = math.inf,
    ) -> None:
        """Start ``argv`` with ``env``: exec ``standby``, or fork one now.

        The exec must come within ``within_s`` (see :meth:`Standby.start`).

        ``helpers`` are leaderrun's own processes, never the command's: the
        watchdog, which a leaderrun running as PID 1 (a container's
        entrypoint) adopts like any orphan. ``stdout`` and ``stderr`` are the
        descriptors the command writes to (``--capture-output``'s pipes);
        by default, leaderrun's own; a ``standby`` was forked with its own.

        Raises:
            CommandNotFoundError: exec found no such file (exit 127).
            CommandNotExecutableError: exec was refused (exit 126).
            OSError: no process could be forked.
        """
        if standby is None:
            try:
                path = resolve_command(argv, env)
                standby = Standby(path, argv, stdout, stderr, env)
            except OSError as exc:
                raise CommandNotExecutableError(
                    f"cannot execute {argv[0]!r}: {exc.strerror or exc}"
                ) from None
        self.pid = standby.start(env, within_s)
        self.pgid = self.pid
        self._helpers = frozenset(helpers)
        self.pidfd = -1
        """Readable once the command exited; -1 where pidfds are unavailable."""
        self.returncode: int | None = None

    def watch(self) -> None:
        """Open a pidfd on the command, so that its exit wakes the supervisor.

        Raises:
            OSError: it could not be opened (EMFILE); the caller stops the group.
        """
        self.pidfd = os.pidfd_open(self.pid)

    def reap(self) -> int | None:
        """Reap every exited child of ours; return the command's status once it exited.

        Besides the command itself, leaderrun may have adopted orphaned
        descendants (it is a subreaper); they are reaped here too so that no
        zombie keeps the process group alive. One ``waitid`` when nothing
        exited: the command's exit is on the hand-off path.
        """
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            _, status = os.waitpid(info.si_pid, 0)
            if info.si_pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to the whole process group; False if it is empty."""
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:
            # Every process left in the group is one we may not signal (see
            # unstoppable()): the group is not empty.
            return True
        return True

    def group_alive(self) -> bool:
        """Whether any process (a zombie included) is still in the group."""
        return self.signal_group(0)

    def signal_adopted(self, signum: int) -> int:
        """Send ``signum`` to descendants that left the group and were adopted by us."""
        count = 0
        for pid in self._adopted():
            # A process still in the group already got the group's signal.
            if pid != self.pid and procfs.process_group(pid) != self.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
                    count += 1
        return count

    def gone(self) -> bool:
        """Whether the command, its group and every adopted descendant are gone."""
        self.reap()
        return (
            self.returncode is not None
            and not self.group_alive()
            and not self._adopted()
        )

    def unstoppable(self) -> list[int]:
        """The command's processes still running that we may not signal at all.

        A setuid program that set all its user ids (sudo's command), seen from a
        leaderrun without CAP_KILL: the kernel refuses every signal, SIGKILL too.
        """
        candidates = set(procfs.group_members(self.pgid)) | set(self._adopted())
        return sorted(
            pid
            for pid in candidates
            if procfs.running(pid) and not procfs.may_signal(pid)
        )

    def _adopted(self) -> list[int]:
        """Our children: the command and what we adopted, leaderrun's helpers not."""
        return [pid for pid in procfs.children(os.getpid()) if pid not in self._helpers]

    def close(self) -> None:
        """Release the pidfd."""
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


def pidfd_supported() -> bool:
    """Whether this kernel and sandbox give pidfds; asked before any lease is taken.

    False on kernels before 5.3 (ENOSYS) and under seccomp profiles that refuse
    the call (EPERM): the supervisor then finds the command's exit at its tick.

    Raises:
        OSError: any other failure (EMFILE: no descriptor left to run with).
    """
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EPERM):
            return False
        raise
    os.close(fd)
    return True


def privilege_warning(path: str) -> str | None:
    """Why leaderrun may be unable to stop ``path``'s process, or None.

    A program that is setuid to another user drops the parent-death signal at
    exec, and a leaderrun without CAP_KILL may not signal it once it has set all
    its user ids to that user (as sudo does for its command).
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not info.st_mode & stat.S_ISUID or info.st_uid == os.geteuid():
        return None
    if procfs.has_capability(procfs.CAP_KILL):
        return None
    return (
        f"{path} is setuid (owner uid {info.st_uid}): leaderrun (uid "
        f"{os.geteuid()}, without CAP_KILL) may be unable to stop it if the lease "
        "is lost; run leaderrun as root, or as the user the program runs as"
    )


def unstoppable_message(pids: Sequence[int]) -> str:
    """One line naming the processes leaderrun cannot stop, and why."""
    who = ", ".join(
        f"pid {pid} ({procfs.name_of(pid)}, uid {procfs.uid_of(pid)})" for pid in pids
    )
    return (
        f"cannot stop {who}: leaderrun (uid {os.geteuid()}) may not signal it, as "
        "for a setuid program that changed its user; it may outlive the lease, "
        "which is left to expire; run leaderrun as root or as that user"
    )


@dataclass
class Outcome:
    """How a supervised run ended."""

    returncode: int | None
    """The command's exit status (negative: killed by that signal), if it exited."""

    stopped_because: str | None = None
    """Why leaderrun stopped the command for its lease, or None if it did not."""

    timed_out: bool = False
    """leaderrun stopped the command because ``--max-runtime`` passed."""

    failure: str | None = None
    """leaderrun itself failed (its required watchdog died) and stopped the command."""

    unstoppable: tuple[int, ...] = ()
    """Processes of the command's that outlived every signal: the lease must not be
    released while they run."""


FRESH_LOOK_S = 2 * SUPERVISOR_TICK_S
"""The supervisor looks at least every tick; a longer gap means it was paused."""

UNSTOPPABLE_AFTER_S = 0.05
"""SIGKILL ends a process we may signal within milliseconds; after this long in
the kill loop, the ones still running that we may not signal are reported."""


class Supervisor:
    """The main thread's loop: forward signals, watch the lease, stop the group.

    Args:
        child: the running command.
        inbox: the signals received by leaderrun.
        lease: the lease state, published by the renewal thread.
        kill_grace_s: SIGTERM to SIGKILL, when leaderrun stops the child.
        clock: CLOCK_BOOTTIME, or a fake in tests.
        runtime_deadline_s: when ``--max-runtime`` runs out, on ``clock``; the
            group is then stopped as for a lost lease, and the outcome says so.
        watchdog: a started, armed watchdog to keep fed with the deadline, if any.
        watchdog_required: stop the command if the watchdog dies
            (``--watchdog required``); otherwise go on without it.
    """

    def __init__(
        self,
        child: Child,
        inbox: SignalInbox,
        lease: LeaseWatch,
        kill_grace_s: float,
        clock: Callable[[], float] = boottime,
        runtime_deadline_s: float | None = None,
        watchdog: Watchdog | None = None,
        watchdog_required: bool = False,
    ) -> None:
        self.child = child
        self.inbox = inbox
        self.lease = lease
        self.kill_grace_s = kill_grace_s
        self.clock = clock
        self.runtime_deadline_s = runtime_deadline_s
        self.watchdog = watchdog
        self.watchdog_required = watchdog_required
        self.unstoppable: tuple[int, ...] = ()
        self._last_look_s = -math.inf
        self._escalations = 0
        self._killed = False

    def run(self) -> Outcome:
        """Supervise until the command ends or must be stopped; never returns early.

        On return the command, its process group and its adopted descendants
        are gone (but for ``Outcome.unstoppable``), so the lease may be released.
        """
        self._last_look_s = self.clock()
        poller = select.poll()
        for fd in (self.inbox.fileno(), self.child.pidfd, self.lease.fileno()):
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        if self.watchdog is not None and self.watchdog.pidfd >= 0:
            poller.register(self.watchdog.pidfd, select.POLLIN)
        while True:
            deadline_s, lost = self.lease.snapshot()
            now_s = self.clock()
            paused = False
            if self.watchdog is not None:
                if now_s >= self.watchdog.fed_deadline_s:
                    # We were stopped past the deadline the watchdog knew: it
                    # has stopped the command, whatever renewed meanwhile.
                    paused = True
                    lost = lost or "leaderrun was paused past its kill deadline"
                self.watchdog.feed(deadline_s + WATCHDOG_LATE_S)
            # Reap first, then decide, when we were watching: a command that
            # exited since our last look, a tick ago, ended as it chose, even if
            # the deadline passed (or the loss was seen) in that tick; the kill
            # deadline leaves the grace and more before the lease can end. After
            # a pause we cannot tell when it died (the watchdog may have killed
            # it): then the deadline decides first.
            watching = (
                not paused
                and now_s - self._last_look_s <= FRESH_LOOK_S
                and self._last_look_s < deadline_s
            )
            if watching and self.child.reap() is not None:
                self.finish_group()
                return self._outcome()
            if lost is not None or now_s >= deadline_s:
                reason = lost or "no renewal succeeded before the kill deadline"
                self.stop(reason)
                return self._outcome(stopped_because=reason)
            failure = self._check_watchdog(poller)
            if failure is not None:
                self.stop(failure)
                return self._outcome(failure=failure)
            self.forward_signals()
            if self.child.reap() is not None:
                self.finish_group()
                return self._outcome()
            runtime_end_s = self.runtime_deadline_s
            if runtime_end_s is not None and now_s >= runtime_end_s:
                self.stop("--max-runtime passed")
                return self._outcome(timed_out=True)
            if runtime_end_s is not None:
                deadline_s = min(deadline_s, runtime_end_s)
            # poll() counts CLOCK_MONOTONIC, which stops during suspend, so wake
            # at least every tick and re-read CLOCK_BOOTTIME.
            timeout_s = min(SUPERVISOR_TICK_S, max(0.0, deadline_s - now_s))
            self._last_look_s = now_s
            poller.poll(timeout_s * 1000)

    def _outcome(
        self,
        stopped_because: str | None = None,
        timed_out: bool = False,
        failure: str | None = None,
    ) -> Outcome:
        return Outcome(
            self.child.returncode,
            stopped_because=stopped_because,
            timed_out=timed_out,
            failure=failure,
            unstoppable=self.unstoppable,
        )

    def _check_watchdog(self, poller: select.poll) -> str | None:
        """Notice a dead watchdog; a failure if one is required, else go on alone."""
        watchdog = self.watchdog
        if watchdog is None or not watchdog.died():
            return None
        if watchdog.pidfd >= 0:
            poller.unregister(watchdog.pidfd)
        watchdog.close()
        self.watchdog = None
        if self.watchdog_required:
            failure = f"the watchdog (pid {watchdog.pid}) died; --watchdog required"
            log.error("%s: stopping the command", failure)
            return failure
        log.error(
            "the watchdog (pid %s) died; going on without it: a leaderrun paused "
            "past its deadline can no longer be covered (--watchdog required "
            "stops the command instead)",
            watchdog.pid,
            extra={"event": "watchdog"},
        )
        return None

    def forward_signals(self, received: Sequence[int] | None = None) -> None:
        """Pass each received signal to the group; a second INT or TERM is SIGKILL.

        Args:
            received: signals already taken from the inbox; by default, take them.
        """
        for signum in self.inbox.take() if received is None else received:
            if signum in ESCALATING_SIGNALS:
                self._escalations += 1
            name = signal.Signals(signum).name
            if self._escalations >= 2 and signum in ESCALATING_SIGNALS:
                self.kill_everything()
                log.warning("second %s: killed the command's process group", name)
                continue
            self.child.signal_group(signum)
            log.info("forwarded %s to the command", name)

    def stop(self, reason: str) -> None:
        """SIGTERM the group, SIGKILL it after the grace, and confirm it is empty.

        Once begun, nothing stops the stop: the lease is frozen first, so a late
        renewal reply cannot extend it. Signals go first and the message after,
        so that a stalled stderr cannot delay them.
        """
        self.lease.freeze()
        if self.watchdog is not None:
            # Should we be stopped during the grace, the watchdog sends the SIGKILL.
            self.watchdog.stopping(self.clock() + self.kill_grace_s + WATCHDOG_LATE_S)
        self.child.signal_group(signal.SIGTERM)
        self.child.signal_adopted(signal.SIGTERM)
        log.error("stopping the command: %s", reason)
        self._wait_gone(self.clock() + self.kill_grace_s)
        self.kill_everything()

    def finish_group(self) -> None:
        """After the command exited: stop what it left behind in its group.

        Background processes the command left running get SIGTERM, then SIGKILL
        after the grace, so the lease is never released while one still runs.
        """
        if not self.child.gone():
            self.child.signal_group(signal.SIGTERM)
            self.child.signal_adopted(signal.SIGTERM)
            log.warning("the command exited but left processes behind; stopping them")
            self._wait_gone(self.clock() + self.kill_grace_s)
            self.kill_everything()

    def kill_everything(self) -> None:
        """SIGKILL the group and adopted descendants until none is left.

        Processes that no signal of ours can reach (see
        :meth:`Child.unstoppable`) would keep this loop turning while the lease
        runs out: they are reported once, in ``unstoppable``, and the loop ends.
        """
        self._killed = True
        started_s = self.clock()
        while not self.child.gone():
            self.child.signal_group(signal.SIGKILL)
            self.child.signal_adopted(signal.SIGKILL)
            if self.clock() - started_s >= UNSTOPPABLE_AFTER_S:
                stuck = self.child.unstoppable()
                if stuck:
                    self.unstoppable = tuple(stuck)
                    log.error("%s", unstoppable_message(stuck))
                    return
            self.inbox.wait(0.01)

    def _wait_gone(self, until_s: float) -> None:
        while self.clock() < until_s and not self.child.gone():
            self.forward_signals()
            if self._killed:
                return
            pause_s = min(SUPERVISOR_TICK_S, max(0.0, until_s - self.clock()))
            self.forward_signals(self.inbox.wait(pause_s))


@contextlib.contextmanager
def job_control_ignored() -> Iterator[None]:
    """Ignore SIGTSTP/SIGTTIN/SIGTTOU: Ctrl-Z must never stop the supervisor."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in JOB_CONTROL_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child status: the code, or 128+N for signal N."""
    return signal_status(-returncode) if returncode < 0 else returncode
