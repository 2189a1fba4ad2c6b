"""--ping's pure part: which URL each ping goes to."""

from __future__ import annotations

import pytest

from leaderrun.ping import ping_target

RID = "3f2c"


@pytest.mark.parametrize(
    ("url", "event", "target"),
    [
        ("https://hc-ping.com/KEY", "start", "https://hc-ping.com/KEY/start?rid=3f2c"),
        ("https://hc-ping.com/KEY/", "0", "https://hc-ping.com/KEY/0?rid=3f2c"),
        (
            "https://hc-ping.com/PK/backup?create=1",
            "122",
            "https://hc-ping.com/PK/backup/122?create=1&rid=3f2c",
        ),
        (
            "http://127.0.0.1:8000/ping/KEY",
            "124",
            "http://127.0.0.1:8000/ping/KEY/124?rid=3f2c",
        ),
    ],
    ids=["start", "trailing-slash", "slug-with-query", "self-hosted"],
)
def test_each_ping_appends_its_event_and_the_run_id(url, event, target):
    """/start or /<status> goes after the path, the rid into the query."""
    assert ping_target(url, event, RID) == target
