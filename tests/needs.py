"""Skip a test whose tool is missing, except on CI (``CI=true``), where that must fail: a CI run
that silently skipped the real module systems would prove nothing."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.modsys import have


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: required)", pytrace=False)
    pytest.skip(message)


def need_system(system: str) -> None:
    """Lmod (``lmod``) or Environment Modules (``tcl``), as tests/modsys.py runs them."""
    if not have(system):
        _missing(f"{system}: module system not installed (see tests/modsys.py)")


def need_program(program: str) -> str:
    """The path of ``program`` on PATH (dash, lua5.3 from Debian lmod, tclsh8.6)."""
    path = shutil.which(program)
    if path is None:
        _missing(f"{program} is not installed")
    return str(path)
