"""The README's first command works as written, with no PostgreSQL in reach."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
INSTALL_TIMEOUT_S = 600
"""pip builds and installs leaderrun and its dependencies: slow on a busy host."""


def first_command() -> str:
    """The README's first code block, which must be the ```sh quick start."""
    text = README.read_text()
    fenced = re.search(r"^```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert fenced is not None, "README.md has no ```sh block"
    indented = re.search(r"\n\n    \S", text)
    assert indented is None or fenced.start() < indented.start(), (
        "the quick start must be the README's first code block"
    )
    return fenced.group(1)


def test_the_first_command_is_one_line_on_sqlite():
    """One line, a SQLite DSN, and nothing that needs a server."""
    command = first_command()
    assert command.count("\n") == 1
    assert "sqlite://" in command
    assert "postgres" not in command.lower()


@pytest.mark.slow
def test_readme_first_command_installs_and_one_of_two_runs(tmp_path):
    """Run the block as written in a copy of the project: one runs, one exits 75.

    A copy, because the block makes ``.venv`` and installs into it, which must
    not touch the suite's own. The environment has no ``PG*``, ``DATABASE_URL``
    or ``LEADERRUN_*`` variables (the suite scrubs them), and the suite's own
    server, if it started one, listens on a random port nothing here names: the
    block can only work through the SQLite file it names.
    """
    work = tmp_path / "leaderrun"
    work.mkdir()
    # What a build reads: the man page is one of the wheel's data files.
    for name in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "MANIFEST.in",
    ):
        shutil.copy(ROOT / name, work / name)
    for directory in ("leaderrun", "man"):
        shutil.copytree(
            ROOT / directory,
            work / directory,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    result = subprocess.run(
        ["bash", "-c", first_command()],
        cwd=work,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert len(lines) == 3, result.stdout
    assert lines[2] == "job running, fencing token 1"
    exits = [re.fullmatch(r"contender ([12]) exited (\d+)", line) for line in lines[:2]]
    assert all(exits), result.stdout
    assert sorted(int(m.group(2)) for m in exits if m) == [0, 75]
    assert {m.group(1) for m in exits if m} == {"1", "2"}
    assert (work / "demo.db").exists()
    assert "Traceback" not in result.stderr
