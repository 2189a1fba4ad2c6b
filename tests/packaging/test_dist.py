"""What ``python -m build`` makes is what PyPI, pip and man expect.

The sdist and wheel are built once per session (it takes seconds: setuptools is
installed into an isolated environment, as a release build would do), then
checked with ``twine check`` and by installing the wheel into a fresh virtualenv,
where ``man -w leaderrun`` must find the page through the virtualenv's PATH entry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import leaderrun

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 300  # an isolated build downloads setuptools from the index
MAN_PAGE = "share/man/man1/leaderrun.1"


def run(*argv: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to the end; a failure shows its output in the assertion."""
    done = subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
        **kwargs,
    )
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel of this tree, built by ``python -m build``."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    (sdist,) = out.glob("leaderrun-*.tar.gz")
    (wheel,) = out.glob("leaderrun-*-py3-none-any.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_passes(dist):
    """Both files have metadata PyPI accepts, the README rendering included."""
    done = run(sys.executable, "-m", "twine", "check", "--strict", *dist.values())
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_wheel_carries_the_man_page_py_typed_and_license(dist):
    """The wheel installs the man page under share/, and marks the package typed."""
    version = leaderrun.__version__
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        man = wheel.read(f"leaderrun-{version}.data/data/{MAN_PAGE}")
    assert "leaderrun/py.typed" in names
    assert f"leaderrun-{version}.dist-info/licenses/LICENSE" in names
    assert man == (ROOT / "man" / "leaderrun.1").read_bytes()


def test_sdist_carries_what_a_rebuild_needs(dist):
    """The sdist has the man page (its wheel needs it), the licence and changelog."""
    with tarfile.open(dist["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"man/leaderrun.1", "LICENSE", "CHANGELOG.md", "leaderrun/py.typed"} <= names


def test_man_finds_the_page_in_a_venv_installed_from_the_wheel(dist, tmp_path):
    """``man -w leaderrun`` resolves once the venv's bin is on PATH, as after
    ``pip install`` into an activated virtualenv (man-db looks in ../share/man)."""
    man = shutil.which("man")
    if man is None:
        missing = "man is not installed (apt-get install man-db)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"{missing}; .ci/run installs it", pytrace=False)
        pytest.skip(missing)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    # --no-deps: what is checked is where the wheel's files land, not psycopg.
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
        dist["wheel"])  # fmt: skip
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MANPATH", "MANOPT")  # either would override PATH's lookup
    }
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    done = run(man, "-w", "leaderrun", env=env, cwd=tmp_path)
    assert Path(done.stdout.strip()) == venv / MAN_PAGE
