"""What the SQLite store reads from the host: its boot, its clocks, its file systems."""

import shutil
import subprocess
from pathlib import Path

import pytest

from leaderrun.clock import boottime
from leaderrun.errors import EXIT_USAGE, ConfigError
from leaderrun.stores import open_store
from leaderrun.stores.host import (
    LOCAL_FS_TYPES,
    LOCAL_FS_VARIABLE,
    SHARED_FS_TYPES,
    VOLATILE_FS_TYPES,
    HostClock,
    fs_refusal,
    mount_fs_type,
    parse_boot_id,
    parse_boottime_offset_s,
    vouched_fs_types,
)
from leaderrun.stores.sqlite import SqliteLeaseStore

BOOT_ID = "895cc76a-b98d-4110-abf7-5b27b41054c2"

# --- the boot and its clock ----------------------------------------------------------


def test_boot_id_is_read_from_its_proc_text():
    """The kernel's text (a UUID and a newline) gives the boot id; garbage does not."""
    assert parse_boot_id(BOOT_ID.upper() + "\n") == BOOT_ID
    for garbage in ("", "not-a-uuid\n", BOOT_ID + BOOT_ID):
        with pytest.raises(ValueError, match="not a boot id"):
            parse_boot_id(garbage)


@pytest.mark.parametrize(
    ("text", "offset_s"),
    [
        ("monotonic           0         0\nboottime            0         0\n", 0.0),
        ("monotonic 10 0\nboottime 3600 500000000\n", 3600.5),
        ("boottime -7200 0\n", -7200.0),
        ("", 0.0),  # no line: no namespace offset
    ],
)
def test_time_namespace_offset_is_read_from_timens_offsets(text, offset_s):
    """The boottime line of /proc/self/timens_offsets, in seconds."""
    assert parse_boottime_offset_s(text) == offset_s


def test_a_malformed_time_namespace_offset_is_refused():
    """A boottime line that is not 'boottime SECONDS NANOSECONDS' is not guessed at."""
    with pytest.raises(ValueError, match="not a time namespace offset"):
        parse_boottime_offset_s("boottime 12\n")


def test_the_host_clock_reads_this_boot_and_takes_off_the_namespace_offset():
    """A process in a time namespace reads the host's boot clock all the same."""
    real = HostClock.read()
    assert real.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    shifted = HostClock(real.boot_id, boottime_offset_s=1000.0)
    before_s = boottime()
    now = shifted.now()
    assert before_s - 1000.0 <= now.boot_s <= boottime() - 1000.0
    assert now.boot_id == real.boot_id


