"""Reclaim the space pulls keep for later: the layer blob cache and Apptainer's cache.

Installed modules never need these: a SIF holds its whole image. They only spare downloads (a
rerun after Ctrl-C, a new version sharing base layers), and on a shared filesystem they can be as
big as the store itself. A running pull reads its layers from the cache, so nothing is removed
while any pull of this root holds its lock, and each layer is removed under its download lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shpc_lite.errors import StoreError
from shpc_lite.layout import Layout
from shpc_lite.store import clean_stale, is_held, lease


@dataclass(frozen=True)
class Cleanup:
    removed: list[Path]
    freed: int  # bytes
    busy: list[str]  # why something was left alone


def _size(path: Path) -> int:
    """Bytes below ``path``, not following symlinks (a planted link must not be counted or read)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for directory, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(directory, f)).st_size for f in files)
    return total


def running_pulls(layout: Layout, lease_seconds: float) -> list[str]:
    """Digests being pulled into this root right now (their lock is held)."""
    locks = sorted(layout.digest_locks.glob("*.lock")) if layout.digest_locks.is_dir() else []
    held = [layout.locked_digest(lock) for lock in locks if is_held(lock, lease_seconds)]
    return [digest for digest in held if digest]


def cache_entries(layout: Layout) -> list[tuple[Path, Path]]:
    """What ``clean`` removes, each with the lock it is removed under: one directory per cached
    layer (found without following symlinks), and Apptainer's cache."""
    entries = [(layout.blob_dir(d), layout.blob_lock(d)) for d in layout.cached_blobs()]
    apptainer = layout.apptainer_cache
    if apptainer.is_dir() and not apptainer.is_symlink():
        entries.append((apptainer, apptainer.with_name("apptainer.lock")))
    return entries


def clean(layout: Layout, lease_seconds: float, dry_run: bool = False) -> Cleanup:
    from filelock import Timeout

    pulls = running_pulls(layout, lease_seconds)
    if pulls:
        return Cleanup([], 0, [f"a pull is running ({', '.join(pulls)}): nothing removed; run clean again later"])
    if not dry_run:
        clean_stale(layout, lease_seconds)
    removed, freed, busy = [], 0, []
    for entry, lock in cache_entries(layout):
        try:
            layout.inside(entry)
        except StoreError as err:
            busy.append(str(err))
            continue
        size = _size(entry)
        if dry_run:
            removed.append(entry)
            freed += size
            continue
        try:
            with lease(lock, lease_seconds, timeout=0):
                layout.remove(entry)
        except Timeout:
            busy.append(f"{entry}: being downloaded")
            continue
        removed.append(entry)
        freed += size
    return Cleanup(removed, freed, busy)
