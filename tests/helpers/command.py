"""The ``leaderrun`` command, run to completion as an operator would run it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

TIMEOUT_S = 60.0
"""The bound on one command: generous, it only decides how long a hang takes."""


def leaderrun(
    *args: str, dsn: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m leaderrun ARGS`` on ``dsn`` (as ``LEADERRUN_DSN``).

    The environment is bare but for ``env``: no developer's setting leaks in.
    stdout is a pipe, not a terminal.
    """
    return subprocess.run(
        [sys.executable, "-m", "leaderrun", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LEADERRUN_DSN": dsn, **(env or {})},
    )
