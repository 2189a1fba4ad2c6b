"""What the SQLite store needs to know about this host: its boot, its clocks, its disks.

A SQLite file is shared by the processes of one host, so the host decides
expiry (``docs/safety.md``, *On one host, the host's unsteppable clock
decides*). Its wall clock cannot: timesyncd steps it at 0.4 s of error,
``chronyd`` with ``makestep``, a VM resume or ``date -s`` step it anywhere, and
every lease written by it moves with the step. ``CLOCK_BOOTTIME`` never steps
and counts suspend, but it restarts at every boot, so its readings are only
comparable under the same boot id (``/proc/sys/kernel/random/boot_id``).

And the host must be one host: POSIX locks and WAL's shared-memory index are
per kernel, so a file that two kernels can open (NFS, SMB, a VM's shared
folder) can have two writers that each hold "the" lock. Only file systems
known to be local are allowed (:data:`LOCAL_FS_TYPES`); anything else is
refused, since a new shared-folder driver would otherwise pass unnoticed.

Pure where it can be: parsing takes the text of the ``/proc`` file as an
argument; only the ``read_*`` functions and :class:`HostClock` touch ``/proc``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from leaderrun.clock import boottime
from leaderrun.errors import ConfigError

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
"""The kernel's random id of the current boot."""

TIMENS_OFFSETS = Path("/proc/self/timens_offsets")
"""This process's time namespace offsets from the host's clocks (Linux 5.6+)."""

MOUNTINFO = Path("/proc/self/mountinfo")
"""Where Linux lists the mounts this process sees."""

LOCAL_FS_VARIABLE = "LEADERRUN_SQLITE_LOCAL_FS"
"""Names file system types (comma-separated) that the operator vouches are local.

For a local file system leaderrun does not know (a new kernel driver, a FUSE file
system on a local disk such as ``fuseblk``). Types known to be shared
(:data:`SHARED_FS_TYPES`) cannot be vouched for.
"""

LOCAL_FS_TYPES = frozenset(
    {
        # Disk file systems of one kernel.
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "bcachefs",
        "zfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "nilfs2",
        "vfat",
        "exfat",
        "ntfs3",
        # Memory (see VOLATILE_FS_TYPES).
        "tmpfs",
        "ramfs",
        # Stacked on the above: containers' root and bind mounts.
        "overlay",
        "aufs",
        "shiftfs",
        "ecryptfs",
    }
)
"""File systems whose POSIX locks and shared memory belong to one kernel.

A container's overlay root and a volume bind-mounted from the host's disk are
local: the container shares the host's kernel. Block devices that another host
can also mount (iSCSI, a multi-attach cloud volume) defeat any check made here.
"""

VOLATILE_FS_TYPES = frozenset({"tmpfs", "ramfs"})
"""Local file systems in memory: the file, and its fencing tokens, end at reboot."""

SHARED_FS_TYPES = frozenset(
    {
        # Network file systems.
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "coda",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "orangefs",
        # Cluster file systems on shared disks.
        "gfs2",
        "ocfs2",
        # Folders shared between a VM and its host, or a container VM and macOS.
        "9p",
        "virtiofs",
        "vboxsf",
        "vmhgfs",
        "prl_fs",
        "fuse.vmhgfs-fuse",
        "fuse.grpcfuse",
        "osxfs",
        "fakeowner",
        # FUSE clients of remote storage.
        "fuse.sshfs",
        "fuse.ceph-fuse",
        "fuse.davfs",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "fuse.juicefs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.mountpoint-s3",
        "fuse.goofys",
        "fuse.blobfuse",
        "fuse.blobfuse2",
    }
)
"""File systems known to be open to other kernels: never allowed, not even vouched.

Only for the message: anything not in :data:`LOCAL_FS_TYPES` is refused anyway.
"""

_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_boot_id(text: str) -> str:
    """The boot id in the text of ``/proc/sys/kernel/random/boot_id``.

    Raises:
        ValueError: the text is not one UUID.
    """
    boot_id = text.strip().lower()
    if not _BOOT_ID.fullmatch(boot_id):
        raise ValueError(f"not a boot id: {text[:60]!r}")
    return boot_id


def parse_boottime_offset_s(text: str) -> float:
    """The ``boottime`` offset (seconds) in the text of ``/proc/self/timens_offsets``.

    A process in a time namespace (``unshare --time``, CRIU) reads
    ``CLOCK_BOOTTIME`` shifted by this offset; subtracting it gives the host's
    clock, which every process sharing the file agrees on. No ``boottime`` line
    means no offset.

    Raises:
        ValueError: a ``boottime`` line that is not ``boottime SECONDS NANOSECONDS``.
    """
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "boottime":
            if len(fields) != 3:
                raise ValueError(f"not a time namespace offset: {line!r}")
            return int(fields[1]) + int(fields[2]) / 1e9
    return 0.0


