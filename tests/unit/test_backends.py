"""Choosing the store from the DSN, and spotting network file systems; no database."""

from pathlib import Path

import pytest

from leaderrun.backends import (
    NO_DSN_MESSAGE,
    configured,
    is_sqlite,
    open_store,
    sqlite_path,
    table_label,
)
from leaderrun.errors import EXIT_USAGE, ConfigError
from leaderrun.sqlite import (
    NETWORK_FS_TYPES,
    SqliteLeaseStore,
    mount_fs_type,
    network_fs_type,
)


@pytest.mark.parametrize(
    ("dsn", "path"),
    [
        ("sqlite:///var/lib/leaderrun/leases.db", "/var/lib/leaderrun/leases.db"),
        ("sqlite:////var/lib/leaderrun/leases.db", "/var/lib/leaderrun/leases.db"),
        ("SQLite:///tmp/x.db", "/tmp/x.db"),
        ("sqlite:/tmp/x.db", "/tmp/x.db"),
        ("sqlite:///tmp/with%20space.db", "/tmp/with space.db"),
        ("  sqlite:///tmp/x.db ", "/tmp/x.db"),
    ],
)
def test_sqlite_path_takes_absolute_paths(dsn, path):
    """Three slashes (a file URI) and four (SQLAlchemy's absolute form) agree."""
    assert is_sqlite(dsn)
    assert sqlite_path(dsn) == Path(path)


@pytest.mark.parametrize(
    ("dsn", "needle"),
    [
        ("sqlite:leases.db", "must give an absolute path"),
        ("sqlite:./leases.db", "must give an absolute path"),
        ("sqlite://leases.db", "names a host"),
        ("sqlite://localhost/tmp/x.db", "names a host"),
        ("sqlite:///tmp/x.db?mode=ro", "takes no parameters"),
        ("sqlite:///tmp/x.db#frag", "takes no parameters"),
        ("sqlite:///tmp/", "must name a file"),
        ("sqlite://", "must give an absolute path"),
        ("sqlite::memory:", "must give an absolute path"),
    ],
)
def test_sqlite_path_refuses_what_two_processes_could_read_differently(dsn, needle):
    """A relative path, a host or parameters: exit 64, naming the DSN and an example."""
    with pytest.raises(ConfigError) as excinfo:
        sqlite_path(dsn)
    assert excinfo.value.exit_code == EXIT_USAGE
    assert needle in excinfo.value.message
    assert repr(dsn) in excinfo.value.message
    assert "sqlite:///var/lib/leaderrun/leases.db" in excinfo.value.message


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://db/app", "host=db dbname=app", "postgres://x", "sqlitedb=1"],
)
def test_other_dsns_are_postgresql(dsn):
    """Only the sqlite: scheme picks the embedded store."""
    assert not is_sqlite(dsn)


@pytest.mark.parametrize(
    ("dsn", "env", "expected"),
    [
        ("", {}, False),
        ("  ", {}, False),
        ("", {"PGPASSWORD": "x", "PGPASSFILE": "/p", "PGSSLMODE": "require"}, False),
        ("", {"PGHOST": ""}, False),
        ("", {"PGHOST": "db"}, True),
        ("", {"PGSERVICE": "leases"}, True),
        ("", {"PGDATABASE": "app"}, True),
        ("", {"PGUSER": "app"}, True),
        ("", {"PGPORT": "5433"}, True),
        ("", {"PGHOSTADDR": "10.0.0.1"}, True),
        ("host=db", {}, True),
        ("sqlite:///tmp/x.db", {}, True),
    ],
)
def test_configured_needs_a_dsn_or_libpq_variables_naming_a_server(dsn, env, expected):
    """A password alone names no server; PGHOST or PGSERVICE does."""
    assert configured(dsn, env) is expected


def test_no_dsn_at_all_is_refused_naming_both_choices():
    """No silent fallback: exit 64, and the message offers PostgreSQL and SQLite."""
    with pytest.raises(ConfigError) as excinfo:
        open_store("", "public", {})
    assert excinfo.value.exit_code == EXIT_USAGE
    assert excinfo.value.message == NO_DSN_MESSAGE
    assert "postgresql://" in NO_DSN_MESSAGE
    assert "sqlite:///" in NO_DSN_MESSAGE


