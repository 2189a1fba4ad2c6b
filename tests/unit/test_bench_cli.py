"""``python -m bench``'s command line: its options, and which figures it measures.

The bench itself is not CI's (bench/README.md); these tests run no figure.
"""

import subprocess
import sys
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench.report import Results

ROOT = Path(__file__).resolve().parents[2]


def test_bench_help_runs():
    """``python -m bench --help`` lists the knobs and says where results go."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--scale-procs" in done.stdout
    assert "RESULTS.md" in done.stdout


@pytest.fixture
def figures_measured(monkeypatch):
    """The figures ``python -m bench ARGV`` measures, in order; none really runs."""

    def measured(*argv: str) -> list[str]:
        ran: list[str] = []
        for name in bench_main.FIGURES:
            module = getattr(bench_main, name)
            monkeypatch.setattr(
                module, "run", lambda *_, name=name, **__: ran.append(name)
            )
        args = bench_main.parse_args(argv)
        bench_main.run_figures(args, "dbname=unused", None, Results())
        return ran

    return measured


def test_every_figure_runs_by_default(figures_measured):
    """Without --only, every figure is measured, start-up first and scale last."""
    assert figures_measured() == [
        "startup",
        "handoff",
        "pgbouncer",
        "failover",
        "peers",
        "statements",
        "fairness",
        "sizing",
        "scale",
    ]


def test_only_scale_does_not_run_start_up(figures_measured):
    """--only scale measures the scale run alone, not start-up too."""
    assert figures_measured("--only", "scale") == ["scale"]


def test_only_keeps_the_run_order(figures_measured):
    """--only names figures in any order; they are measured in the run's order."""
    assert figures_measured("--only", "scale", "startup", "handoff") == [
        "startup",
        "handoff",
        "scale",
    ]


def test_only_refuses_an_unknown_figure(capsys):
    """--only with a figure that does not exist is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        bench_main.parse_args(["--only", "speed"])
    assert exited.value.code == 2
    assert "invalid choice: 'speed'" in capsys.readouterr().err