@dataclass(frozen=True)
class Instant:
    """One reading of the host's clocks, taken under the file's write lock."""

    boot_id: str
    """The boot that ``boot_s`` counts in."""
    boot_s: float
    """The host's ``CLOCK_BOOTTIME``: decides every lease."""
    unix_s: float
    """The wall clock, for people and calendars only (times shown, windows)."""


class HostClock:
    """The host's clocks: ``CLOCK_BOOTTIME`` within this boot, and the wall clock.

    Args:
        boot_id: this boot's id.
        boottime_offset_s: this process's time namespace offset, subtracted.
    """

    def __init__(self, boot_id: str, boottime_offset_s: float = 0.0) -> None:
        self.boot_id = boot_id
        self.boottime_offset_s = boottime_offset_s

    @classmethod
    def read(cls) -> HostClock:
        """The clocks of the running host, from ``/proc``.

        Raises:
            ConfigError: ``/proc`` cannot tell the boot id (not Linux, or no /proc).
        """
        try:
            boot_id = parse_boot_id(BOOT_ID.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read this boot's id from {str(BOOT_ID)!r} ({exc}); the "
                "SQLite store needs Linux with /proc mounted, or use a PostgreSQL DSN"
            ) from None
        try:
            offset_s = parse_boottime_offset_s(TIMENS_OFFSETS.read_text())
        except FileNotFoundError:
            offset_s = 0.0  # a kernel without time namespaces: no offset possible
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read this process's clock offsets from "
                f"{str(TIMENS_OFFSETS)!r} ({exc}); mount /proc, or use a PostgreSQL DSN"
            ) from None
        return cls(boot_id, offset_s)

    def now(self) -> Instant:
        """Read both clocks now."""
        return Instant(self.boot_id, boottime() - self.boottime_offset_s, time.time())


# --- file systems ------------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` is a space)."""
    out, index = [], 0
    while index < len(field):
        chunk = field[index : index + 4]
        if len(chunk) == 4 and chunk[0] == "\\" and chunk[1:].isdigit():
            out.append(chr(int(chunk[1:], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def mount_fs_type(path: str, mountinfo: str) -> str | None:
    """The file system type of the mount holding ``path`` (absolute, resolved).

    ``mountinfo`` is the text of ``/proc/self/mountinfo``. The mount whose mount
    point is the longest path prefix of ``path`` holds it; of two mounts on the
    same point, the later one (listed last) is on top. A file bind-mounted onto
    ``path`` is itself such a mount. None if no line fits.
    """
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = _unescape_mount_field(fields[4])
        fs_type = line.split(" - ", 1)[1].split(" ")[0]
        inside = (
            mount_point == "/"
            or path == mount_point
            or path.startswith(mount_point.rstrip("/") + "/")
        )
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), fs_type)
    return best[1] if best else None


def vouched_fs_types(env: Mapping[str, str]) -> frozenset[str]:
    """The file system types named in :data:`LOCAL_FS_VARIABLE`, lowercase."""
    value = env.get(LOCAL_FS_VARIABLE, "")
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


def fs_refusal(
    where: str, fs_type: str | None, vouched: Iterable[str] = ()
) -> str | None:
    """Why a SQLite file at ``where`` on ``fs_type`` is refused; None if allowed.

    Allowed: a type in :data:`LOCAL_FS_TYPES`, or one the operator vouched for
    (:data:`LOCAL_FS_VARIABLE`) that is not known to be shared. ``fs_type`` None
    means the mount table did not say.
    """
    if fs_type is None:
        return (
            f"cannot tell which file system holds {where!r} from {str(MOUNTINFO)!r}; "
            "put the file on a local disk, or use a PostgreSQL DSN"
        )
    kind = fs_type.lower()
    if kind in LOCAL_FS_TYPES:
        return None
    if kind in SHARED_FS_TYPES or kind.startswith(("nfs", "9p")):
        return (
            f"{where!r} is on {fs_type!r}, a file system other hosts (or a VM's "
            "host) can open too, where SQLite's locks do not hold; put the file on "
            "a local disk (e.g. /var/lib/leaderrun), or use a PostgreSQL DSN to "
            "share a lock between hosts"
        )
    if kind in {name.lower() for name in vouched}:
        return None
    return (
        f"{where!r} is on {fs_type!r}, which leaderrun does not know to be local to "
        "this host, and SQLite's locks only hold within one kernel; put the file "
        f"on a local disk (ext4, xfs, btrfs, ...), or, if {fs_type!r} is never "
        f"shared with another host or VM, set {LOCAL_FS_VARIABLE}={fs_type}"
    )


def read_mountinfo() -> str:
    """The text of ``/proc/self/mountinfo``.

    Raises:
        ConfigError: it cannot be read: the file system cannot be checked.
    """
    try:
        return MOUNTINFO.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {str(MOUNTINFO)!r} ({exc.strerror or exc}) to check that "
            "the SQLite file is on a local disk; mount /proc, or use a PostgreSQL DSN"
        ) from None
