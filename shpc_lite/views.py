"""Views: named subsets of installed modules as a module tree of their own (for a course or a
project), under short names if wanted. Entries are symlinks to the installed modulefiles, so a
view never copies or re-pulls anything and always shows the current module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config
from shpc_lite.errors import NotFoundError, SiteError, StoreError
from shpc_lite.fsutil import atomic_write
from shpc_lite.layout import Layout
from shpc_lite.module_systems import MODULE_SYSTEMS
from shpc_lite.modules import find_installed, render
from shpc_lite.versions import newest


@dataclass(frozen=True)
class ViewEntry:
    view: str
    name: str  # the name inside the view
    version: str
    target: str  # the installed modulefile


def view_dir(layout: Layout, view: str, must_exist: bool = True) -> Path:
    try:
        directory = layout.view_dir(view)
    except StoreError:
        raise SiteError(f"invalid view name {view!r} (allowed: letters, digits and . _ + -)") from None
    if must_exist and not (directory.is_dir() and not directory.is_symlink()):
        raise NotFoundError(f"no view named {view!r} in {layout.views}")
    return directory


def create(layout: Layout, view: str) -> Path:
    directory = view_dir(layout, view, must_exist=False)
    if os.path.lexists(directory):
        raise SiteError(f"view {view!r} already exists")
    return layout.make_dir(directory)


def delete(layout: Layout, view: str) -> None:
    layout.remove(view_dir(layout, view))


def views(layout: Layout) -> list[str]:
    root = layout.views
    if not root.is_dir() or root.is_symlink():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())


def entries(layout: Layout, view: str) -> list[ViewEntry]:
    directory = view_dir(layout, view)
    out = []
    for link in sorted(directory.glob("*/*")):
        if link.is_symlink() and not link.parent.is_symlink():
            version = layout.system.version_of(link.name)
            if version is not None:
                out.append(ViewEntry(view, link.parent.name, version, os.readlink(link)))
    return out


def add(layout: Layout, config: Config, view: str, name: str, version: Optional[str], short: Optional[str]) -> list[ViewEntry]:
    directory = view_dir(layout, view)
    short = short or name
    added = []
    for record in find_installed(layout, name, version):
        system = MODULE_SYSTEMS.get(record.module_system, layout.system)
        try:
            link = layout.view_entry(view, short, record.version, system)
        except StoreError:
            raise SiteError(f"invalid short name {short!r} (allowed: letters, digits and . _ + -)") from None
        target = str(layout.modulefile(record.name, record.version, system))
        layout.make_dir(link.parent)
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
        os.symlink(target, tmp)
        os.replace(tmp, link)
        added.append(ViewEntry(view, short, record.version, target))
    _write_default(layout, directory / short, short, config)
    return added


def remove(layout: Layout, config: Config, view: str, name: str, version: Optional[str]) -> list[ViewEntry]:
    gone = [e for e in entries(layout, view) if e.name == name and version in (None, e.version)]
    if not gone:
        raise NotFoundError(f"{name}{':' + version if version else ''} is not in view {view!r}")
    _drop_entries(layout, config, view, gone)
    return gone


def _drop_entries(layout: Layout, config: Config, view: str, gone: list[ViewEntry]) -> None:
    """Remove these entries of one view and rewrite the defaults of the names they were under."""
    directory = view_dir(layout, view)
    for entry in gone:
        for system in MODULE_SYSTEMS.values():
            layout.remove(layout.view_entry(view, entry.name, entry.version, system))
    for name in sorted({e.name for e in gone}):
        _write_default(layout, directory / name, name, config)


def prune(layout: Layout, config: Config) -> None:
    """Drop entries whose module was uninstalled (a dangling link would confuse module avail).

    One pass over the entries of every view: O(view entries), not O(installed modules), so an
    uninstall on a 20,000-module tree costs what the site's views hold (usually a few hundred
    links; none without views). Entries use short names, so which ones point at the removed
    module is only known by reading them."""
    for view in views(layout):
        dangling = [e for e in entries(layout, view) if not os.path.exists(e.target)]
        if dangling:
            _drop_entries(layout, config, view, dangling)


def _write_default(layout: Layout, directory: Path, short: str, config: Config) -> None:
    links = [p.name for p in directory.glob("*") if p.is_symlink()] if not directory.is_symlink() else []
    versions = [v for v in map(layout.system.version_of, links) if v is not None]
    if not versions:
        layout.remove(directory)
        return
    default = newest(versions) if config["default_version"] == "newest" else None
    atomic_write(directory / layout.system.rc_file,
                 render(layout.system.rc_template, name=short, default=default, gpu_versions=[]))


def to_json(items: list[ViewEntry]) -> str:
    return json.dumps([e.__dict__ for e in items], indent=2)
