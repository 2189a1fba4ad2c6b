"""Settings: durations, the run options, their environment aliases and messages."""

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from leaderrun.config import (
    RawRunOptions,
    RunSettings,
    WatchdogMode,
    check_schema,
    parse_duration,
    resolve_dsn,
    run_settings,
)
from leaderrun.errors import EXIT_USAGE, ConfigError
from leaderrun.lease import LockId, Timing, name_key

COMMAND = ("./backup.sh", "--full")
LIBPQ_SOURCE = "the libpq environment (PGHOST, PGSERVICE, ...)"


def settings(env: Mapping[str, str] | None = None, **options: Any) -> RunSettings:
    """run_settings for COMMAND with the given raw options and environment."""
    return run_settings(RawRunOptions(**options), COMMAND, env or {}, now_s=0.0)


def config_error(call: Callable[..., object], *args: Any, **kwargs: Any) -> str:
    """The message of the ConfigError that call(*args, **kwargs) raises."""
    with pytest.raises(ConfigError) as excinfo:
        call(*args, **kwargs)
    assert excinfo.value.exit_code == EXIT_USAGE
    return excinfo.value.message


# --- parse_duration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("2m30s", 150.0),
        ("1m500ms", 60.5),
        ("5", 5.0),
        ("0", 0.0),
        (".5", 0.5),
        ("5.", 5.0),
        ("  2s ", 2.0),
        ("2S", 2.0),
        ("1H30M", 5400.0),
    ],
)
def test_parse_duration_accepts_units_and_bare_seconds(text, seconds):
    """Durations take ms/s/m/h/d parts, case-insensitively; a bare number is seconds."""
    assert parse_duration(text, option="--lease-duration") == seconds


