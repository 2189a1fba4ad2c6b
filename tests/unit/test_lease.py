"""The pure lease core: timing defaults and safety, deadlines, delays and lock ids."""

import hashlib
import math
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from leaderrun.errors import EXIT_USAGE, ConfigError, UnsafeTimingError
from leaderrun.lease import (
    CLOCK_RATE_BOUND,
    KILL_CONFIRM_S,
    MIN_ATTEMPT_BUDGET_S,
    LockId,
    Timing,
    kill_deadline,
    make_holder,
    make_timing,
    name_key,
    parse_lock_id,
    renewal_delay_s,
    reply_in_time,
    retry_delay_s,
    timing_problem,
)

DEFAULT = make_timing()
"""The default timing: 30 s lease, renew every 5 s, 1 s jitter, 5 s kill grace."""

_SUGGESTION = re.compile(r"; use --lease-duration ([0-9]+(?:\.[0-9]+)?)s or more,")

# --- make_timing: defaults -------------------------------------------------------


def test_default_timing_is_30s_lease_5s_renew_1s_jitter_5s_grace():
    """Without arguments the lease is 30 s, renewed every 5 s +- 1 s, with 5 s grace."""
    assert make_timing() == Timing(
        lease_s=30.0, renew_interval_s=5.0, jitter_s=1.0, kill_grace_s=5.0
    )


def test_default_timing_derived_quantities():
    """The default timing has a 0.6 s clock margin, 5 s attempts and a ~23.87 s kill."""
    assert DEFAULT.db_clock_margin_s == pytest.approx(0.6, abs=1e-12)
    assert DEFAULT.kill_deadline_s == pytest.approx(29.4 / 1.001 - 5.5, abs=1e-12)
    assert DEFAULT.attempt_budget_s == 5.0


@pytest.mark.parametrize(
    ("lease_s", "renew_s", "jitter_s", "grace_s"),
    [
        (6.0, 1.0, 0.2, 1.0),
        (12.0, 2.0, 0.4, 2.0),
        (30.0, 5.0, 1.0, 5.0),
        (60.0, 10.0, 2.0, 5.0),  # the grace is capped at 5 s
        (600.0, 100.0, 20.0, 5.0),
    ],
)
def test_derived_defaults_follow_the_lease(lease_s, renew_s, jitter_s, grace_s):
    """Renew is lease/6, jitter renew/5, and grace lease/6 capped at 5 s."""
    assert make_timing(lease_s) == Timing(lease_s, renew_s, jitter_s, grace_s)


def test_derived_jitter_follows_an_explicit_renew_interval():
    """An explicit renew interval sets the default jitter to a fifth of it."""
    assert make_timing(30.0, renew_interval_s=2.0) == Timing(30.0, 2.0, 0.4, 5.0)


def test_explicit_zero_jitter_and_grace_are_kept():
    """A jitter or kill grace of zero is a valid choice, not a request for defaults."""
    assert make_timing(30.0, jitter_s=0.0, kill_grace_s=0.0) == Timing(
        30.0, 5.0, 0.0, 0.0
    )


@pytest.mark.parametrize(
    ("lease_s", "margin_s"),
    [(3.2, 0.5), (25.0, 0.5), (30.0, 0.6), (100.0, 2.0)],
)
def test_db_clock_margin_is_2_percent_with_half_second_floor(lease_s, margin_s):
    """The database clock allowance is 2 % of the lease, but never under 0.5 s."""
    assert make_timing(lease_s).db_clock_margin_s == pytest.approx(margin_s, abs=1e-12)


