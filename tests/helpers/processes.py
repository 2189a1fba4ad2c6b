"""Process facts read from /proc, shared by the subprocess tests."""

from __future__ import annotations


def pid_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (so ``[0]`` is the
    state, ``[1]`` the parent, ``[3]`` the session), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The name is in parentheses and may itself hold spaces or ")".
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
