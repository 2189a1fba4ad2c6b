"""The test suite's choice of PostgreSQL: DSN, local binaries, an engine, or none."""

import pytest

from tests.pg import Route, RouteChoice, choose_route

NO_LOCAL = "initdb, pg_ctl and postgres are not on PATH nor in /usr/lib/postgresql"
NO_ENGINE = "no container engine answers (connection refused)"


class Engine:
    """An engine probe that answers ``problem`` and counts how often it was asked."""

    def __init__(self, problem: str | None) -> None:
        self.problem = problem
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.problem


@pytest.mark.parametrize(
    ("dsn", "local", "engine_answer", "in_ci", "expected", "engine_asked"),
    [
        pytest.param(
            "host=db", None, None, False, RouteChoice(Route.DSN), False, id="dsn-wins"
        ),
        pytest.param(
            "host=db", NO_LOCAL, NO_ENGINE, True, RouteChoice(Route.DSN), False,
            id="dsn-needs-nothing-else",
        ),
        pytest.param(
            None, None, None, False, RouteChoice(Route.LOCAL), False,
            id="local-before-container",
        ),
        pytest.param(
            None, NO_LOCAL, None, False, RouteChoice(Route.CONTAINER), True,
            id="container-without-local",
        ),
        pytest.param(
            None, NO_LOCAL, NO_ENGINE, False,
            RouteChoice(Route.NONE, f"{NO_LOCAL}; {NO_ENGINE}", fail=False), True,
            id="none-skips-outside-ci",
        ),
        pytest.param(
            None, NO_LOCAL, NO_ENGINE, True,
            RouteChoice(Route.NONE, f"{NO_LOCAL}; {NO_ENGINE}", fail=True), True,
            id="none-fails-in-ci",
        ),
    ],
)  # fmt: skip
def test_route_is_the_first_that_applies(
    dsn, local, engine_answer, in_ci, expected, engine_asked
):
    """DSN, then local binaries, then an engine; else skip, or fail under CI. The
    engine is asked only when its answer decides, since asking costs a connect."""
    probe = Engine(engine_answer)
    choice = choose_route(
        dsn=dsn, local_problem=local, engine_problem=probe, in_ci=in_ci
    )
    assert choice == expected
    assert probe.calls == (1 if engine_asked else 0)


@pytest.mark.parametrize(
    ("insist", "local", "engine_answer", "expected"),
    [
        pytest.param(
            "container", None, None, RouteChoice(Route.CONTAINER),
            id="container-although-local-exists",
        ),
        pytest.param(
            "container", None, NO_ENGINE,
            RouteChoice(Route.NONE, f"--pg-route container: {NO_ENGINE}", fail=True),
            id="container-missing-fails",
        ),
        pytest.param(
            "local", NO_LOCAL, None,
            RouteChoice(Route.NONE, f"--pg-route local: {NO_LOCAL}", fail=True),
            id="local-missing-fails-without-trying-the-engine",
        ),
    ],
)  # fmt: skip
def test_an_insisted_route_is_the_only_one(insist, local, engine_answer, expected):
    """--pg-route names the one route to take; its absence fails even outside CI."""
    choice = choose_route(
        dsn=None,
        local_problem=local,
        engine_problem=Engine(engine_answer),
        in_ci=False,
        insist=insist,
    )
    assert choice == expected


def test_the_header_names_the_route(pytestconfig):
    """pytest's header line starts with the route this session took."""
    from tests.pg import pytest_report_header

    (line,) = pytest_report_header(pytestconfig)
    routes = [route.value for route in Route]
    assert any(line.startswith(f"postgresql: {value}") for value in routes), line
