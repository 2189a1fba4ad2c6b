"""Keep passwords out of every message: find them in a DSN, and mask them in text."""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "********"
"""What a password is replaced with."""

# postgresql://user:secret@host/db  (the password ends at the last '@' of the authority)
_URI_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#@:]*:([^/?#]*)@", re.IGNORECASE)
# password=secret or password = 'se cret' (libpq key=value form, quotes optional);
# sslpassword, the passphrase of a client key, is just as secret.
_KV_PASSWORD = re.compile(
    r"(?:^|\s)(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
)
# ?password=secret (or ?sslpassword=) in a URI query string
_QUERY_PASSWORD = re.compile(r"[?&](?:ssl)?password=([^&#]*)", re.IGNORECASE)


def dsn_secrets(dsn: str) -> list[str]:
    """Every spelling of the password a DSN carries, longest first (may be empty)."""
    found: set[str] = set()
    for pattern in (_URI_PASSWORD, _QUERY_PASSWORD):
        for match in pattern.finditer(dsn):
            found.update({match.group(1), unquote(match.group(1))})
    for match in _KV_PASSWORD.finditer(dsn):
        raw = match.group(1)
        found.add(raw)
        if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
            found.add(re.sub(r"\\(.)", r"\1", raw[1:-1]))
    return sorted((s for s in found if s), key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every occurrence of each secret replaced by :data:`MASK`."""
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text
