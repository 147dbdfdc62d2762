"""Atomic file writes: every generated file appears whole or not at all.

Shared filesystems (NFS, Lustre) make rename within one directory the only safe publish step,
so temp files are always created beside their target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Optional

TMP_PREFIX = ".shpc-lite-tmp-"


@contextlib.contextmanager
def atomic_open(path: Path, mode: int = 0o644, binary: bool = False, gid: Optional[int] = None) -> Iterator[IO]:
    """Yield a file in the target's directory; rename it over ``path`` only if the block succeeds.

    Mode and group (``gid``) are set on the temp file, so the file never appears with others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    with atomic_open(path, mode) as fh:
        fh.write(text)


def atomic_copy(src: Path, dest: Path, mode: int = 0o644, gid: Optional[int] = None) -> None:
    """Copy ``src`` to ``dest`` via a temp file beside ``dest``."""
    with open(src, "rb") as fin, atomic_open(dest, mode, binary=True, gid=gid) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
