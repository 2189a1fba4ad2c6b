"""What a SQLite file is, from its header and its tables' columns; pure, no file."""

import pytest

from leaderrun.stores.base import RUN_TABLE, TABLE
from leaderrun.stores.host import Instant
from leaderrun.stores.sqlite import (
    APPLICATION_ID,
    FORMAT,
    SHAPES,
    STEPS,
    FileFormat,
    Shape,
    expires_unix_s,
    file_format,
    setup_sql,
)

LEASE_0 = sorted(SHAPES[0][TABLE][1])
FIRST_LEASE_0 = sorted(SHAPES[0][TABLE][0])
LEASE_1 = sorted(SHAPES[1][TABLE][0])
LEASE_NOW = sorted(SHAPES[FORMAT][TABLE][0])
RUN = sorted(SHAPES[FORMAT][RUN_TABLE][0])
RUN_0 = sorted(SHAPES[0][RUN_TABLE][0])
SEED = ["id", "leader_id", "expires_at", "created_at"]


@pytest.mark.parametrize(
    ("application_id", "user_version", "tables", "expected"),
    [
        # A new file, and a file with only other tables.
        (0, 0, {}, FileFormat(Shape.new, missing=(TABLE, RUN_TABLE))),
        # This version's, stamped; a missing table is created on first use.
        (
            APPLICATION_ID,
            FORMAT,
            {TABLE: LEASE_NOW, RUN_TABLE: RUN},
            FileFormat(Shape.current, FORMAT),
        ),
        (
            APPLICATION_ID,
            FORMAT,
            {TABLE: LEASE_NOW},
            FileFormat(Shape.current, FORMAT, missing=(RUN_TABLE,)),
        ),
        # Format 1, stamped: before the lease row recorded its cadence.
        (
            APPLICATION_ID,
            1,
            {TABLE: LEASE_1, RUN_TABLE: RUN_0},
            FileFormat(Shape.older, 1),
        ),
        # Format 0 predates stamps: known by its columns, both releases of it.
        (0, 0, {TABLE: LEASE_0, RUN_TABLE: RUN_0}, FileFormat(Shape.older, 0)),
        (
            0,
            0,
            {TABLE: FIRST_LEASE_0},
            FileFormat(Shape.older, 0, missing=(RUN_TABLE,)),
        ),
        # This format's tables created by hand without the PRAGMAs.
        (0, 0, {TABLE: LEASE_NOW, RUN_TABLE: RUN}, FileFormat(Shape.current, FORMAT)),
        # A newer leaderrun's.
        (
            APPLICATION_ID,
            FORMAT + 1,
            {TABLE: ["x"]},
            FileFormat(Shape.newer, FORMAT + 1),
        ),
        # Not leaderrun's: a same-named table, another program's header.
        (
            0,
            0,
            {TABLE: SEED},
            FileFormat(
                Shape.foreign,
                detail="a leader_lease table with columns id, leader_id, expires_at,"
                " created_at",
            ),
        ),
        (
            0,
            0,
            {TABLE: LEASE_0, RUN_TABLE: ["id", "job"]},
            FileFormat(Shape.foreign, detail="a leader_run table with columns id, job"),
        ),
        (
            APPLICATION_ID,
            FORMAT,
            {TABLE: LEASE_0},
            FileFormat(
                Shape.foreign,
                detail=f"a leader_lease table with columns {', '.join(LEASE_0)}",
            ),
        ),
        (0, 7, {}, FileFormat(Shape.foreign, detail="its PRAGMA user_version is 7")),
        (
            42,
            0,
            {},
            FileFormat(Shape.foreign, detail="its PRAGMA application_id is 42"),
        ),
    ],
)
def test_file_format_decides_from_the_header_and_the_columns(
    application_id, user_version, tables, expected
):
    """Stamped files by their stamp, unstamped ones by their tables' shapes."""
    assert file_format(application_id, user_version, tables) == expected


def test_every_format_has_its_shapes_and_every_step_leads_to_the_next():
    """STEPS[n] upgrades format n to n + 1, and the last one is this version's."""
    assert [step.to_format for step in STEPS] == list(range(1, FORMAT + 1))
    assert sorted(SHAPES) == list(range(FORMAT + 1))


def test_the_formats_share_no_lease_table_shape():
    """A lease table is never of two formats: the renamed columns tell them apart."""
    shapes = [shape for by_table in SHAPES.values() for shape in by_table[TABLE]]
    assert len(set(shapes)) == len(shapes)
    assert not any("expires_at" in shape for shape in SHAPES[FORMAT][TABLE])


def test_printed_sql_stamps_the_format():
    """`init --print-sql` makes the same header as leaderrun's own creation."""
    sql = setup_sql()
    assert f"PRAGMA application_id = {APPLICATION_ID};" in sql
    assert f"PRAGMA user_version = {FORMAT};" in sql


BOOT = "895cc76a-b98d-4110-abf7-5b27b41054c2"
NOW = Instant(BOOT, 1000.0, 1_800_000_000.0)


@pytest.mark.parametrize(
    ("boot_id", "expires_boot_s", "renewed_unix_s", "expected"),
    [
        (BOOT, 1030.0, 0.0, 1_800_000_030.0),  # 30 s left on the boot clock
        (BOOT, 990.0, 0.0, 1_799_999_990.0),  # ended 10 s ago
        ("another", 1e9, 1_799_999_000.0, 1_799_999_000.0),  # ended with its boot
        (None, 1e9, 1_900_000_000.0, 1_800_000_000.0),  # never later than now
    ],
)
def test_expiry_is_shown_as_the_store_decides_it(
    boot_id, expires_boot_s, renewed_unix_s, expected
):
    """Shown on the wall clock, a lease ends when the boot clock says it does."""
    assert expires_unix_s(boot_id, expires_boot_s, renewed_unix_s, NOW) == expected
