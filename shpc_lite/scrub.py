"""One scrubber for every message that leaves the process: secrets are masked as ``***``.

Secrets are registered where they are loaded (registry credentials, token answers, mirror URLs)
and every outgoing text passes through :func:`scrub`: error lines and all other output of the CLI
(``cli/main.py`` wraps stdout and stderr), log records (:func:`install_log_scrubbing`), ``doctor``
findings and ``--json`` documents. A registry that echoes our ``Authorization`` header in its error
body, or a mirror configured as ``https://user:pass@host``, must not put the password on a
terminal, in a Slurm log or in a CI transcript.

Besides the registered values (a password, its ``base64(user:password)`` in standard, URL-safe and
unpadded forms, its percent-encoded form, tokens), two patterns are masked whatever their value:
URL userinfo (``scheme://user:pass@host`` -> ``scheme://***@host``) and the credentials of an
``Authorization``-style ``Basic``/``Bearer`` word.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from typing import Any, Iterable, Optional, TextIO
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
MIN_SECRET_LEN = 4  # shorter values would mask ordinary words ("abc" in every message)

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#]+@")
# A credential word: 12+ token characters with a digit or one of = + / (plain words stay).
_AUTH_WORD = re.compile(r"(?P<scheme>\b(?:Basic|Bearer))\s+(?=[A-Za-z._~-]*[0-9=+/])[A-Za-z0-9._~+/=-]{12,}",
                        re.IGNORECASE)

_lock = threading.Lock()
_secrets: set[str] = set()
_ordered: tuple[str, ...] = ()  # longest first, so a secret inside another is masked whole


def _add(values: Iterable[str]) -> None:
    global _ordered
    with _lock:
        before = len(_secrets)
        _secrets.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LEN)
        if len(_secrets) != before:
            _ordered = tuple(sorted(_secrets, key=len, reverse=True))


def basic_forms(username: str, password: str) -> list[str]:
    """Every spelling of ``base64(user:password)`` a server could echo back (pure)."""
    raw = f"{username}:{password}".encode()
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    return [std, std.rstrip("="), url, url.rstrip("=")]


def register_secret(value: Optional[str]) -> None:
    """Mask ``value`` (a token, an API key) and its percent-encoded form from now on."""
    if value:
        _add([value, quote(value, safe="")])


def register_credential(username: str, password: Optional[str]) -> None:
    """Mask a password and the Basic ``Authorization`` value made from it."""
    if password:
        register_secret(password)
        _add(basic_forms(username or "", password))


def register_url(url: Optional[str]) -> None:
    """Mask the password in a URL's userinfo (``https://user:pass@host``), if it has one."""
    try:
        parts = urlsplit(url or "")
    except ValueError:
        return
    if parts.password:
        register_credential(unquote(parts.username or ""), unquote(parts.password))
        register_secret(parts.password)


def scrub(text: str) -> str:
    """``text`` with every registered secret, URL userinfo and Basic/Bearer credential masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    text = _AUTH_WORD.sub(lambda m: m.group("scheme") + " " + MASK, text)
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_json(value: Any) -> Any:
    """A JSON-able value with every string in it (keys too) scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_json(k): scrub_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_json(v) for v in value]
    return value


# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: Any) -> str:
    """``text`` safe to show on a terminal: control characters become ``\\xNN``/``\\uNNNN`` escapes.

    For text that came from an image or a registry (labels, env, tags): an ``ESC`` sequence in a
    label must not retitle the window, hide lines or rewrite the screen of whoever inspects it.
    """
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


class ScrubbedStream:
    """A text stream whose writes are scrubbed; everything else goes to the stream it wraps.

    ``print`` writes a message in one call, so a secret is never split across two writes.
    """

    def __init__(self, stream: TextIO):
        self.wrapped = stream

    def write(self, text: str) -> int:
        self.wrapped.write(scrub(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


_factory_installed = False


def install_log_scrubbing() -> None:
    """Scrub every log record as it is made, whichever handler (stderr, a file) writes it."""
    global _factory_installed
    with _lock:
        if _factory_installed:
            return
        _factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to logging's own error report
            return record
        record.msg, record.args = scrub(message), ()
        return record

    logging.setLogRecordFactory(factory)
