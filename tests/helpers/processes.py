"""Process facts read from /proc, shared by the subprocess tests."""

from __future__ import annotations


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
