"""The Python and conda packages an image holds, from the names in its file tree alone.

Users look for software by package (``module spider torch``), not by image name. A Python
distribution leaves ``NAME-VERSION.dist-info`` (or ``.egg-info``) in ``site-packages`` or
``dist-packages``; conda leaves ``conda-meta/NAME-VERSION-BUILD.json``. Both are names in the
directory table, so no file content is read.

The names come from the image, i.e. from whoever built it: each is checked against a strict
pattern (anchored with \\Z, bounded length) and their number is bounded before any reaches a
modulefile, where they are quoted like every other value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

# After normalisation (PEP 503): lower case, runs of -_. become one -.
PACKAGE_NAME = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,98}[a-z0-9])?\Z")
# PEP 440 versions and conda's (which also use _): no space, no /, no - (a name's separator).
PACKAGE_VERSION = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9.+!_]{0,63}\Z")
MAX_PACKAGES = 5000  # per image: past this the image is odd, not richer

_PY_DIR = re.compile(r"/(?:site|dist)-packages/(?P<stem>[^/]+)\.(?:dist|egg)-info\Z")
_CONDA = re.compile(r"/conda-meta/(?P<stem>[^/]+)\.json\Z")


@dataclass(frozen=True, order=True)
class Package:
    """One distribution: ``kind`` is ``python`` or ``conda``."""

    name: str
    version: str
    kind: str = "python"

    @property
    def spec(self) -> str:
        """``name/version``: what Lmod's ``extensions()`` and the install record hold."""
        return f"{self.name}/{self.version}"


def normalise(name: str) -> str:
    """PEP 503: ``Foo_Bar.baz`` and ``foo-bar-baz`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _checked(name: str, version: str, kind: str) -> Package | None:
    name = normalise(name)
    if PACKAGE_NAME.match(name) and PACKAGE_VERSION.match(version):
        return Package(name, version, kind)
    return None


def package_from_path(path: str) -> Package | None:
    """The package a path in an image names, or None (not a package, or an unsafe name).

    ``torch-2.2.1.dist-info`` (PEP 427 escapes ``-`` in both parts, so the first ``-``
    separates them); ``foo-1.0-py3.11.egg-info`` (a python tag may follow);
    ``conda-meta/numpy-1.26.4-py311h64a7726_0.json`` (the build is the last part)."""
    m = _PY_DIR.search(path)
    if m:
        name, sep, version = m.group("stem").partition("-")
        return _checked(name, version.split("-py", 1)[0], "python") if sep else None
    m = _CONDA.search(path)
    if m:
        parts = m.group("stem").rsplit("-", 2)
        return _checked(parts[0], parts[1], "conda") if len(parts) == 3 else None
    return None


def find_packages(paths: Iterable[str], limit: int = MAX_PACKAGES) -> tuple[Package, ...]:
    """The distinct packages named by ``paths``, sorted; at most ``limit`` are kept."""
    found: set[Package] = set()
    for path in paths:
        if not path.endswith(("-info", ".json")):
            continue  # most paths: a suffix test, not a regular expression, per file
        package = package_from_path(path)
        if package is not None:
            found.add(package)
            if len(found) >= limit:
                break
    return tuple(sorted(found))


def scan_sif(sif: str) -> tuple[Package, ...]:
    """The packages in a SIF, read from its squashfs directory table (no file contents)."""
    from shpc_lite.imagetree import list_names

    return find_packages(list_names(sif))
