"""Atomic file writes: every generated file appears whole or not at all.

Shared filesystems (NFS, Lustre) make rename within one directory the only safe publish step,
so temp files are always created beside their target.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional

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


def identity(path: Path | str) -> Optional[tuple]:
    """What tells one version of a file from another without reading it (path, device, inode,
    size, mtime): the key of what a process reads once per file (recipes, a SIF's digest and
    packages). None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------------------------
# Batch writes: many files staged, one flush barrier, then the renames that publish them.
# The crash-safety argument is in docs/site.md ("Crash safety of batch writes").

_UMASK: Optional[int] = None


def umask() -> int:
    """The process umask (read once: reading it means setting it)."""
    global _UMASK
    if _UMASK is None:
        try:  # Linux: readable without changing it (os.umask would, for every thread)
            with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
                line = next(line for line in fh if line.startswith("Umask:"))
            _UMASK = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def write_new(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist: temp names are unique) with ``data`` and exactly
    ``mode``: open, write, close, and a chmod only where the umask would strip a bit. No fsync:
    the caller flushes the batch once (``flush``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if mode & umask():
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def mkdir_new(path: str, mode: int) -> None:
    """Create a directory with exactly ``mode`` (chmod only where the umask strips a bit)."""
    os.mkdir(path, mode)
    if mode & umask():
        os.chmod(path, mode)


@functools.lru_cache(maxsize=None)
def _libc_function(name: str) -> Optional[Callable[..., int]]:
    """A libc function (``syncfs``, ``renameat2``) or None where libc has none. Looked up once,
    in the symbols the process already has (``find_library`` would run ldconfig)."""
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    return fn


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2`` RENAME_EXCHANGE); False where
    the kernel or file system cannot (the caller then renames in two steps)."""
    fn = _libc_function("renameat2")
    if fn is None:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


FSYNC_AT_MOST = 32  # files and directories flushed one by one; more: one syncfs


def flush(files: Iterable[str], dirs: Iterable[str] = ()) -> None:
    """Make the data of ``files`` and the entries of ``dirs`` durable, with as few flushes as
    the kernel offers: one ``syncfs`` per file system they live on (one journal commit on
    ext4/XFS, one flush of this client's dirty pages on Lustre/NFS), else (or for at most
    FSYNC_AT_MOST of them) an ``fsync`` of each.
    Raises OSError when the kernel reports a write-back error."""
    files, dirs = list(files), list(dirs)
    if not files and not dirs:
        return
    # A few files (one module's) are cheaper to fsync than a whole file system whose other
    # writers (a pull writing a SIF) may have much more dirty data than we do.
    syncfs = _libc_function("syncfs") if len(files) + len(dirs) > FSYNC_AT_MOST else None
    if syncfs is not None:
        devices: dict[int, str] = {}
        for path in dict.fromkeys([*dirs, *(os.path.dirname(f) for f in files)]):  # a stat per directory
            with contextlib.suppress(OSError):
                devices.setdefault(os.stat(path).st_dev, path)
        for directory in devices.values():
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if syncfs(fd) != 0:
                    import ctypes

                    err = ctypes.get_errno()
                    raise OSError(err, f"syncfs: {os.strerror(err)}", directory)
            finally:
                os.close(fd)
        return
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dirs(dirs)


def fsync_dirs(dirs: Iterable[str]) -> None:
    """fsync each directory once: the renames and creations in it become durable."""
    for directory in dict.fromkeys(dirs):
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(label: str) -> str:
    """A hidden name for a staged file or directory: ``.shpc-lite-tmp-<host>.<pid>-<rand>-<label>``.
    Module systems skip names starting with '.', and the owner is in the name so a later run
    can tell a dead writer's leftovers (``stale_temp``) from a running one's."""
    return f"{TMP_PREFIX}{_HOST}.{os.getpid()}-{_TOKEN}{next(_SERIAL)}-{label}"


def stale_temp(name: str, mtime: float, now: float, older_than: float) -> bool:
    """Whether a temp entry (named by ``temp_name``) was left by a writer that is gone: one of
    this host whose process no longer exists, or any older than ``older_than`` seconds (another
    host's writer cannot be asked; a pid may have been reused)."""
    if not name.startswith(TMP_PREFIX):
        return False
    owner = name[len(TMP_PREFIX):].split("-", 1)[0]
    host, _, pid = owner.rpartition(".")
    if host == _HOST and pid.isdigit() and not _alive(int(pid)):
        return True
    return now - mtime > older_than  # also a reused pid's


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A zombie does not: a killed writer whose parent is
    gone stays one where PID 1 does not reap orphans (containers without an init)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[:1] not in ([b"Z"], [b"X"])
    except OSError:  # no /proc (or it just exited): as kill said
        return True


# Unique per process without a random read per name: pid (fork changes it), a token drawn
# once (a reused pid after a crash), a counter.
_TOKEN = secrets.token_hex(3)
_SERIAL = itertools.count()
_HOST = "".join(c if c.isalnum() else "_" for c in os.uname().nodename)[:64] or "host"
