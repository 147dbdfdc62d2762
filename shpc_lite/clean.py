"""Reclaim the space pulls keep for later: the layer blob cache and Apptainer's cache.

Installed modules never need these: a SIF holds its whole image. They only spare downloads (a
rerun after Ctrl-C, a new version sharing base layers), and on a shared filesystem they can be as
big as the store itself. A running pull reads its layers from the cache, so nothing is removed
while any pull of this root holds its lock, and each layer is removed under its download lock.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from shpc_lite.config import Paths
from shpc_lite.store import LOCK_DIR, blob_lock_path, clean_stale, is_held, lease


@dataclass(frozen=True)
class Cleanup:
    removed: list[Path]
    freed: int  # bytes
    busy: list[str]  # why something was left alone


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def running_pulls(paths: Paths, lease_seconds: float) -> list[str]:
    """Digests being pulled into this root right now (their lock is held)."""
    lock_dir = paths.containers / LOCK_DIR
    locks = sorted(lock_dir.glob("*.lock")) if lock_dir.is_dir() else []
    return [lock.name[: -len(".lock")].replace("-", ":", 1) for lock in locks if is_held(lock, lease_seconds)]


def cache_entries(paths: Paths) -> list[Path]:
    """What ``clean`` removes: one directory per cached layer, and Apptainer's cache."""
    entries = sorted(p for p in (paths.cache / "blobs").glob("*/*") if p.is_dir())
    apptainer = paths.cache / "apptainer"
    return entries + ([apptainer] if apptainer.is_dir() else [])


def clean(paths: Paths, lease_seconds: float, dry_run: bool = False) -> Cleanup:
    from filelock import Timeout

    pulls = running_pulls(paths, lease_seconds)
    if pulls:
        return Cleanup([], 0, [f"a pull is running ({', '.join(pulls)}): nothing removed; run clean again later"])
    if not dry_run:
        clean_stale(paths, lease_seconds)
    removed, freed, busy = [], 0, []
    for entry in cache_entries(paths):
        size = _size(entry)
        if dry_run:
            removed.append(entry)
            freed += size
            continue
        try:
            with lease(blob_lock_path(entry), lease_seconds, timeout=0):
                shutil.rmtree(entry)
        except Timeout:
            busy.append(f"{entry}: being downloaded")
            continue
        removed.append(entry)
        freed += size
    return Cleanup(removed, freed, busy)
