"""procfs: children, with and without the kernel's per-thread children files."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from leaderrun import procfs


def fake_proc(root: Path, processes: dict[int, tuple[int, int]], children: bool):
    """A /proc with ``pid: (ppid, pgrp)`` entries; ``children`` files or none."""
    for pid, (ppid, pgrp) in processes.items():
        task = root / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (root / str(pid) / "stat").write_text(
            f"{pid} (a (weird) name) S {ppid} {pgrp} {pgrp} 0 -1 0\n"
        )
        if children:
            kids = [str(p) for p, (pp, _) in processes.items() if pp == pid]
            (task / "children").write_text(" ".join(kids) + (" " if kids else ""))
    return str(root)


TREE = {10: (1, 10), 11: (10, 10), 12: (10, 12), 13: (12, 12), 20: (1, 20)}


@pytest.mark.parametrize("children_files", [True, False], ids=["files", "scan"])
def test_descendants_are_found_with_or_without_children_files(tmp_path, children_files):
    """Without CONFIG_PROC_CHILDREN the scan of every process's parent finds the
    same descendants as the kernel's children files."""
    proc = fake_proc(tmp_path, TREE, children_files)
    assert sorted(procfs.descendants(10, proc)) == [11, 12, 13]
    assert procfs.children(12, proc) == [13]
    assert procfs.children(20, proc) == []


def test_group_members_and_process_group_read_stat_past_the_name(tmp_path):
    """A command name with spaces and parentheses does not shift the fields."""
    proc = fake_proc(tmp_path, TREE, children=True)
    assert procfs.process_group(13, proc) == 12
    assert sorted(procfs.group_members(12, proc)) == [12, 13]
    assert procfs.process_group(99, proc) is None


def test_the_real_proc_lists_a_child_of_ours():
    """On this machine, a process we start is our child, and runs until killed."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in procfs.children(os.getpid())
        assert procfs.running(child.pid)
        assert procfs.may_signal(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not procfs.running(child.pid)


def test_a_process_we_may_not_signal_is_told_apart():
    """may_signal is False only for EPERM; a vanished process counts as stoppable."""

    def refuse(pid: int, signum: int) -> None:
        raise PermissionError

    def vanished(pid: int, signum: int) -> None:
        raise ProcessLookupError

    assert procfs.may_signal(1234, kill=refuse) is False
    assert procfs.may_signal(1234, kill=vanished) is True


def test_capabilities_are_read_from_status(tmp_path):
    """CapEff bit 5 is CAP_KILL."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text("Name:\tx\nCapEff:\t0000000000000020\n")
    assert procfs.has_capability(procfs.CAP_KILL, str(tmp_path))
    (tmp_path / "self" / "status").write_text("Name:\tx\nCapEff:\t00000000000000df\n")
    assert not procfs.has_capability(procfs.CAP_KILL, str(tmp_path))
    shutil.rmtree(tmp_path / "self")