def test_libpq_environment_still_picks_postgresql():
    """PGHOST set and no DSN: the PostgreSQL store, as before (nothing connects)."""
    store = open_store("", "public", {"PGHOST": "db.example"})
    assert type(store).__name__ == "PostgresLeaseStore"


def test_sqlite_dsn_picks_sqlite(tmp_path):
    """A sqlite: DSN gives the SQLite store on that file, busy wait = the budget."""
    store = open_store(f"sqlite://{tmp_path}/l.db", "public", {}, attempt_budget_s=2)
    assert isinstance(store, SqliteLeaseStore)
    assert (store.path, store.busy_s) == (tmp_path / "l.db", 2)
    assert store.describe() == f"sqlite://{tmp_path}/l.db"


def test_schema_is_refused_for_sqlite(tmp_path):
    """--schema means nothing to a SQLite file; saying so beats ignoring it."""
    with pytest.raises(ConfigError, match="--schema 'jobs' is for PostgreSQL"):
        open_store(f"sqlite://{tmp_path}/l.db", "jobs", {})


def test_missing_directory_is_a_usage_error(tmp_path):
    """The file may be created, its directory is not: exit 64 naming it."""
    with pytest.raises(ConfigError) as excinfo:
        open_store(f"sqlite://{tmp_path}/nope/l.db", "public", {})
    assert excinfo.value.exit_code == EXIT_USAGE
    assert f"directory '{tmp_path}/nope' does not exist" in excinfo.value.message


def test_table_label():
    """What `leaderrun init` prints for each store."""
    assert table_label("host=db", "jobs") == "jobs.leader_lease"
    assert table_label("sqlite:///a/b.db", "public") == "leader_lease in /a/b.db"


# --- network file systems -------------------------------------------------------

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


def test_network_file_systems_are_known():
    """The common ones, and not the local ones."""
    assert {"nfs", "nfs4", "cifs", "smb3", "9p", "fuse.sshfs"} <= NETWORK_FS_TYPES
    assert not {"ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs"} & NETWORK_FS_TYPES


def test_real_mount_table_agrees_with_findmnt(tmp_path):
    """On this machine, the parser reads the same type as util-linux's findmnt."""
    import shutil
    import subprocess

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


def test_a_file_on_a_network_file_system_is_refused(tmp_path, monkeypatch):
    """The store refuses the path with exit 64, naming the file system and a fix."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 259:2 / / rw - ext4 /dev/sda1 rw\n"
        f"40 22 0:40 / {tmp_path} rw - nfs4 fs1:/export rw\n"
    )
    monkeypatch.setattr("leaderrun.sqlite.MOUNTINFO", mountinfo)
    assert network_fs_type(tmp_path) == "nfs4"
    with pytest.raises(ConfigError) as excinfo:
        SqliteLeaseStore(tmp_path / "leases.db")
    assert excinfo.value.exit_code == EXIT_USAGE
    assert "network file system (nfs4)" in excinfo.value.message
    assert "local disk" in excinfo.value.message


def test_a_symlink_to_a_network_file_system_is_refused(tmp_path, monkeypatch):
    """The file's real location decides, not the directory of the link."""
    remote = tmp_path / "remote"
    local = tmp_path / "local"
    remote.mkdir()
    local.mkdir()
    (local / "leases.db").symlink_to(remote / "leases.db")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 259:2 / / rw - ext4 /dev/sda1 rw\n"
        f"40 22 0:40 / {remote.resolve()} rw - cifs //nas/x rw\n"
    )
    monkeypatch.setattr("leaderrun.sqlite.MOUNTINFO", mountinfo)
    with pytest.raises(ConfigError, match=r"network file system \(cifs\)"):
        SqliteLeaseStore(local / "leases.db")
    SqliteLeaseStore(local / "other.db")  # a plain file beside it is fine


def test_unreadable_mount_table_does_not_block(tmp_path, monkeypatch):
    """Without /proc the check cannot run; SQLite on a local disk still works."""
    monkeypatch.setattr("leaderrun.sqlite.MOUNTINFO", tmp_path / "missing")
    assert network_fs_type(tmp_path) is None
