"""The ``leaderrun`` command, run to completion as an operator would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

TIMEOUT_S = 60.0
"""The bound on one command: generous, it only decides how long a hang takes."""


def run(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    inherit: bool = True,
    timeout_s: float = TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun ARGS`` to the end; stdout is a pipe, not a terminal.

    The environment is the suite's (already scrubbed of ``LEADERRUN_*`` and
    ``PG*``) plus ``env``, or with ``inherit=False`` a bare ``PATH`` plus ``env``.
    """
    base = dict(os.environ) if inherit else {"PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "leaderrun", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env={**base, **(env or {})},
        cwd=cwd,
    )


def leaderrun(
    *args: str, dsn: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun ARGS`` on ``dsn`` (as ``LEADERRUN_DSN``).

    The environment is bare but for ``env``: no developer's setting leaks in.
    """
    return run(*args, env={"LEADERRUN_DSN": dsn, **(env or {})}, inherit=False)
