"""Ordering of module versions, kept apart from tag selection so that listing modules does not
import all of ``packaging`` (the CLI imports only what a command needs)."""

from __future__ import annotations

from typing import Iterable, Optional

from packaging.version import InvalidVersion, Version


def version_key(text: str) -> tuple:
    """Sort key for module versions: valid versions by value above anything else by text."""
    try:
        return (1, Version(text), text)
    except InvalidVersion:
        return (0, text, text)


def newest(versions: Iterable[str]) -> Optional[str]:
    return max(versions, key=version_key, default=None)
