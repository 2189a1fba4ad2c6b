"""The core imports no driver or terminal library; the CLI help loads no driver."""

import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("psycopg", "typer", "rich")
OWNERS = {
    "leaderrun.cli",
    "leaderrun.stores.postgres",
    "leaderrun.stores.postgres_sql",
    "leaderrun.__main__",
}
"""The modules that own a heavy library (typer and rich; psycopg), and the entry."""

CORE_MODULES = [
    "leaderrun",
    *sorted(
        info.name
        for info in pkgutil.walk_packages([str(ROOT / "leaderrun")], "leaderrun.")
        if info.name not in OWNERS
    ),
]

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
heavy = sys.argv[2:]
print(json.dumps(sorted(
    name for name in sys.modules if name.split(".")[0] in heavy
)))
"""


def python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with args in the repository root; never hangs."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_psycopg_typer_or_rich(module):
    """Importing a core module loads none of psycopg, typer or rich."""
    result = python("-c", _PROBE, module, *HEAVY)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_probe_sees_a_heavy_import():
    """The probe itself reports a heavy library when one is imported (it can fail)."""
    result = python("-c", _PROBE, "leaderrun.cli", *HEAVY)
    assert result.returncode == 0, result.stderr
    assert "typer" in json.loads(result.stdout)


def test_help_mentions_run_and_loads_no_psycopg():
    """`python -m leaderrun --help` lists run, exits 0 and never imports psycopg."""
    result = python("-X", "importtime", "-m", "leaderrun", "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\brun\b", result.stdout), result.stdout
    imports = [line for line in result.stderr.splitlines() if "import time:" in line]
    # -X importtime lists every module imported; make sure it really did.
    assert any(line.endswith("leaderrun.cli") for line in imports), result.stderr
    assert [line for line in result.stderr.splitlines() if "psycopg" in line] == []


def test_a_run_loads_nothing_only_operators_or_schedules_need(tmp_path):
    """`leaderrun --lock-id x -- true` imports no operator module (views, check,
    metrics), no Prometheus client and no cron or zone code: start-up is paid on
    every node, every time."""
    db = tmp_path / "leases.db"
    result = python(
        "-X", "importtime", "-m", "leaderrun",
        "--dsn", f"sqlite://{db}", "--lock-id", "x", "--", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "leaderrun.runner" in imported  # the probe saw the run's imports
    unwanted = {"leaderrun.views", "leaderrun.checks", "leaderrun.metrics"}
    unwanted |= {"leaderrun.slots", "prometheus_client", "cronsim", "zoneinfo", "rich"}
    # A nonce needs os.urandom, not secrets (which brings hmac along).
    unwanted |= {"secrets", "hmac"}
    assert imported & unwanted == set()
