"""Content-addressed SIF store under ``<root>/containers``, safe on shared filesystems.

Names (made by ``Layout``): ``sha256-<hex>.sif`` for pulled images (the manifest digest),
``file-sha256-<hex>.sif`` for SIF files imported with ``--sif`` (the file's own digest). A file appears under its final
name only complete and verified (temp file + rename); a lock per digest keeps two processes
from building the same image at once. Locks are filelock's SoftFileLease: an O_EXCL marker file,
which works on NFS and Lustre where flock may not, renewed by its holder's heartbeat thread, so a
pull on a node that crashed blocks others for ``lock_lease`` seconds, not for hours (a dead
process on the same host is noticed at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from shpc_lite.config import Config
from shpc_lite.errors import SifError, StoreError
from shpc_lite.fsutil import TMP_PREFIX, atomic_copy
from shpc_lite.layout import Layout

STALE_SECONDS = 24 * 3600


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def lease(path: Path, lease_seconds: float, timeout: float, on_lost: Optional[Callable] = None):
    """The lock every shpc-lite process uses for ``path`` (all of them must agree on the lease)."""
    from filelock import SoftFileLease

    return SoftFileLease(str(path), lease_duration=float(lease_seconds), timeout=timeout, on_compromise=on_lost)


def is_held(path: Path, lease_seconds: float) -> bool:
    """Whether a live process holds the lock at ``path`` (a stale one is taken over and dropped)."""
    from filelock import Timeout

    try:
        with lease(path, lease_seconds, timeout=0):
            return False
    except Timeout:
        return True


# Most holds of a digest lock are short (a batch chunk adding its refs: milliseconds) and are
# waited for closely; one still held after QUICK_WAIT is a pull, polled at filelock's pace.
QUICK_POLL = 0.002
QUICK_WAIT = 0.25


@contextlib.contextmanager
def digest_lock(layout: Layout, digest: str, lease_seconds: float, timeout: float = 6 * 3600) -> Iterator[None]:
    """Hold the per-digest lock; a second process waits here and then finds the file made."""
    from filelock import Timeout

    path = layout.digest_lock(digest)
    layout.make_dir(path.parent)
    deadline = time.monotonic() + timeout
    poll: Optional[float] = QUICK_POLL
    while True:
        _break_empty_marker(path, lease_seconds)
        budget = max(0.0, deadline - time.monotonic())
        try:
            held = lease(path, lease_seconds, min(QUICK_WAIT if poll else lease_seconds, budget))
            held.acquire(poll_interval=poll)
            break
        except Timeout:
            poll = None  # a long hold (a pull): filelock's own pace from now on
            if time.monotonic() >= deadline:
                raise StoreError(f"timed out waiting for another process to store {digest}") from None
    try:
        yield
    finally:
        held.release()


def _break_empty_marker(path: Path, lease_seconds: float) -> None:
    """Remove a lock marker left empty by a holder killed between creating it and writing its
    owner record (filelock never breaks one): no live holder leaves it empty for a whole lease,
    since it writes the record right after creating the file and renews it every lease."""
    def stale(st: os.stat_result) -> bool:
        return stat.S_ISREG(st.st_mode) and st.st_size == 0 and time.time() - st.st_mtime > lease_seconds

    try:
        if not stale(os.lstat(path)):
            return
        # Moved aside first, so only the inode judged stale is deleted: if another contender broke
        # it and a new holder created the marker in between, that one is put back (link: never
        # over a newer one).
        aside = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.broken"
        os.rename(path, aside)
        if not stale(os.lstat(aside)):
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        os.unlink(aside)
    except FileNotFoundError:
        pass


def stored_image_ok(path: Path, digest: str, imported: bool) -> bool:
    """Whether a file found under a digest's name in a store may be used as that image.

    The store may have been tampered with: the name must be a regular file (not a symlink to
    elsewhere) holding a SIF with a root file system; an imported SIF must hash to its name; a
    pulled one must not name another image in its definition (what the builtin puller and
    Apptainer record there)."""
    from shpc_lite.sif import DataType, primary_partition, read_data, read_sif

    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        image = read_sif(path)
        primary_partition(image)
        if imported:
            return file_digest(path) == digest
        for desc in image.descriptors:
            if desc.data_type == DataType.DEFFILE and desc.size < 1 << 16:
                text = read_data(path, desc).decode("utf-8", "replace")
                named = re.findall(r"@(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})", text)
                if named and digest not in named:
                    return False
    except (OSError, SifError):
        return False
    return True


def group_id(config: Config) -> Optional[int]:
    """The gid of config ``group`` (None when unset), checked before anything is written."""
    group = config["group"]
    if not group:
        return None
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StoreError(f"config group {group!r}: no such group") from None


def import_sif(config: Config, source: Path) -> tuple[Path, bool]:
    """Copy a SIF file into the store; returns (path, whether this call created it).

    A user's private tree uses the central store's copy when it has one (by reference)."""
    from shpc_lite.sif import primary_partition, read_sif

    source = Path(source)
    if not source.is_file():
        raise SifError(f"{source}: no such file")
    primary_partition(read_sif(source))  # raises SifError naming the file: not a SIF, or no rootfs
    gid = group_id(config)
    digest = file_digest(source)
    layout = config.layout
    central = config.central_layout
    if central is not None:
        shared = central.image(digest, imported=True)
        if os.access(shared, os.R_OK) and stored_image_ok(shared, digest, imported=True):
            return shared, False
    dest = layout.image(digest, imported=True)
    with digest_lock(layout, digest, config["lock_lease"]):
        if stored_image_ok(dest, digest, imported=True):
            return dest, False
        layout.inside(dest)
        atomic_copy(source, dest, mode=config.file_mode, gid=gid)
        return dest, True


def clean_stale(layout: Layout, lease_seconds: float, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove what killed pulls left: a digest's scratch dirs while nobody holds its lock, and
    other temp files older than ``older_than`` seconds. Safe while other pulls run."""
    removed: list[Path] = []
    if not layout.containers.is_dir():
        return removed
    now = time.time()
    for tmp in layout.containers.glob(TMP_PREFIX + "*"):
        digest = layout.scratch_digest(tmp)
        try:
            if digest is not None and tmp.is_dir() and not tmp.is_symlink():
                if is_held(layout.digest_lock(digest), lease_seconds):
                    continue  # a live pull owns it
            elif now - tmp.lstat().st_mtime <= older_than:
                continue
            layout.remove(tmp)
            removed.append(tmp)
        except (OSError, StoreError):
            continue
    return removed