def test_without_a_boot_id_the_store_is_refused(tmp_path, monkeypatch):
    """No /proc boot id (not Linux, /proc not mounted): exit 64, saying why."""
    monkeypatch.setattr("leaderrun.stores.host.BOOT_ID", tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read this boot's id"):
        HostClock.read()


# --- file systems --------------------------------------------------------------------

MOUNTINFO = """\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
25 22 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
40 22 0:40 / /srv/shared rw,relatime shared:20 - nfs4 fs1:/export rw,vers=4.2
41 40 259:3 / /srv/shared/local rw,relatime shared:21 - xfs /dev/nvme1n1 rw
42 22 0:41 / /mnt/my\\040share rw,relatime - cifs //nas/share rw
43 22 0:42 / /srv/sharedness rw,relatime - tmpfs tmpfs rw
44 22 0:43 / /mnt/over rw,relatime - nfs srv:/a rw
45 22 0:44 / /mnt/over rw,relatime - ext4 /dev/sdb1 rw
46 22 0:45 / /home/u/remote rw - fuse.sshfs u@h:/ rw
"""


@pytest.mark.parametrize(
    ("directory", "fs_type"),
    [
        ("/", "ext4"),
        ("/var/lib/leaderrun", "ext4"),
        ("/srv/shared", "nfs4"),
        ("/srv/shared/jobs", "nfs4"),
        ("/srv/shared/local/jobs", "xfs"),  # a local disk mounted inside NFS
        ("/srv/sharedness/x", "tmpfs"),  # a prefix of the name is not a parent
        ("/mnt/my share/leases", "cifs"),  # \040 is a space
        ("/mnt/over/x", "ext4"),  # the later mount on the same point is on top
        ("/home/u/remote/x", "fuse.sshfs"),
    ],
)
def test_mount_fs_type_finds_the_innermost_mount(directory, fs_type):
    """The longest mount point that is a path prefix decides."""
    assert mount_fs_type(directory, MOUNTINFO) == fs_type


def test_mount_fs_type_without_a_matching_line():
    """Garbage or no root mount: unknown, not a guess."""
    assert mount_fs_type("/x", "garbage\n") is None
    assert mount_fs_type("/x", "") is None


def test_real_mount_table_agrees_with_findmnt(tmp_path):
    """On this machine, the parser reads the same type as util-linux's findmnt."""
    if shutil.which("findmnt") is None:
        pytest.skip("findmnt (util-linux) is not installed")
    expected = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    text = Path("/proc/self/mountinfo").read_text()
    assert mount_fs_type(str(tmp_path.resolve()), text) == expected


HOSTS = """\
22 1 259:2 / / rw - ext4 /dev/nvme0n1p2 rw
30 22 0:30 / /srv/xfs rw - xfs /dev/sdb1 rw
31 22 0:31 / /srv/btrfs rw - btrfs /dev/sdc1 rw
32 22 0:32 / /srv/zfs rw - zfs tank/leases rw
33 22 0:33 / /srv/f2fs rw - f2fs /dev/sdd1 rw
34 22 0:34 / /run rw - tmpfs tmpfs rw
35 22 0:35 / /container rw - overlay overlay rw,lowerdir=/a,upperdir=/b
36 22 0:36 / /dev/shm rw - tmpfs shm rw
40 22 0:40 / /net/nfs rw - nfs4 fs1:/export rw
41 22 0:41 / /net/nfs3 rw - nfs fs1:/old rw
42 22 0:42 / /net/smb rw - cifs //nas/share rw
43 22 0:43 / /mnt/virtio rw - virtiofs shared rw
44 22 0:44 / /media/sf_shared rw - vboxsf shared rw
45 22 0:45 / /mnt/c rw - 9p drvfs rw,aname=drvfs;path=C:\\
46 22 0:46 / /host_mnt rw - fuse.grpcfuse grpcfuse rw
47 22 0:47 / /Users rw - osxfs osxfs rw
48 22 0:48 / /mnt/hgfs rw - vmhgfs .host:/ rw
49 22 0:49 / /mnt/hgfs-fuse rw - fuse.vmhgfs-fuse vmhgfs-fuse rw
50 22 0:50 / /media/psf rw - prl_fs none rw
51 22 0:51 / /srv/ceph rw - ceph 10.0.0.1:/ rw
52 22 0:52 / /srv/gfs2 rw - gfs2 /dev/mapper/shared rw
60 22 0:60 / /media/usb rw - fuseblk /dev/sde1 rw
61 22 0:61 / /srv/newfs rw - foofs /dev/sdf1 rw
"""
"""One host's mounts: local disks, a container, memory, and every kind of share."""


@pytest.mark.parametrize(
    "directory",
    [
        "/var/lib/leaderrun",
        "/srv/xfs/leases",
        "/srv/btrfs",
        "/srv/zfs/x",
        "/srv/f2fs",
        "/run/leaderrun",
        "/container/var/lib",
        "/dev/shm",
    ],
)
def test_local_file_systems_are_allowed(directory):
    """Disk file systems of one kernel, memory, and a container's overlay."""
    assert fs_refusal(directory, mount_fs_type(directory, HOSTS)) is None


@pytest.mark.parametrize(
    ("directory", "fs_type"),
    [
        ("/net/nfs/leases", "nfs4"),
        ("/net/nfs3", "nfs"),
        ("/net/smb", "cifs"),
        ("/mnt/virtio/x", "virtiofs"),
        ("/media/sf_shared", "vboxsf"),
        ("/mnt/c/Users", "9p"),  # WSL's view of Windows drives
        ("/host_mnt/x", "fuse.grpcfuse"),  # Docker Desktop
        ("/Users/me", "osxfs"),
        ("/mnt/hgfs", "vmhgfs"),
        ("/mnt/hgfs-fuse", "fuse.vmhgfs-fuse"),
        ("/media/psf/Home", "prl_fs"),
        ("/srv/ceph", "ceph"),
        ("/srv/gfs2", "gfs2"),
    ],
)
def test_shared_file_systems_are_refused_even_when_vouched_for(directory, fs_type):
    """Network shares, VM shared folders and cluster file systems are refused,
    naming the type and what to do, and no variable can allow them."""
    found = mount_fs_type(directory, HOSTS)
    assert found == fs_type
    refusal = fs_refusal(directory, found)
    assert refusal is not None
    assert f"is on {fs_type!r}, a file system other hosts" in refusal
    assert "local disk" in refusal
    assert "PostgreSQL" in refusal
    assert LOCAL_FS_VARIABLE not in refusal
    assert fs_refusal(directory, found, {fs_type}) == refusal


@pytest.mark.parametrize(("directory", "fs_type"), [("/media/usb", "fuseblk")])
def test_an_unknown_file_system_is_refused_unless_vouched_for(directory, fs_type):
    """Fail closed: a type leaderrun does not know is refused, and the message
    names the variable that vouches for it; vouched for, it is allowed."""
    found = mount_fs_type(directory, HOSTS)
    refusal = fs_refusal(directory, found)
    assert refusal is not None
    assert f"is on {fs_type!r}, which leaderrun does not know to be local" in refusal
    assert f"set {LOCAL_FS_VARIABLE}={fs_type}" in refusal
    assert fs_refusal(directory, found, {fs_type}) is None
    assert fs_refusal("/srv/newfs", "foofs", {fs_type}) is not None  # only that one


def test_an_unreadable_mount_is_refused():
    """No mount line for the path: refused, not assumed local."""
    refusal = fs_refusal("/x", None)
    assert refusal is not None
    assert "cannot tell which file system holds '/x'" in refusal


def test_vouched_types_are_read_from_the_environment():
    """A comma-separated list, case and spaces ignored; nothing set, nothing vouched."""
    assert vouched_fs_types({LOCAL_FS_VARIABLE: " fuseblk, FooFS ,, "}) == {
        "fuseblk",
        "foofs",
    }
    assert vouched_fs_types({}) == frozenset()


def test_the_lists_agree():
    """No type is both local and shared, and the volatile ones are local."""
    assert not LOCAL_FS_TYPES & SHARED_FS_TYPES
    assert VOLATILE_FS_TYPES <= LOCAL_FS_TYPES
    assert {"virtiofs", "vboxsf", "9p", "fuse.grpcfuse", "osxfs", "vmhgfs"} <= (
        SHARED_FS_TYPES
    )


# --- the store refuses what the decisions refuse -------------------------------------


def mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *lines: str) -> None:
    """Make the store see an ext4 root plus ``lines`` as its mount table."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 259:2 / / rw - ext4 /dev/sda1 rw\n" + "".join(lines))
    monkeypatch.setattr("leaderrun.stores.host.MOUNTINFO", mountinfo)


def test_a_file_on_a_network_file_system_is_refused(tmp_path, monkeypatch):
    """The store refuses the path with exit 64, in one line naming the type."""
    mounts(tmp_path, monkeypatch, f"40 22 0:40 / {tmp_path} rw - nfs4 fs1:/e rw\n")
    with pytest.raises(ConfigError) as excinfo:
        SqliteLeaseStore(tmp_path / "leases.db")
    assert excinfo.value.exit_code == EXIT_USAGE
    assert excinfo.value.message.startswith(f"sqlite://{tmp_path}/leases.db: ")
    assert "is on 'nfs4'" in excinfo.value.message
    assert "\n" not in excinfo.value.message


def test_a_symlink_to_a_network_file_system_is_refused(tmp_path, monkeypatch):
    """The file's real location decides, not the directory of the link."""
    remote = tmp_path / "remote"
    local = tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    (local / "leases.db").symlink_to(remote / "leases.db")
    mounts(tmp_path, monkeypatch, f"40 22 0:40 / {remote.resolve()} rw - cifs x rw\n")
    with pytest.raises(ConfigError, match="is on 'cifs'"):
        SqliteLeaseStore(local / "leases.db")
    SqliteLeaseStore(local / "other.db")  # a plain file beside it is fine