@pytest.mark.parametrize(
    "text", ["", "   ", "abc", "5x", "-1s", "1s2", "s", "1 s", "1e3", "inf", "1..5s"]
)
def test_parse_duration_rejects_other_text(text):
    """Anything but a number with optional unit parts is refused, naming the option."""
    assert config_error(parse_duration, text, option="--jitter") == (
        f"--jitter {text!r} is not a duration; use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    )


def test_parse_duration_message_verbatim():
    """The message names the option, quotes the value and lists accepted forms."""
    assert config_error(parse_duration, "5x", option="--wait-timeout") == (
        "--wait-timeout '5x' is not a duration; use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    )


# --- run_settings -----------------------------------------------------------------


def test_run_settings_defaults():
    """With only a lock id, every other setting has its documented default."""
    assert settings(lock_id="nightly-backup") == RunSettings(
        lock=LockId(name_key("nightly-backup"), "nightly-backup"),
        dsn="",
        dsn_source=LIBPQ_SOURCE,
        schema="public",
        timing=Timing(30.0, 5.0, 1.0, 5.0),
        wait=False,
        wait_timeout_s=None,
        busy_exit_code=75,
        command=COMMAND,
    )


def test_watchdog_is_on_unless_turned_off():
    """The watchdog is on by default; the option turns it off or requires it."""
    assert settings(lock_id="x").watchdog is WatchdogMode.on
    assert settings(lock_id="x", watchdog="off").watchdog is WatchdogMode.off
    assert settings(lock_id="x", watchdog="false").watchdog is WatchdogMode.off
    assert settings(lock_id="x", watchdog="required").watchdog is (
        WatchdogMode.required
    )


def test_a_bad_watchdog_mode_is_named_with_the_accepted_words():
    """--watchdog takes on, off or required; anything else is one clear error."""
    with pytest.raises(ConfigError, match=r"^--watchdog 'maybe' must be on, off or"):
        settings(lock_id="x", watchdog="maybe")


def test_run_settings_without_command_is_an_error():
    """An empty command is refused with an example of where it goes."""
    assert config_error(
        run_settings, RawRunOptions(lock_id="7"), (), {}, now_s=0.0
    ) == (
        "no command given; put it after --, e.g. "
        "leaderrun --lock-id nightly-backup -- ./backup.sh"
    )


@pytest.mark.parametrize("code", [-1, 256, 1000])
def test_busy_exit_code_outside_a_byte_is_rejected(code):
    """A busy exit code that is not 0..255 is refused."""
    assert config_error(settings, lock_id="7", busy_exit_code=code) == (
        f"--busy-exit-code {code} must be between 0 and 255"
    )


@pytest.mark.parametrize(("code", "expected"), [(None, 75), (0, 0), (1, 1), (255, 255)])
def test_busy_exit_code_in_range_is_kept(code, expected):
    """A busy exit code of 0..255 is used as given; unset means 75."""
    assert settings(lock_id="7", busy_exit_code=code).busy_exit_code == expected


@pytest.mark.parametrize(
    ("wait", "wait_timeout", "expected_wait", "expected_timeout_s"),
    [
        (False, None, False, None),
        (True, None, True, None),
        (False, "2m", True, 120.0),
        (False, "0", True, 0.0),
        (True, "90s", True, 90.0),
    ],
)
def test_wait_timeout_implies_wait(
    wait, wait_timeout, expected_wait, expected_timeout_s
):
    """Giving --wait-timeout turns waiting on, with the timeout in seconds."""
    result = settings(lock_id="7", wait=wait, wait_timeout=wait_timeout)
    assert (result.wait, result.wait_timeout_s) == (expected_wait, expected_timeout_s)


# --- timing from options and LE_* aliases -----------------------------------------


@pytest.mark.parametrize(
    ("env", "timing"),
    [
        ({"LE_LEASE_DURATION": "15000"}, Timing(15.0, 2.5, 0.5, 2.5)),
        ({"LE_RENEWAL_INTERVAL": "2000"}, Timing(30.0, 2.0, 0.4, 5.0)),
        ({"LE_JITTER_RANGE": "500"}, Timing(30.0, 5.0, 0.5, 5.0)),
        (
            {
                "LE_LEASE_DURATION": "60000",
                "LE_RENEWAL_INTERVAL": "7500",
                "LE_JITTER_RANGE": "250",
            },
            Timing(60.0, 7.5, 0.25, 5.0),
        ),
        ({"LE_LEASE_DURATION": ""}, Timing(30.0, 5.0, 1.0, 5.0)),
    ],
)
def test_seed_aliases_are_milliseconds(env, timing):
    """The seed's LE_* timing variables are read as milliseconds; empty is unset."""
    assert settings(env, lock_id="7").timing == timing


def test_options_win_over_seed_aliases():
    """A flag or LEADERRUN_* twin overrides the matching LE_* alias."""
    env = {
        "LE_LEASE_DURATION": "15000",
        "LE_RENEWAL_INTERVAL": "2000",
        "LE_JITTER_RANGE": "500",
    }
    result = settings(
        env,
        lock_id="7",
        lease_duration="20s",
        renew_interval="3s",
        jitter="250ms",
        kill_grace="1s",
    )
    assert result.timing == Timing(20.0, 3.0, 0.25, 1.0)


def test_timing_options_are_durations():
    """The timing options are parsed as durations with units."""
    result = settings(lock_id="7", lease_duration="1m", kill_grace="2s")
    assert result.timing == Timing(60.0, 10.0, 2.0, 2.0)


# --- lock ids ---------------------------------------------------------------------


def test_seed_lock_id_is_the_fallback():
    """Without --lock-id the seed's LE_LOCK_ID names the lock."""
    assert settings({"LE_LOCK_ID": "42"}).lock == LockId(42)
    assert settings({"LE_LOCK_ID": "jobs"}).lock == LockId(name_key("jobs"), "jobs")


def test_lock_id_option_wins_over_seed_lock_id():
    """--lock-id (or LEADERRUN_LOCK_ID) overrides LE_LOCK_ID."""
    assert settings({"LE_LOCK_ID": "42"}, lock_id="7").lock == LockId(7)


def test_missing_lock_id_is_an_error():
    """With no lock id anywhere the message says how to give one."""
    assert config_error(settings) == (
        "no --lock-id given; name the lock, e.g. --lock-id nightly-backup "
        "(or set LEADERRUN_LOCK_ID)"
    )


# --- DSN and schema ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "env", "expected"),
    [
        (
            "host=flag",
            {"DATABASE_URL": "postgresql://url"},
            ("host=flag", "--dsn"),
        ),
        (
            None,
            {"DATABASE_URL": "postgresql://url"},
            ("postgresql://url", "DATABASE_URL"),
        ),
        (
            "",
            {"DATABASE_URL": "postgresql://url"},
            ("postgresql://url", "DATABASE_URL"),
        ),
        (None, {"PGHOST": "db", "PGUSER": "app"}, ("", LIBPQ_SOURCE)),
        (None, {"DATABASE_URL": ""}, ("", LIBPQ_SOURCE)),
        (None, {}, ("", LIBPQ_SOURCE)),
    ],
)
def test_resolve_dsn_precedence(dsn, env, expected):
    """--dsn wins over DATABASE_URL, which wins over libpq's own environment."""
    assert resolve_dsn(dsn, env) == expected


def test_run_settings_carries_the_dsn_and_its_source():
    """The resolved DSN and where it came from reach the settings."""
    result = settings({"DATABASE_URL": "postgresql://url"}, lock_id="7")
    assert (result.dsn, result.dsn_source) == ("postgresql://url", "DATABASE_URL")


@pytest.mark.parametrize(
    "schema", ["public", "a", "a" * 63, "é" * 31, "Weird Name", 'quo"te']
)
def test_check_schema_accepts_identifiers_up_to_63_bytes(schema):
    """Any schema name of 1 to 63 bytes without NUL is accepted as is."""
    assert check_schema(schema) == schema


@pytest.mark.parametrize("schema", ["", "a" * 64, "é" * 32, "a\x00b"])
def test_check_schema_rejects_empty_long_or_nul(schema):
    """An empty schema, one over 63 UTF-8 bytes, or one with NUL is refused."""
    assert config_error(check_schema, schema) == (
        f"--schema {schema!r} must be a PostgreSQL identifier of 1 to 63 bytes"
    )


def test_run_settings_checks_the_schema():
    """An invalid --schema is refused by run_settings too."""
    assert config_error(settings, lock_id="7", schema="x" * 64) == (
        f"--schema {'x' * 64!r} must be a PostgreSQL identifier of 1 to 63 bytes"
    )
    assert settings(lock_id="7", schema="jobs").schema == "jobs"


# --- labels -----------------------------------------------------------------------


def test_label_is_the_flag_unless_given():
    """An option is named by its flag unless labels names where it came from."""
    options = RawRunOptions(labels={"jitter": "LEADERRUN_JITTER"})
    assert options.label("jitter", "--jitter") == "LEADERRUN_JITTER"
    assert options.label("lease_duration", "--lease-duration") == "--lease-duration"


@pytest.mark.parametrize(
    ("name", "flag", "env_var"),
    [
        ("lease_duration", "--lease-duration", "LEADERRUN_LEASE_DURATION"),
        ("renew_interval", "--renew-interval", "LEADERRUN_RENEW_INTERVAL"),
        ("jitter", "--jitter", "LEADERRUN_JITTER"),
        ("kill_grace", "--kill-grace", "LEADERRUN_KILL_GRACE"),
        ("wait_timeout", "--wait-timeout", "LEADERRUN_WAIT_TIMEOUT"),
    ],
)
def test_env_sourced_duration_is_named_by_its_variable(name, flag, env_var):
    """A bad duration from the environment is reported under its variable's name."""
    value: dict[str, Any] = {name: "soon"}
    from_env = RawRunOptions(lock_id="7", labels={name: env_var}, **value)
    from_flag = RawRunOptions(lock_id="7", **value)
    suffix = " 'soon' is not a duration; use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    errors = [
        config_error(run_settings, options, COMMAND, {}, now_s=0.0)
        for options in (from_env, from_flag)
    ]
    assert errors == [env_var + suffix, flag + suffix]


