"""The bench's goals: each written once, it is both RESULTS.md's text and the check."""

import pytest

from bench.report import Goal, Results, results_md


@pytest.mark.parametrize(
    ("goal", "text"),
    [
        (Goal("ratio", 1.15), "ratio <= 1.15"),
        (Goal("median", 50, "<", "ms"), "median < 50 ms"),
        (Goal("", 1.1), "<= 1.1"),
        (Goal("", 1, unit="per waiter"), "<= 1 per waiter"),
        (Goal("", 1.2, unit="x"), "<= 1.2 x"),
        (Goal("each", 1, "=="), "1 each"),
        (Goal("errors", 0, "=="), "zero errors"),
        (Goal("", 1, "about", slack=0.5), "about 1"),
    ],
)
def test_a_goal_reads_as_results_md_shows_it(goal, text):
    """The goal column's text comes from the goal itself."""
    assert str(goal) == text


@pytest.mark.parametrize(
    ("goal", "met", "missed"),
    [
        (Goal("ratio", 1.15), [1.0, 1.15], [1.16]),
        (Goal("median", 50, "<", "ms"), [13.9, 49.99], [50, 51]),
        (Goal("errors", 0, "=="), [0], [1]),
        (Goal("each", 1, "=="), [1, 1.0], [0, 2, 1.01]),
        (Goal("", 1, "about", slack=0.5), [0.2, 1, 1.5], [1.51]),
    ],
)
def test_a_goal_checks_the_bound_it_names(goal, met, missed):
    """Values within the limit meet the goal, the first beyond it misses."""
    assert all(goal.met(value) for value in met)
    assert not any(goal.met(value) for value in missed)


def test_a_goal_on_several_values_needs_each_to_meet_it():
    """met(a, b, c) holds only if every value meets the goal (``1 each``)."""
    each = Goal("each", 1, "==")
    assert each.met(1, 1.0, 1)
    assert not each.met(1, 2, 1)


def test_a_checked_row_shows_the_goal_and_its_verdict(capsys):
    """Results.check writes the goal's text and the verdict after the shown value."""
    out = Results()
    out.check("start-up", "201 ms", "173 ms", Goal("ratio", 1.15), 1.16, "1.16")
    out.check("hand-off", "13.9 ms", "-", Goal("median", 50, "<", "ms"), 13.9)
    assert out.rows == [
        ("start-up", "201 ms", "173 ms", "ratio <= 1.15", "1.16: **no**"),
        ("hand-off", "13.9 ms", "-", "median < 50 ms", "yes"),
    ]
    assert "goal ratio <= 1.15: 1.16: **no**" in capsys.readouterr().out


def test_results_md_has_the_committed_shape():
    """The header, the machine, the load, one table row per figure, then notes."""
    out = Results()
    out.add("a figure", "1 ms", "2 ms", "-", "-")
    out.notes.append("a note.")
    text = results_md(
        out,
        argv=["--only", "startup"],
        took_s=12.4,
        described=["- date: today"],
        load_before=(0.5, 1.0, 1.5),
        load_after=(2.0, 2.5, 3.0),
    )
    assert text.splitlines() == [
        "# leaderrun benchmark results",
        "",
        "Written by `python -m bench --only startup`; took 12 s.",
        "",
        "- date: today",
        "- load average (1, 5, 15 min) before: 0.50, 1.00, 1.50; after: 2.00, "
        "2.50, 3.00 (other work on the machine shares its cores)",
        "",
        "| figure | leaderrun | baseline | goal | met |",
        "|---|---|---|---|---|",
        "| a figure | 1 ms | 2 ms | - | - |",
        "",
        "- a note.",
    ]
    assert text.endswith("\n")
