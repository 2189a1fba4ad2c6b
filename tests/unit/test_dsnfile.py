"""LEADERRUN_DSN_FILE: where it sits among the DSN sources, and what it refuses."""

from __future__ import annotations

import os

import pytest

from leaderrun.config import resolve_dsn
from leaderrun.dsnfile import read_dsn_file
from leaderrun.errors import ConfigError


@pytest.fixture
def dsn_file(tmp_path):
    path = tmp_path / "dsn"
    path.write_text("\n  postgresql://u:pw@db/app  \n")
    path.chmod(0o600)
    return path


def test_the_file_comes_after_the_flag_and_before_database_url(dsn_file):
    env = {"LEADERRUN_DSN_FILE": str(dsn_file), "DATABASE_URL": "host=other"}
    assert resolve_dsn("host=flag", env) == ("host=flag", "--dsn")
    assert resolve_dsn(None, env) == (
        "postgresql://u:pw@db/app",
        f"LEADERRUN_DSN_FILE ({dsn_file})",
    )
    assert resolve_dsn(None, {"LEADERRUN_DSN_FILE": ""}) == (
        "",
        "the libpq environment (PGHOST, PGSERVICE, ...)",
    )


@pytest.mark.parametrize("mode", [0o604, 0o640, 0o660, 0o666, 0o700 | 0o004])
def test_group_or_world_access_is_refused(dsn_file, mode):
    dsn_file.chmod(mode)
    with pytest.raises(ConfigError, match=f"has mode {mode:04o}.*chmod 600") as info:
        read_dsn_file(str(dsn_file))
    assert info.value.exit_code == 64
    assert "pw" not in info.value.message


@pytest.mark.parametrize("mode", [0o400, 0o600])
def test_owner_only_modes_are_read(dsn_file, mode):
    dsn_file.chmod(mode)
    assert read_dsn_file(str(dsn_file)) == "postgresql://u:pw@db/app"


def test_a_directory_is_not_a_dsn_file(tmp_path):
    tmp_path.chmod(0o700)
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_dsn_file(str(tmp_path))


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "dsn"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_dsn_file(str(fifo))