@pytest.mark.parametrize(
    "alias", ["LE_LEASE_DURATION", "LE_RENEWAL_INTERVAL", "LE_JITTER_RANGE"]
)
def test_bad_seed_alias_is_named_by_its_variable(alias):
    """A bad LE_* value is reported under the LE_* variable's name."""
    assert config_error(settings, {alias: "fast"}, lock_id="7") == (
        f"{alias} 'fast' is not a duration; use e.g. 250ms, 1.5s, 10s, 2m or 1h"
    )


@pytest.mark.parametrize(
    ("value", "seconds"), [("15000", 15.0), ("15s", 15.0), ("1.5m", 90.0)]
)
def test_seed_alias_with_a_unit_means_what_it_says(value, seconds):
    """LE_* bare numbers are milliseconds; a value with a unit is not divided."""
    timing = settings({"LE_LEASE_DURATION": value}, lock_id="7").timing
    assert timing.lease_s == seconds


@pytest.mark.parametrize("text", ["1s1s", "30m1h", "5ms1s"])
def test_parse_duration_wants_each_unit_once_largest_first(text):
    """1h30m is a duration; repeated or reversed units are a typo, not a sum."""
    with pytest.raises(ConfigError):
        parse_duration(text, option="--x")


@pytest.mark.parametrize(
    ("options", "label"),
    [
        (
            {"lock_id": " bad", "labels": {"lock_id": "LEADERRUN_LOCK_ID"}},
            "LEADERRUN_LOCK_ID",
        ),
        (
            {
                "lock_id": "7",
                "busy_exit_code": 300,
                "labels": {"busy_exit_code": "LEADERRUN_BUSY_EXIT_CODE"},
            },
            "LEADERRUN_BUSY_EXIT_CODE",
        ),
        (
            {
                "lock_id": "7",
                "lease_duration": "0",
                "labels": {"lease_duration": "LEADERRUN_LEASE_DURATION"},
            },
            "LEADERRUN_LEASE_DURATION",
        ),
        ({"lock_id": "7", "renew_interval": "0ms"}, "--renew-interval"),
    ],
)
def test_errors_name_where_the_value_came_from(options, label):
    """Range errors, not only parse errors, name the flag or variable that set it."""
    assert config_error(settings, **options).startswith(label + " ")


