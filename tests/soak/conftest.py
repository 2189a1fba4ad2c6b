"""The soak's closing summary: one line per soak that ran in this session."""

from __future__ import annotations

import pytest

SUMMARIES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print each soak's figures, failed or not, at the end of the session."""
    if not SUMMARIES:
        return
    terminalreporter.section("soak")
    for line in SUMMARIES:
        terminalreporter.write_line(line)
