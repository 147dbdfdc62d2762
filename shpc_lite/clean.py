"""Reclaim the space pulls keep for later (the layer blob cache and Apptainer's cache), and
images only crash leftovers keep.

Installed modules never need these: a SIF holds its whole image. They only spare downloads (a
rerun after Ctrl-C, a new version sharing base layers), and on a shared filesystem they can be as
big as the store itself. A running pull reads its layers from the cache, so nothing is removed
while any pull of this root holds its lock, and each layer is removed under its download lock.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from shpc_lite import refs
from shpc_lite.errors import StoreError
from shpc_lite.layout import SIF_SUFFIX, Layout
from shpc_lite.store import clean_stale, digest_lock, is_held, lease

STALE_AFTER = 3600.0  # seconds: a younger ref or unused image may be an install still running


@dataclass(frozen=True)
class Sweep:
    """Refs left by interrupted installs, and the images no module uses once they are gone."""
    refs: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    freed: int = 0  # bytes of those images
    refused: list[str] = field(default_factory=list)  # why an image's refs were left alone


@dataclass(frozen=True)
class Cleanup:
    removed: list[Path]
    freed: int  # bytes
    busy: list[str]  # why something was left alone
    sweep: Sweep = field(default_factory=Sweep)


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
    swept = sweep(layout, lease_seconds, dry_run)
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
    return Cleanup(removed, freed, busy, swept)


def _store_images(layout: Layout) -> list[Path]:
    """The store's own images (regular files named by a digest), found without following links."""
    try:
        with os.scandir(layout.containers) as entries:
            found = [Path(e.path) for e in entries if e.name.endswith(SIF_SUFFIX) and e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [p for p in found if layout.image_digest(p) is not None]


def _old_file(path: Path, older_than: float) -> Optional[int]:
    """The size of ``path`` if it is a regular file made before ``older_than``, else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) and st.st_mtime < older_than else None


def sweep(layout: Layout, lease_seconds: float, dry_run: bool = False, now: Optional[float] = None) -> Sweep:
    """Drop the refs whose module does not use their image (a crash between writing the ref and
    the module), then the images no module uses, each image under its digest lock (what an
    install holds while it adds a ref). What is younger than STALE_AFTER is left: it may be an
    install still running. O(refs + images): one directory read per image, one record per ref."""
    cutoff = (time.time() if now is None else now) - STALE_AFTER
    images = {p.name[: -len(SIF_SUFFIX)]: p for p in _store_images(layout)}
    for stem in refs.image_stems(layout):
        candidate = layout.containers / f"{stem}{SIF_SUFFIX}"
        if layout.image_digest(candidate) is not None:
            images.setdefault(stem, candidate)  # refs of an image already gone are swept too
    swept, gone, freed, refused = [], [], 0, []
    for image in images.values():
        try:
            if dry_run:
                dropped = refs.stale(layout, image, cutoff)
                left = [u for u in refs.users(layout, image)
                        if layout.image_ref(image, *u) not in dropped]
                size = None if left else _old_file(image, cutoff)
            else:
                with digest_lock(layout, layout.image_digest(image), lease_seconds):
                    dropped = refs.stale(layout, image, cutoff)
                    for ref in dropped:
                        layout.remove(ref)
                    size = None if refs.in_use(layout, image) else _old_file(image, cutoff)
                    if size is not None:
                        layout.remove(image)
                    if not refs.in_use(layout, image):
                        refs.forget(layout, image)
        except StoreError as err:
            refused.append(str(err))
            continue
        swept.extend(dropped)
        if size is not None:
            gone.append(image)
            freed += size
    return Sweep(swept, gone, freed, refused)