def test_seed_lock_id_errors_name_the_seed_variable():
    """A bad LE_LOCK_ID is reported as LE_LOCK_ID, not as --lock-id."""
    assert config_error(settings, {"LE_LOCK_ID": " bad"}).startswith("LE_LOCK_ID ")


def test_empty_schema_is_an_error_not_public():
    """--schema '' is refused rather than silently replaced by the default."""
    assert "--schema ''" in config_error(settings, lock_id="7", schema="")


def test_dsn_source_names_the_environment_twin():
    """A DSN from LEADERRUN_DSN says so."""
    options: dict[str, Any] = {
        "lock_id": "7",
        "dsn": "host=db",
        "labels": {"dsn": "LEADERRUN_DSN"},
    }
    assert settings(**options).dsn_source == "LEADERRUN_DSN"


# --- --capture-output and --ping --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("64k", 65536), ("512", 512), ("1m", 1048576), ("64 KiB", 65536), ("0", None)],
)
def test_capture_output_takes_a_size_and_zero_is_off(text, size):
    """Units are of 1024; 0 turns it off; off by default."""
    assert settings(lock_id="x", capture_output=text).capture_bytes == size
    assert settings(lock_id="x").capture_bytes is None


def test_a_bad_capture_size_is_named_verbatim():
    """Not a size, or more than the tail may hold, each in one line."""
    assert config_error(settings, lock_id="x", capture_output="1.5k") == (
        "--capture-output '1.5k' is not a size; use e.g. 64k, 512 or 1m"
    )
    env_named = {"capture_output": "LEADERRUN_CAPTURE_OUTPUT"}
    assert config_error(
        settings, lock_id="x", capture_output="2m", labels=env_named
    ) == (
        "LEADERRUN_CAPTURE_OUTPUT '2m' is more than 1m, the most kept in memory "
        "and in the run history; use e.g. 64k"
    )


