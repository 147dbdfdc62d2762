"""Views: named subsets of installed modules as a module tree of their own (for a course or a
project), under short names if wanted. Entries are symlinks to the installed modulefiles, so a
view never copies or re-pulls anything and always shows the current module.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config, Paths
from shpc_lite.errors import NotFoundError, SiteError
from shpc_lite.fsutil import atomic_write
from shpc_lite.modules import find_installed, render
from shpc_lite.versions import newest
from shpc_lite.recipe import SAFE_NAME

SUFFIX = {"lmod": ".lua", "tcl": ""}


@dataclass(frozen=True)
class ViewEntry:
    view: str
    name: str  # the name inside the view
    version: str
    target: str  # the installed modulefile


def view_root(paths: Paths) -> Path:
    return paths.root / "views"


def view_dir(paths: Paths, view: str, must_exist: bool = True) -> Path:
    if not SAFE_NAME.match(view):
        raise SiteError(f"invalid view name {view!r} (allowed: letters, digits and . _ + -)")
    directory = view_root(paths) / view
    if must_exist and not directory.is_dir():
        raise NotFoundError(f"no view named {view!r} in {view_root(paths)}")
    return directory


def create(paths: Paths, view: str) -> Path:
    directory = view_dir(paths, view, must_exist=False)
    if directory.exists():
        raise SiteError(f"view {view!r} already exists")
    directory.mkdir(parents=True)
    return directory


def delete(paths: Paths, view: str) -> None:
    shutil.rmtree(view_dir(paths, view))


def views(paths: Paths) -> list[str]:
    root = view_root(paths)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def entries(paths: Paths, view: str) -> list[ViewEntry]:
    directory = view_dir(paths, view)
    out = []
    for link in sorted(directory.glob("*/*")):
        if link.is_symlink():
            version = link.name[: -len(".lua")] if link.name.endswith(".lua") else link.name
            out.append(ViewEntry(view, link.parent.name, version, os.readlink(link)))
    return out


def add(paths: Paths, config: Config, view: str, name: str, version: Optional[str], short: Optional[str]) -> list[ViewEntry]:
    directory = view_dir(paths, view)
    short = short or name
    if not SAFE_NAME.match(short):
        raise SiteError(f"invalid short name {short!r} (allowed: letters, digits and . _ + -)")
    added = []
    for record in find_installed(paths, name, version):
        link = directory / short / (record.version + SUFFIX[record.module_system])
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
        os.symlink(record.modulefile, tmp)
        os.replace(tmp, link)
        added.append(ViewEntry(view, short, record.version, record.modulefile))
    _write_default(directory / short, short, config)
    return added


def remove(paths: Paths, config: Config, view: str, name: str, version: Optional[str]) -> list[ViewEntry]:
    directory = view_dir(paths, view)
    gone = [e for e in entries(paths, view) if e.name == name and version in (None, e.version)]
    if not gone:
        raise NotFoundError(f"{name}{':' + version if version else ''} is not in view {view!r}")
    for entry in gone:
        for suffix in SUFFIX.values():
            (directory / entry.name / (entry.version + suffix)).unlink(missing_ok=True)
    _write_default(directory / name, name, config)
    return gone


def prune(paths: Paths, config: Config) -> None:
    """Drop entries whose module was uninstalled (a dangling link would confuse module avail)."""
    for view in views(paths):
        for entry in entries(paths, view):
            if not os.path.exists(entry.target):
                remove(paths, config, view, entry.name, entry.version)


def _write_default(directory: Path, short: str, config: Config) -> None:
    versions = [p.name[:-4] if p.name.endswith(".lua") else p.name for p in directory.glob("*") if p.is_symlink()]
    rc = directory / (".modulerc.lua" if config["module_system"] == "lmod" else ".modulerc")
    if not versions:
        shutil.rmtree(directory, ignore_errors=True)
        return
    default = newest(versions) if config["default_version"] == "newest" else None
    template = "modulerc.lua.j2" if config["module_system"] == "lmod" else "modulerc.tcl.j2"
    atomic_write(rc, render(template, name=short, default=default, gpu_versions=[]))


def to_json(items: list[ViewEntry]) -> str:
    return json.dumps([e.__dict__ for e in items], indent=2)
