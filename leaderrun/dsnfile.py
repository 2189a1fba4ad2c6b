"""``LEADERRUN_DSN_FILE``: the connection string in a file only its owner can read.

A DSN given with ``--dsn`` is on the command line, where ``ps`` shows it to every
user of the machine; one in ``LEADERRUN_DSN`` is in the environment, which the
same user's processes can read. A file with mode 0600 (a systemd credential, a
Kubernetes secret volume, a Vault agent template) keeps the password off both.
"""

from __future__ import annotations

import os
import stat

from leaderrun.errors import ConfigError

DSN_FILE_ENV = "LEADERRUN_DSN_FILE"
"""The environment variable that names the file."""


def read_dsn_file(path: str, *, label: str = DSN_FILE_ENV) -> str:
    """The connection string in ``path``: its text, stripped of surrounding space.

    Refused, as ssh refuses a readable private key, when the group or others may
    read or write it: the password in it would not be a secret.

    Raises:
        ConfigError: the file is missing, unreadable, too open, or empty.
    """
    try:
        # O_NONBLOCK: a FIFO must be refused below, not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(
            f"{label} {path!r} cannot be read: {exc.strerror}; point it at a file "
            "holding the connection string"
        ) from None
    # fstat and read the same open file, so nothing can swap it in between.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConfigError(f"{label} {path!r} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        if info.st_mode & 0o077:
            raise ConfigError(
                f"{label} {path!r} has mode {stat.S_IMODE(info.st_mode):04o}, so "
                f"other users may read its password; run chmod 600 {path}"
            )
        try:
            text = file.read().decode().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{label} {path!r} cannot be read: {exc}") from None
    if not text:
        raise ConfigError(f"{label} {path!r} is empty; put the connection string in it")
    return text