def test_a_file_bind_mounted_from_a_shared_folder_is_refused(tmp_path, monkeypatch):
    """A file mounted onto the path (docker -v host.db:/x.db) is its own mount."""
    target = tmp_path / "leases.db"
    target.touch()
    mounts(tmp_path, monkeypatch, f"40 22 0:40 /l.db {target} rw - virtiofs x rw\n")
    with pytest.raises(ConfigError, match="is on 'virtiofs'"):
        SqliteLeaseStore(target)


def test_an_unreadable_mount_table_fails_closed(tmp_path, monkeypatch):
    """Without /proc/self/mountinfo the check cannot run, so the store refuses."""
    monkeypatch.setattr("leaderrun.stores.host.MOUNTINFO", tmp_path / "missing")
    with pytest.raises(ConfigError, match="is on a local disk"):
        SqliteLeaseStore(tmp_path / "leases.db")


def test_the_variable_vouches_for_an_unknown_type_through_open_store(
    tmp_path, monkeypatch
):
    """LEADERRUN_SQLITE_LOCAL_FS, passed in leaderrun's environment, allows it."""
    mounts(tmp_path, monkeypatch, f"40 22 0:40 / {tmp_path} rw - fuseblk /dev/x rw\n")
    dsn = f"sqlite://{tmp_path}/leases.db"
    with pytest.raises(ConfigError, match=f"set {LOCAL_FS_VARIABLE}=fuseblk"):
        open_store(dsn, "public", {})
    store = open_store(dsn, "public", {LOCAL_FS_VARIABLE: "fuseblk"})
    assert isinstance(store, SqliteLeaseStore)
    assert store.fs_type == "fuseblk"
