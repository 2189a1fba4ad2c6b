"""Passwords are found in every DSN spelling and masked in any text."""

import pytest

from leaderrun.redact import MASK, dsn_secrets, redact, url_secrets, url_shown


@pytest.mark.parametrize(
    ("dsn", "secrets"),
    [
        ("postgresql://app:s3cret@db.example/prod", ["s3cret"]),
        ("postgres://:s3cret@db", ["s3cret"]),
        ("postgresql://app:p@ss@db/prod", ["p@ss"]),
        ("postgresql://app:p%40ss%2Fw@db/prod", ["p%40ss%2Fw", "p@ss/w"]),
        (
            "postgresql://app@db/prod?sslmode=require&password=hunter2",
            ["hunter2"],
        ),
        ("postgresql://db/prod?password=a%26b%20c", ["a%26b%20c", "a&b c"]),
        ("host=db password=hunter2 dbname=prod", ["hunter2"]),
        ("password=hunter2", ["hunter2"]),
        ("host=db PASSWORD = hunter2", ["hunter2"]),
        (
            r"host=db password='it\'s a secret' dbname=prod",
            [r"'it\'s a secret'", "it's a secret"],
        ),
        ("host=db password='two words'", ["'two words'", "two words"]),
    ],
    ids=[
        "uri",
        "uri-no-user",
        "uri-at-in-password",
        "uri-percent-encoded",
        "uri-query",
        "uri-query-percent-encoded",
        "keyword",
        "keyword-only",
        "keyword-spaced-uppercase",
        "keyword-quoted-escaped-quote",
        "keyword-quoted-spaces",
    ],
)
def test_dsn_secrets_finds_every_spelling_longest_first(dsn, secrets):
    """Each password spelling (raw, decoded, unquoted) is found, longest first."""
    assert dsn_secrets(dsn) == secrets


@pytest.mark.parametrize(
    "dsn",
    [
        "",
        "postgresql://app@db.example:5432/prod",
        "postgresql://db.example:5432/prod?sslmode=require",
        "host=db user=app dbname=prod",
        "host=db passfile=/etc/pgpass",
    ],
)
def test_dsn_without_password_has_no_secrets(dsn):
    """A DSN that carries no password yields nothing to mask."""
    assert dsn_secrets(dsn) == []


@pytest.mark.parametrize(
    ("dsn", "text", "expected"),
    [
        (
            "postgresql://app:s3cret@db/prod",
            "cannot connect to postgresql://app:s3cret@db/prod: s3cret refused",
            f"cannot connect to postgresql://app:{MASK}@db/prod: {MASK} refused",
        ),
        (
            "postgresql://app:p%40ss@db/prod",
            "dsn postgresql://app:p%40ss@db/prod, password p@ss",
            f"dsn postgresql://app:{MASK}@db/prod, password {MASK}",
        ),
        (
            "postgresql://db/prod?password=a%26b",
            "query password=a%26b decoded a&b",
            f"query password={MASK} decoded {MASK}",
        ),
        (
            r"host=db password='it\'s a secret'",
            r"conninfo host=db password='it\'s a secret' (it's a secret)",
            f"conninfo host=db password={MASK} ({MASK})",
        ),
        (
            "host=db password=hunter2",
            "no password in this text",
            "no password in this text",
        ),
    ],
    ids=["uri", "percent-encoded", "query", "quoted-keyword", "absent"],
)
def test_redact_masks_every_spelling(dsn, text, expected):
    """Every spelling of the DSN's password in a text is replaced by the mask."""
    assert redact(text, dsn_secrets(dsn)) == expected


def test_redact_without_secrets_returns_text_unchanged():
    """With no secrets the text comes back as it was."""
    assert redact("host=db user=app", []) == "host=db user=app"


def test_mask_is_eight_stars():
    """The mask is a fixed string that says nothing about the password's length."""
    assert MASK == "********"


@pytest.mark.parametrize(
    "dsn", ["host=db sslpassword=keypass", "postgresql://db/x?sslpassword=keypass"]
)
def test_ssl_key_passphrase_is_a_secret(dsn):
    """sslpassword unlocks a client key: it is masked like a password."""
    assert dsn_secrets(dsn) == ["keypass"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://hc-ping.com/0d1b2c3e-5f60-4718-9a2b-3c4d5e6f7a8b",
            "https://hc-ping.com/…",
        ),
        ("https://user:pw@hc.example:8000/k?create=1", "https://hc.example:8000/…"),
        ("hc-ping.com/0d1b2c3e", "hc-ping.com/…"),
        ("https://hc-ping.com/", "https://hc-ping.com"),
    ],
)
def test_a_url_is_shown_as_its_scheme_and_host_only(url, shown):
    """Messages name the monitor, never its key, password or query."""
    assert url_shown(url) == shown


def test_a_url_s_secrets_mask_it_and_its_key_quoted_alone():
    """The whole URL, what follows the host, and a key-long segment are masked."""
    key = "0d1b2c3e-5f60-4718-9a2b-3c4d5e6f7a8b"
    url = f"https://hc-ping.com/{key}/start"
    secrets = url_secrets(url)
    assert redact(f"GET {url} failed", secrets) == f"GET {MASK} failed"
    assert redact(f"no check {key}", secrets) == f"no check {MASK}"
    assert redact("acquired start of the run", secrets) == "acquired start of the run"
    assert url_secrets("https://hc-ping.com/") == ["https://hc-ping.com/"]