# --- make_timing: bad values -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lease_s": 0.0}, "--lease-duration must be positive, not 0.0"),
        ({"lease_s": -1.0}, "--lease-duration must be positive, not -1.0"),
        ({"lease_s": math.nan}, "--lease-duration must be positive, not nan"),
        ({"lease_s": math.inf}, "--lease-duration must be positive, not inf"),
        (
            {"renew_interval_s": 0.0},
            "--renew-interval must be a positive duration, not 0.0",
        ),
        (
            {"renew_interval_s": -1.0},
            "--renew-interval must be a positive duration, not -1.0",
        ),
        (
            {"renew_interval_s": math.inf},
            "--renew-interval must be a positive duration, not inf",
        ),
        ({"jitter_s": -0.5}, "--jitter must be zero or a positive duration, not -0.5"),
        (
            {"jitter_s": math.nan},
            "--jitter must be zero or a positive duration, not nan",
        ),
        (
            {"kill_grace_s": -1.0},
            "--kill-grace must be zero or a positive duration, not -1.0",
        ),
        (
            {"kill_grace_s": math.inf},
            "--kill-grace must be zero or a positive duration, not inf",
        ),
    ],
)
def test_out_of_range_timing_is_a_config_error(kwargs, message):
    """A non-finite, negative or zero (renew) timing value is rejected by name."""
    with pytest.raises(ConfigError) as excinfo:
        make_timing(**kwargs)
    assert type(excinfo.value) is ConfigError
    assert excinfo.value.message == message
    assert excinfo.value.exit_code == EXIT_USAGE


# --- make_timing: the safety inequality -----------------------------------------


def test_unsafe_timing_message_verbatim():
    """A too-short lease is refused with the inequality, its numbers and a fix."""
    with pytest.raises(UnsafeTimingError) as excinfo:
        make_timing(3.0)
    assert excinfo.value.message == (
        "unsafe timing: renew-interval + jitter + 2 x attempt budget "
        "(0.5s + 0.1s + 2 x 0.5s = 1.6s) must not exceed the kill deadline "
        "(lease - margin)/(1 + rho) - kill-grace - kill-confirm = "
        "(3s - 0.5s)/1.001 - 0.5s - 0.5s = 1.498s; use --lease-duration 3.2s or more, "
        "or a shorter --renew-interval, --jitter or --kill-grace"
    )
    assert excinfo.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(
    ("lease_s", "renew_s", "jitter_s", "grace_s", "suggested"),
    [
        (3.0, None, None, None, "3.2"),
        (0.1, None, None, None, "3.2"),
        (30.0, 20.0, None, None, "31.2"),
        (1.0, 0.05, 0.0, 0.0, "2.1"),
        (10.0, 6.0, 1.0, 2.0, None),
        (60.0, None, None, 50.0, None),
        (30.0, None, 20.0, None, None),
    ],
)
def test_unsafe_timing_suggests_the_shortest_lease_that_passes(
    lease_s, renew_s, jitter_s, grace_s, suggested
):
    """The suggested lease passes with the same explicit values; 0.1 s less fails."""
    explicit = {
        "renew_interval_s": renew_s,
        "jitter_s": jitter_s,
        "kill_grace_s": grace_s,
    }
    with pytest.raises(UnsafeTimingError) as excinfo:
        make_timing(lease_s, **explicit)
    message = excinfo.value.message
    assert message.startswith(
        "unsafe timing: renew-interval + jitter + 2 x attempt budget ("
    )
    assert (
        ") must not exceed the kill deadline "
        "(lease - margin)/(1 + rho) - kill-grace - kill-confirm = ("
    ) in message
    assert message.endswith(", or a shorter --renew-interval, --jitter or --kill-grace")
    match = _SUGGESTION.search(message)
    assert match is not None, message
    if suggested is not None:
        assert match.group(1) == suggested
    tenths = round(float(match.group(1)) * 10)
    assert make_timing(tenths / 10, **explicit).lease_s == tenths / 10
    with pytest.raises(UnsafeTimingError):
        make_timing((tenths - 1) / 10, **explicit)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much],
)
@given(
    lease_s=st.floats(min_value=0.1, max_value=7200.0),
    renew_fraction=st.none() | st.floats(min_value=0.001, max_value=0.6),
    jitter_fraction=st.none() | st.floats(min_value=0.0, max_value=1.0),
    grace_fraction=st.none() | st.floats(min_value=0.0, max_value=0.6),
)
def test_accepted_timing_satisfies_the_safety_inequalities(
    lease_s, renew_fraction, jitter_fraction, grace_fraction
):
    """Any timing make_timing accepts kills in time and leaves two renewal attempts."""
    renew_s = None if renew_fraction is None else renew_fraction * lease_s
    jitter_s = None
    if jitter_fraction is not None:
        jitter_s = jitter_fraction * (renew_s if renew_s is not None else lease_s / 6)
    grace_s = None if grace_fraction is None else grace_fraction * lease_s
    # Filter with timing_problem on the same values make_timing derives, so that a
    # rejected draw does not pay for make_timing's search for a suggested lease.
    derived_renew_s = lease_s / 6 if renew_s is None else renew_s
    candidate = Timing(
        lease_s=lease_s,
        renew_interval_s=derived_renew_s,
        jitter_s=derived_renew_s / 5 if jitter_s is None else jitter_s,
        kill_grace_s=min(5.0, lease_s / 6) if grace_s is None else grace_s,
    )
    assume(timing_problem(candidate) is None)
    t = make_timing(lease_s, renew_s, jitter_s, grace_s)
    assert t == candidate
    assert (1 + CLOCK_RATE_BOUND) * (
        t.kill_deadline_s + t.kill_grace_s + KILL_CONFIRM_S
    ) <= t.lease_s - t.db_clock_margin_s + 1e-9
    assert t.renew_interval_s + t.jitter_s + 2 * t.attempt_budget_s <= (
        t.kill_deadline_s + 1e-9
    )
    assert t.attempt_budget_s >= MIN_ATTEMPT_BUDGET_S


