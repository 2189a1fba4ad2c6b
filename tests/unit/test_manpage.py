"""man/leaderrun.1 lints clean and cannot drift from ``--help``.

Each option block of the page is marked ``.\\" options-for: SUBCOMMAND...``; the
test reads every ``.TP`` tag in those blocks and compares them, per subcommand,
with the options ``leaderrun SUBCOMMAND --help`` prints. Every option must also
name its environment twin (the one click reads) and its default.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from leaderrun import cli, errors

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man" / "leaderrun.1"
TOP = "leaderrun"
"""How the page names the options of leaderrun itself (no subcommand)."""
HELP_ONLY = {"-h", "--help"}
"""Every command has them; the page says so once instead of in every block."""
SECTIONS = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "SUBCOMMANDS",
    "OPTIONS",
    "EXIT STATUS",
    "SIGNALS",
    "ENVIRONMENT",
    "DATABASE",
    "SAFETY",
    "EXAMPLES",
    "SEE ALSO",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def roff_text(line: str) -> str:
    """A roff line as plain text: unescaped hyphens, no font requests or quotes."""
    line = re.sub(r"^\.(B|I|BI|BR|IR|RB|RI|IB)\s+", "", line)
    return line.replace("\\-", "-").replace('"', "")


def man_options() -> dict[str, dict[str, str]]:
    """{subcommand: {option: the text of its paragraph}} from the marked blocks."""
    found: dict[str, dict[str, str]] = {}
    owners: list[str] = []
    lines = MAN.read_text().splitlines()
    tags: list[str] = []
    body: list[str] = []

    def flush() -> None:
        for tag in tags:
            for owner in owners:
                found.setdefault(owner, {})[tag] = " ".join(body)

    for i, line in enumerate(lines):
        if line.startswith((".SH", ".SS", ".TP")):
            flush()
            tags, body = [], []
            if line.startswith((".SH", ".SS")):
                owners = []
            if line.startswith(".TP") and owners:
                tag_line = roff_text(lines[i + 1])
                tags = re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", tag_line)
                assert tags, f"no option in the .TP tag on line {i + 2}"
        elif line.startswith('.\\" options-for:'):
            owners = line.split(":", 1)[1].split()
        elif tags:
            body.append(roff_text(line))
    flush()
    return found


def help_options(subcommand: str) -> set[str]:
    """The option names ``leaderrun [SUBCOMMAND] --help`` prints."""
    args = [] if subcommand == TOP else [subcommand]
    result = subprocess.run(
        [sys.executable, "-m", "leaderrun", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    names: set[str] = set()
    section = ""
    for line in result.stdout.splitlines():
        # click's plain help (leaderrun never loads rich for it): a section
        # header "Options:", then "  -E, --busy-exit-code <int>  Exit status..."
        # (continuations of a description never start with a dash).
        if line and not line.startswith(" "):
            section = line.rstrip(":")
        match = re.match(r"^  (-\S.*?)(?:\s{2,}|$)", line)
        if match and section == "Options":
            names.update(
                t.rstrip(",") for t in match.group(1).split() if t.startswith("-")
            )
    assert names, result.stdout
    return names


def subcommands() -> list[str]:
    group = get_command(cli.app)
    return [TOP, *sorted(group.commands)]  # type: ignore[attr-defined]


def test_subcommands_are_the_routed_ones():
    assert set(subcommands()) - {TOP} == set(cli.SUBCOMMANDS)


@pytest.mark.parametrize("subcommand", subcommands())
def test_man_page_options_match_help(subcommand):
    documented = set(man_options().get(subcommand, {}))
    assert documented == help_options(subcommand) - HELP_ONLY


@pytest.mark.parametrize("subcommand", subcommands())
def test_every_option_names_its_environment_twin_and_default(subcommand):
    group = get_command(cli.app)
    command = (
        group if subcommand == TOP else group.commands[subcommand]  # type: ignore[attr-defined]
    )
    paragraphs = man_options()[subcommand]
    for param in command.params:
        if not isinstance(param, typer.core.TyperOption):
            continue
        for name in [*param.opts, *param.secondary_opts]:
            if name in HELP_ONLY:
                continue
            text = paragraphs[name]
            assert "Default:" in text, name
            assert "Environment:" in text, name
            envvar = getattr(param, "envvar", None)
            if envvar:
                assert envvar in text, (name, envvar)
            else:
                assert "Environment: none" in text, name


def test_man_page_has_every_section():
    headings = [
        line.removeprefix(".SH ").strip('"')
        for line in MAN.read_text().splitlines()
        if line.startswith(".SH ")
    ]
    assert headings == SECTIONS


def test_exit_status_section_lists_every_code():
    text = MAN.read_text()
    section = text.split('.SH "EXIT STATUS"')[1].split(".SH ")[0]
    codes = {
        value
        for name, value in vars(errors).items()
        if name.startswith("EXIT_") and isinstance(value, int)
    }
    tagged = set(re.findall(r"^\.TP\n\.B (\d+)$", section, re.MULTILINE))
    assert {str(code) for code in codes} <= tagged
    assert ".I 128+N" in section
    assert ".I the child's" in section


def groff_lint(page: Path) -> subprocess.CompletedProcess[str]:
    """``groff -man -ww -z`` on ``page``: warnings on stderr, nothing else."""
    groff = shutil.which("groff")
    if groff is None:
        if in_ci():
            pytest.fail("groff is missing; .ci/run installs groff-base")
        pytest.skip("groff is not installed (apt-get install groff-base)")
    return subprocess.run(
        [groff, "-man", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_man_page_lints_clean():
    result = groff_lint(MAN)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_lint_would_catch_a_bad_request(tmp_path):
    """The lint is not a no-op: an unknown request is reported."""
    bad = tmp_path / "bad.1"
    bad.write_text(MAN.read_text().replace(".SH NAME", ".SH NAME\n.XYZZY oops", 1))
    assert "XYZZY" in groff_lint(bad).stderr
