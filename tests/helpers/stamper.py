"""The bench's stamper (bench/stamp.c), compiled once per test that asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.stamp import Stamper, StamperError


@pytest.fixture
def stamper(tmp_path: Path) -> Stamper:
    """The stamper, built in ``tmp_path``; without a C compiler, a skip that says so."""
    built = Stamper(tmp_path)
    try:
        built.path  # noqa: B018 (compiled here)
    except StamperError as exc:
        pytest.skip(str(exc))
    return built