# --- deadlines --------------------------------------------------------------------


def test_kill_deadline_counts_from_the_send_instant():
    """The kill deadline is t_sent plus the timing's kill deadline, nothing else."""
    assert kill_deadline(1000.0, DEFAULT) == 1000.0 + DEFAULT.kill_deadline_s
    assert kill_deadline(0.0, DEFAULT) == DEFAULT.kill_deadline_s


@pytest.mark.parametrize(
    ("offset", "in_time"),
    [
        ("sent", True),
        ("just before", True),
        ("at", False),
        ("just after", False),
        ("a second after", False),
    ],
)
def test_reply_in_time_at_the_kill_deadline_boundary(offset, in_time):
    """A reply counts strictly before the kill deadline, and not at or after it."""
    t_sent_s = 1000.0
    deadline_s = kill_deadline(t_sent_s, DEFAULT)
    now_s = {
        "sent": t_sent_s,
        "just before": math.nextafter(deadline_s, -math.inf),
        "at": deadline_s,
        "just after": math.nextafter(deadline_s, math.inf),
        "a second after": deadline_s + 1.0,
    }[offset]
    assert reply_in_time(t_sent_s, now_s, DEFAULT) is in_time


# --- delays -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit_random", "delay_s"),
    [(0.0, 5.0), (0.25, 5.25), (0.5, 5.5)],
)
def test_renewal_delay_is_interval_plus_a_share_of_jitter(unit_random, delay_s):
    """The renewal sleep is the renew interval plus unit_random times the jitter."""
    assert renewal_delay_s(DEFAULT, unit_random) == delay_s


@pytest.mark.parametrize("unit_random", [0.0, 0.3, 0.999])
def test_renewal_delay_is_within_the_jitter_window(unit_random):
    """For unit_random in [0, 1) the sleep is in [interval, interval + jitter)."""
    delay_s = renewal_delay_s(DEFAULT, unit_random)
    assert 5.0 <= delay_s < 6.0


@pytest.mark.parametrize(
    ("expires_in_s", "unit_random", "delay_s"),
    [
        (3.0, 0.0, 3.0),
        (3.0, 0.5, 3.5),
        (None, 0.0, 0.05),
        (None, 0.5, 0.5),
        (0.0, 0.0, 0.05),
        (-2.0, 0.0, 0.05),
        (-2.0, 0.25, 0.25),
        (0.01, 0.0, 0.05),
        (0.0, 0.01, 0.05),
        (0.04, 0.02, 0.06),
    ],
    ids=[
        "expiry",
        "expiry+jitter",
        "none",
        "none+jitter",
        "zero",
        "negative",
        "negative+jitter",
        "tiny-expiry-floor",
        "tiny-jitter-floor",
        "just-above-floor",
    ],
)
def test_retry_delay_waits_for_holder_expiry_plus_jitter(
    expires_in_s, unit_random, delay_s
):
    """A waiter sleeps until the holder expiry plus jitter, at least 0.05 s."""
    assert retry_delay_s(expires_in_s, DEFAULT, unit_random) == pytest.approx(
        delay_s, abs=1e-12
    )


