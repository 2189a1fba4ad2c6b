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


# A URL's scheme and authority (user info, host, port): what precedes its path.
_URL_HEAD = re.compile(r"^(?:([a-z][a-z0-9+.-]*):)?(?://)?([^/?#]*)", re.IGNORECASE)

KEY_MIN_CHARS = 16
"""Path segments at least this long are masked as keys: a Healthchecks UUID has 36
characters and a ping key 22, while a check's slug is usually shorter."""

REST_MIN_CHARS = 8
"""What follows a URL's host is masked whole from this length on: shorter, it
would mask ordinary words, and it holds no key."""


def _url_parts(url: str) -> tuple[str | None, str, str]:
    """A URL's scheme (or None), authority, and everything after them."""
    match = _URL_HEAD.match(url)
    if match is None:  # the pattern matches any text, if only emptily
        return None, "", url
    return match.group(1), match.group(2), url[match.end() :]


def url_shown(url: str) -> str:
    """A URL as a message may show it: ``scheme://host:port/…``, never its secrets.

    A monitor's ping URL carries its key in the path (``https://hc-ping.com/<uuid>``),
    and may carry a password before the host: both are left out, and so is the
    query. Text that is not a URL keeps what would be its host.
    """
    scheme, authority, rest = _url_parts(url.strip())
    host = authority.rpartition("@")[2]
    shown = f"{scheme}://{host}" if scheme else host
    return shown + "/…" if rest.strip("/") else shown


def url_secrets(url: str) -> list[str]:
    """What of a URL no message may show, longest first (for :func:`redact`).

    All of it; all after its host; its user info; and every path or query
    segment long enough to be a key, so that a message quoting part of it is
    masked too.
    """
    _, authority, rest = _url_parts(url)
    found = {url, authority.rpartition("@")[0]}
    if len(rest) >= REST_MIN_CHARS:
        found.add(rest)
    found.update(s for s in re.split(r"[/?&#=]", rest) if len(s) >= KEY_MIN_CHARS)
    return sorted((s for s in found if s), key=len, reverse=True)
