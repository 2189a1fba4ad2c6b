"""The peers table in RESULTS.md: one column per tool, a skipped tool's reason."""

from bench.peers import Table
from bench.report import PEERS, Results, results_md


def test_a_skipped_tool_says_why_in_every_row():
    """A tool the machine lacks is a column of reasons, not a missing column."""
    table = Table({"etcdctl lock": "etcd not on PATH"})
    table.row("start-up", {"leaderrun": "200 ms", "flock": "4 ms"})
    out = Results()
    table.write(out)
    assert out.peers == [
        ("start-up", "200 ms", "skipped: etcd not on PATH", "4 ms"),
    ]


def written(out: Results) -> str:
    idle = (0.0, 0.0, 0.0)
    return results_md(
        out, argv=[], took_s=1.0, described=[], load_before=idle, load_after=idle
    )


def test_results_md_has_the_peers_table_only_when_measured():
    """The second table follows the first, with a column per tool."""
    out = Results()
    assert "beside its peers" not in written(out)
    out.beside("hand-off", "18 ms", "3 ms", "1 ms")
    text = written(out)
    assert "## leaderrun beside its peers" in text
    assert f"| figure | {' | '.join(PEERS)} |" in text
    assert "| hand-off | 18 ms | 3 ms | 1 ms |" in text