@pytest.mark.parametrize("unit_random", [0.0, 0.3, 0.999])
def test_retry_delay_is_within_the_jitter_window(unit_random):
    """For unit_random in [0, 1) the delay is in [expiry, expiry + jitter)."""
    delay_s = retry_delay_s(10.0, DEFAULT, unit_random)
    assert 10.0 <= delay_s < 10.0 + DEFAULT.jitter_s


# --- lock ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("42", 42),
        ("0", 0),
        ("-0", 0),
        ("+5", 5),
        ("-7", -7),
        ("0042", 42),
        (" 42 ", 42),
        ("\t42\n", 42),
        ("9223372036854775807", 2**63 - 1),
        ("-9223372036854775808", -(2**63)),
    ],
)
def test_integer_lock_id_is_its_own_key(text, key):
    """An integer lock id (surrounding whitespace ignored) is used as the key as is."""
    lock = parse_lock_id(text)
    assert lock == LockId(key)
    assert lock.name is None
    assert str(lock) == str(key)


PADDED = "must be an integer or a name without leading or trailing spaces"
LONG = "must be at most 200 printable characters"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        *[
            (t, "does not fit in 64 bits; use a smaller number or a name")
            for t in ("9223372036854775808", "-9223372036854775809")
        ],
        *[(t, PADDED) for t in ("", " ", " name", "name ", "\tname", "\xa0name")],
        *[
            (t, LONG)
            for t in (
                "a" * 201,
                "a\tb",
                "a\nb",
                "a\x00b",
                "a\x7fb",
                "a\u200bb",
                "\ud800",
            )
        ],
    ],
)
def test_a_bad_lock_id_is_refused_in_one_line_naming_it(text, problem):
    """An integer beyond 64 bits, an empty or padded name, or a name too long or
    with a non-printable character: refused, naming the value (cut to 40)."""
    with pytest.raises(ConfigError) as excinfo:
        parse_lock_id(text)
    assert excinfo.value.message == f"--lock-id {text[:40]!r} {problem}"


@pytest.mark.parametrize(
    "name",
    ["nightly-backup", "a b", "123abc", "12.5", "0x10", "é", "a" * 200],
)
def test_name_lock_id_is_hashed_and_keeps_its_name(name):
    """A lock name is kept for display and keyed by its name_key hash."""
    lock = parse_lock_id(name)
    assert lock == LockId(name_key(name), name)
    assert str(lock) == name


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("nightly-backup", 4085101115577103962),
        ("a", -3848465438864589366),
        ("é", 5375421630974772051),
    ],
)
def test_name_key_is_pinned(name, key):
    """The key of a name never changes: a new hash would split a fleet in two locks."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    assert int.from_bytes(digest[:8], "big", signed=True) == key
    assert name_key(name) == key


def test_make_holder_joins_host_pid_and_nonce():
    """The holder identity is host:pid:nonce."""
    assert make_holder("node-1", 4242, "f00d") == "node-1:4242:f00d"


def test_unsafe_message_never_shows_negative_zero():
    """Rounded tiny negatives print as 0s, not -0s."""
    with pytest.raises(UnsafeTimingError) as excinfo:
        make_timing(1.0, 0.05, 0.0, 0.0)
    assert "-0s" not in str(excinfo.value)


def test_suggestion_is_found_quickly_for_huge_values():
    """A wild --renew-interval still gets a working suggestion, by bisection."""
    with pytest.raises(UnsafeTimingError) as excinfo:
        make_timing(30, renew_interval_s=100000)
    message = str(excinfo.value)
    suggested = float(message.split("use --lease-duration ")[1].split("s ")[0])
    make_timing(suggested, renew_interval_s=100000)
    with pytest.raises(UnsafeTimingError):
        make_timing(suggested - 0.1, renew_interval_s=100000)