def test_a_ping_url_is_kept_as_given():
    """An http(s) URL with a host is the setting; none by default."""
    url = "https://hc-ping.com/0d1b2c3e-5f60-4718-9a2b-3c4d5e6f7a8b"
    assert settings(lock_id="x", ping=url).ping_url == url
    assert settings(lock_id="x").ping_url is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "ftp://hc-ping.com/SECRETKEY",
            "--ping 'ftp://hc-ping.com/…' must be an http:// or https:// URL with a "
            "host, e.g. https://hc-ping.com/<uuid>",
        ),
        (
            "http://hc-ping.com:99999/SECRETKEY",
            "--ping 'http://hc-ping.com:99999/…' must be an http:// or https:// URL "
            "with a host, e.g. https://hc-ping.com/<uuid>",
        ),
        (
            "https://me:SECRETKEY@hc-ping.com/x",
            "--ping 'https://hc-ping.com/…' must not carry a user or password; the "
            "key goes in the path, e.g. https://hc-ping.com/<uuid>",
        ),
        (
            "https://hc-ping.com/SECRETKEY\n",
            None,  # surrounding blanks are trimmed, not an error
        ),
        (
            "https://hc-ping.com/SECRET KEY",
            "--ping 'https://hc-ping.com/…' must be ASCII without spaces; "
            "percent-encode other characters",
        ),
    ],
    ids=["scheme", "port", "user", "trimmed", "space"],
)
def test_a_bad_ping_url_is_named_without_its_key(url, message):
    """Each message shows the scheme and host, never the path that holds the key."""
    if message is None:
        assert settings(lock_id="x", ping=url).ping_url == url.strip()
        return
    assert config_error(settings, lock_id="x", ping=url) == message


# --- --listen-dsn -------------------------------------------------------------------


def test_listen_dsn_is_kept_for_a_waiter():
    """With --wait (or --wait-timeout) the waiter listens there."""
    assert settings(lock_id="x", wait=True, listen_dsn="host=db").listen_dsn == (
        "host=db"
    )
    assert settings(lock_id="x", wait_timeout="5m", listen_dsn="host=db").listen_dsn
    assert settings(lock_id="x", wait=True).listen_dsn is None


def test_listen_dsn_without_wait_is_refused_as_a_flag_and_ignored_from_env():
    """Only a waiter listens: the flag alone is a mistake, a fleet-wide variable not."""
    assert config_error(settings, lock_id="x", listen_dsn="host=db") == (
        "--listen-dsn is for --wait: only a waiting contender listens; add --wait "
        "or drop --listen-dsn"
    )
    from_env = {"listen_dsn": "LEADERRUN_LISTEN_DSN"}
    assert (
        settings(lock_id="x", listen_dsn="host=db", labels=from_env).listen_dsn is None
    )


def test_listen_dsn_is_refused_with_sqlite():
    """A SQLite store has no notifications to listen for."""
    assert config_error(
        settings,
        lock_id="x",
        dsn="sqlite:///var/lib/l.db",
        wait=True,
        listen_dsn="host=db",
    ) == (
        "--listen-dsn needs PostgreSQL for the lease and for listening; a SQLite "
        "store has no notifications: drop it"
    )
