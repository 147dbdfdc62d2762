"""Real parts a test needs: skipped where they are missing on a developer's machine, but failed
under ``CI=true``: a CI run that silently skipped the real module systems, registry, squashfs
tools, Charliecloud or Slurm would prove nothing. Every such check in the suite goes through here.

- ``requires(ok, reason)``: a mark for a test or module (instead of ``pytest.mark.skipif``);
- ``missing(reason)``: the same from inside a test or fixture;
- ``need_system`` / ``need_program`` / ``need_tools``: the common cases.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.modsys import have

ON_CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    if ON_CI:
        pytest.fail(f"{reason} (CI=true: a missing real part is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def requires(ok: bool, reason: str) -> pytest.MarkDecorator:
    """Mark a test that needs something: checked at set-up by ``tests/conftest.py``."""
    return pytest.mark.requires(ok=bool(ok), reason=reason)


def check_requirements(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        if not mark.kwargs["ok"]:
            missing(mark.kwargs["reason"])


def need_system(system: str) -> None:
    """Lmod (``lmod``) or Environment Modules (``tcl``), as tests/modsys.py runs them."""
    if not have(system):
        missing(f"{system}: module system not installed (see tests/modsys.py)")


def need_program(program: str) -> str:
    """The path of ``program`` on PATH (dash, lua5.3 from Debian lmod, tclsh8.6)."""
    path = shutil.which(program)
    if path is None:
        missing(f"{program} is not installed")
    return str(path)


def need_tools(*names: str) -> None:
    gone = [name for name in names if shutil.which(name) is None]
    if gone:
        missing(f"needs {', '.join(gone)} on PATH")
