"""Which modules use a stored image, without listing the tree: one empty file per user.

``<root>/containers/.refs/<image stem>/<name>@<version>`` exists while module name/version uses
the image. Deciding whether an image may be dropped (an uninstall, a reinstall onto another
image) is then one directory read, not a read of every install record: O(1) in the tree size.

Crash safety: a ref is created (under the image's digest lock, which is also what the deleter
holds) before the module's files are written, and removed only after they are gone. A crash in
between leaves a stale ref, which only keeps the image longer; it never lets a used image go.

A tree written before refs existed has none: the first decision lists the tree once, creates
the refs of every record, and then writes ``.refs/.complete``; from then on a missing refs
directory means no module uses the image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from shpc_lite.layout import Layout, is_component


def add(layout: Layout, image: Path, name: str, version: str) -> None:
    """Record that name/version uses ``image`` (nothing for an image of another store)."""
    ref = layout.image_ref(image, name, version)
    if ref is None:
        return
    layout.make_dir(ref.parent)
    _touch(layout, ref)


def _touch(layout: Layout, path: Path) -> None:
    """Create an empty file below the root, never through a symlink."""
    os.close(os.open(layout.inside(path), os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))


def drop(layout: Layout, image: Path, name: str, version: str) -> None:
    """Forget that name/version uses ``image`` (the link itself if someone planted one)."""
    ref = layout.image_ref(image, name, version)
    if ref is not None:
        layout.remove(ref)


def users(layout: Layout, image: Path) -> Iterator[tuple[str, str]]:
    """(name, version) of the modules the refs say use ``image``, in directory order, lazily:
    a caller that needs one user reads one entry however many share the image."""
    directory = layout.image_refs(image)
    if directory is None:
        return
    complete(layout)
    try:
        # inside(directory / "_") also refuses a symlinked refs directory: scandir would follow it
        with os.scandir(layout.inside(directory / "_").parent) as entries:
            for entry in entries:
                name, sep, version = entry.name.partition("@")
                if sep:
                    yield name, version
    except (FileNotFoundError, NotADirectoryError):
        return


def in_use(layout: Layout, image: Path) -> bool:
    """Whether any module uses ``image``: the first entry of its refs directory answers."""
    return next(users(layout, image), None) is not None


def forget(layout: Layout, image: Path) -> None:
    """Remove an image's refs directory once empty (its image was dropped)."""
    directory = layout.image_refs(image)
    if directory is not None:
        layout.remove_empty_parents(directory, layout.refs)


def complete(layout: Layout) -> None:
    """Give every record of a tree written before refs existed its ref, once (O(n) one time)."""
    if os.path.lexists(layout.refs_complete):
        return
    from shpc_lite.modules import installed

    for record in installed(layout):
        add(layout, Path(record.sif), record.name, record.version)
    layout.make_dir(layout.refs)
    _touch(layout, layout.refs_complete)


def own_images(layout: Layout, candidates: Iterable[str]) -> list[Path]:
    """Candidates that are existing images of this store, each once (a record's ``sif`` is not
    trusted to say what to delete: only a path exactly of the store's naming counts)."""
    seen: dict[str, Path] = {}
    for path in map(Path, candidates):
        if layout.image_digest(path) is not None and os.path.lexists(path):
            seen.setdefault(os.path.normpath(path), path)
    return list(seen.values())


def stale(layout: Layout, image: Path, older_than: float) -> list[Path]:
    """Refs of ``image`` whose module does not use it (a crash between the ref and the module, or
    between a reinstall and dropping its old ref), or whose name is none a ref can have, made
    before ``older_than`` (epoch seconds): a younger ref may be an install still writing its
    module. One directory read, and per ref the install records of its module's name."""
    from shpc_lite.modules import installed

    directory = layout.image_refs(image)
    if directory is None:
        return []
    found = []
    try:
        with os.scandir(layout.inside(directory / "_").parent) as entries:
            for entry in entries:
                if entry.stat(follow_symlinks=False).st_mtime >= older_than:
                    continue
                name, _, version = entry.name.partition("@")
                if not (entry.is_file(follow_symlinks=False) and is_component(name)
                        and is_component(version) and any(
                            r.version == version and os.path.normpath(r.sif) == os.path.normpath(image)
                            for r in installed(layout, name))):
                    found.append(Path(entry.path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return found


def image_stems(layout: Layout) -> list[str]:
    """Stems of the images that have a refs directory, found without following symlinks."""
    try:
        with os.scandir(layout.inside(layout.refs / "_").parent) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) or e.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []
