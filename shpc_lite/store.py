"""Content-addressed SIF store under ``<root>/containers``, safe on shared filesystems.

Names: ``sha256-<hex>.sif`` for pulled images (the manifest digest), ``file-sha256-<hex>.sif``
for SIF files imported with ``--sif`` (the file's own digest). A file appears under its final
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
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from shpc_lite.config import Config, Paths
from shpc_lite.errors import SifError, StoreError
from shpc_lite.fsutil import TMP_PREFIX, atomic_copy

LOCK_DIR = ".locks"
STALE_SECONDS = 24 * 3600


def sif_name(digest: str, imported: bool = False) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{'file-' if imported else ''}{algo}-{hexpart}.sif"


def digest_of(path: Path) -> str:
    """The digest a stored file is named after (the inverse of ``sif_name``)."""
    stem = Path(path).name[: -len(".sif")]
    stem = stem[len("file-"):] if stem.startswith("file-") else stem
    algo, _, hexpart = stem.partition("-")
    return f"{algo}:{hexpart}"


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


def blob_lock_path(blob_dir: Path) -> Path:
    """The lock a cached layer is downloaded (and removed by ``clean``) under."""
    return Path(str(blob_dir) + ".lock")


def digest_lock_path(paths: Paths, digest: str) -> Path:
    return paths.containers / LOCK_DIR / (digest.replace(":", "-") + ".lock")


@contextlib.contextmanager
def digest_lock(paths: Paths, digest: str, lease_seconds: float, timeout: float = 6 * 3600) -> Iterator[None]:
    """Hold the per-digest lock; a second process waits here and then finds the file made."""
    from filelock import Timeout

    path = digest_lock_path(paths, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with lease(path, lease_seconds, timeout):
            yield
    except Timeout:
        raise StoreError(f"timed out waiting for another process to store {digest}") from None


def import_sif(paths: Paths, source: Path, config: Config) -> tuple[Path, bool]:
    """Copy a SIF file into the store; returns (path, whether this call created it)."""
    from shpc_lite.sif import read_sif

    source = Path(source)
    if not source.is_file():
        raise SifError(f"{source}: no such file")
    read_sif(source)  # raises SifError naming the file when it is not a SIF
    digest = file_digest(source)
    dest = paths.containers / sif_name(digest, imported=True)
    with digest_lock(paths, digest, config["lock_lease"]):
        if dest.exists():
            return dest, False
        atomic_copy(source, dest, mode=config.file_mode)
        apply_group(dest, config)
        return dest, True


def apply_group(path: Path, config: Config) -> None:
    group = config["group"]
    if not group:
        return
    import grp

    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        raise StoreError(f"config group {group!r}: no such group") from None


def unreferenced(paths: Paths, candidates: Iterable[str], in_use: Callable[[], Iterable[str]]) -> list[Path]:
    """Candidates inside this store that no installed module uses any more.

    ``in_use`` is only called when a candidate is left: listing every installed module is the
    expensive part, and most installs have nothing to drop.
    """
    ours = [p for p in map(Path, candidates) if p.parent == paths.containers and p.exists()]
    if not ours:
        return []
    used = {os.path.realpath(p) for p in in_use()}
    return [p for p in ours if os.path.realpath(p) not in used]


def clean_stale(paths: Paths, lease_seconds: float, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove what killed pulls left: a digest's scratch dirs while nobody holds its lock, and
    other temp files older than ``older_than`` seconds. Safe while other pulls run."""
    import shutil

    removed: list[Path] = []
    if not paths.containers.is_dir():
        return removed
    now = time.time()
    for tmp in paths.containers.glob(TMP_PREFIX + "*"):
        name = tmp.name[len(TMP_PREFIX):]
        try:
            if tmp.is_dir() and name.startswith("sha256-"):
                digest = name.split(".", 1)[0].replace("-", ":", 1)
                if is_held(digest_lock_path(paths, digest), lease_seconds):
                    continue  # a live pull owns it
                shutil.rmtree(tmp)
            elif now - tmp.lstat().st_mtime > older_than:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            else:
                continue
            removed.append(tmp)
        except OSError:
            continue
    return removed
