"""Build an image's squashfs (the SIF's root filesystem partition) from layer blobs and its config.

Three build paths, all producing the same tree (the layers merged first, see ``layers``):

- ``"native"``: the merged tree written as squashfs by :mod:`.squashfs_writer`, no mksquashfs
  needed; memory does not grow with the number of files (mksquashfs's tables do, ~0.7 KB a file).
  The default for zstd and gzip, the compressors it has.
- ``"tar"``: one merged, whiteout-applied tar stream piped into ``mksquashfs - OUT -tar``
  (squashfs-tools >= 4.5). No rootfs on disk, owners and modes come from the tar headers, and
  decompressing the layers overlaps with mksquashfs compressing. The default for xz, lz4 and lzo:
  on 204 MB of file data in 4 gzip layers (``bench/squashfs_paths.py``, 2 cores, zstd 3) it took
  2.3-2.9 s against 4.1-5.7 s for ``"dir"`` over several runs (gzip 9: 8.9 s against 11.3 s).
- ``"dir"``: the tree written to a directory under ``workdir``, then ``mksquashfs DIR OUT``. The
  fallback for older squashfs-tools without ``-tar`` (4.3/4.4 are common on HPC hosts).

Compression (``compression``, ``level``): zstd level 3 is the default; it compresses about as well
as gzip -9 at a fraction of the time (gzip level 9 is 4-5x slower on these machines, mksquashfs's own
zstd default of 15 too). The trade-off is who must read the image: the kernel's squashfs driver
mounts zstd only since Linux 4.14 (so not on EL7's 3.10 kernels, where setuid Apptainer/Singularity
mounts images with the kernel), and squashfuse (used by unprivileged Apptainer) reads zstd only
when built with libzstd. gzip is readable everywhere; xz is smallest but slowest to build and read;
lz4 is fastest to read but largest. Choose gzip for old kernels or old squashfuse builds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import LayerError, PullError
from .apptainer_files import apptainer_files, inner_config
from . import squashfs_writer
from .layers import LayerBlob, RootfsTree, build_tree, is_root, write_merged_tar, write_rootfs_dir

log = logging.getLogger(__name__)

DEFAULT_METHOD = "tar"  # of the mksquashfs methods
METHODS = ("auto", "native", "mksquashfs", "tar", "dir")  # mksquashfs: tar where it has -tar, else dir

# compressor -> (lowest level, highest level, level used when none is given) or None (no levels)
COMPRESSORS = {
    "zstd": (1, 22, 3),
    "gzip": (1, 9, 9),
    "lzo": (1, 9, 8),
    "xz": None,
    "lz4": None,
}


@functools.lru_cache(maxsize=4)
def mksquashfs_features(exe: str = "mksquashfs") -> frozenset:
    """Options and compressors this mksquashfs offers (parsed from ``mksquashfs -help``)."""
    try:
        proc = subprocess.run([exe, "-help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PullError(f"cannot run {exe}: {exc} (install squashfs-tools)") from None
    text = proc.stdout.decode("utf-8", "replace")
    feats = set(re.findall(r"^\s*(-[A-Za-z][\w-]*)", text, re.M))
    section = text.split("Compressors available", 1)[-1].split("\n\n", 1)[0] if "Compressors available" in text else ""
    feats.update(f"comp:{c}" for c in COMPRESSORS if re.search(rf"^\s*{c}\b", section, re.M))
    return frozenset(feats)


def compression_level(compression: str, level: Optional[int]) -> Optional[int]:
    """The level to compress with (``level`` checked, or the compressor's default here); None for
    compressors without levels."""
    if compression not in COMPRESSORS:
        raise PullError(f"unknown squashfs compression {compression!r} (one of {', '.join(sorted(COMPRESSORS))})")
    levels = COMPRESSORS[compression]
    if levels is None:
        return None
    lo, hi, default = levels
    lvl = default if level is None else level
    if not isinstance(lvl, int) or not lo <= lvl <= hi:
        raise PullError(f"squashfs {compression} level must be {lo}..{hi}, not {level!r}")
    return lvl


def compression_args(compression: str, level: Optional[int], feats: frozenset = frozenset()) -> List[str]:
    """``-comp`` and level options for mksquashfs (see the module docstring for the trade-offs)."""
    lvl = compression_level(compression, level)
    if feats and f"comp:{compression}" not in feats:
        raise PullError(f"this mksquashfs cannot compress with {compression}; use gzip")
    args = ["-comp", compression]
    if lvl is not None:
        return args + ["-Xcompression-level", str(lvl)]
    if compression == "lz4" and level is not None and level > 1:
        args.append("-Xhc")
    elif level is not None:
        log.info("squashfs compression %s takes no level; %s ignored", compression, level)
    return args


def uses_native(compression: str, method: str = "auto") -> bool:
    """Whether ``build_squashfs`` with this ``method`` writes the squashfs itself (else mksquashfs
    does): ``native``, or ``auto`` with a compressor the native writer has."""
    return method == "native" or (method == "auto" and squashfs_writer.supports(compression))


def writes_in_place(compression: str, method: str = "auto", mksquashfs: str = "mksquashfs") -> bool:
    """Whether ``build_squashfs`` with this ``method`` can write at an offset into the SIF
    (``offset``): always with the native writer, with mksquashfs where it has ``-offset`` (>= 4.4)."""
    return uses_native(compression, method) or "-offset" in mksquashfs_features(mksquashfs)


def _created_time(cfg: Mapping[str, Any]) -> Optional[int]:
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)?", str(cfg.get("created") or ""))
    if not m:
        return None
    tz = "+00:00" if m.group(2) in (None, "Z") else m.group(2)
    try:
        return int(_dt.datetime.fromisoformat(m.group(1) + tz).timestamp())
    except ValueError:
        return None


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


def _force_rmtree(path: Path) -> None:
    """Remove a rootfs we wrote, even where its directories lack owner write permission."""
    def fix(p: str) -> None:
        with os.scandir(p) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    os.chmod(entry.path, 0o700)
                    fix(entry.path)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
        fix(str(path))
    shutil.rmtree(path, ignore_errors=True)


def _pseudo_name(path: str) -> Optional[str]:
    if "\n" in path or "\r" in path:
        return None
    return re.sub(r"([^A-Za-z0-9/._+-])", r"\\\1", path)


# mksquashfs's own memory (read-ahead queue and caches). Its default is a quarter of the RAM, which
# it fills with read-ahead of the tar stream when fed faster than it compresses: 590 MB peak for a
# 512 MB image, growing with the image. Its peak is about this cap plus its tables (inodes,
# directories, fragments, duplicate-check hashes: ~0.75-1 KB a file). Merge + mksquashfs of the
# bench's 2.5 GB image (50,600 files, 2 cores, zstd 3; wall best of 2-4 on a shared machine, CPU
# the same ~14.4 s at every cap): 256M 8.0 s, 236 MB peak; 128M 8.6 s, 140 MB; 64M 8.1 s, 96 MB;
# 32M 10.7 s, 74 MB. 64M is the smallest cap that kept the speed.
MKSQUASHFS_MEM = "64M"
PIPE_BUFFER = 1 << 20  # bytes gathered before a write into mksquashfs's stdin, and the pipe's size


def _grow_pipe(fd: int) -> None:
    """Make the pipe into mksquashfs hold 1 MiB (Linux ``F_SETPIPE_SZ``; the default is 64 KiB), so
    Python and mksquashfs wake each other less often. Best effort: the limit is
    /proc/sys/fs/pipe-max-size for unprivileged users, and other systems lack the call."""
    import fcntl

    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BUFFER)


def _run(cmd: Sequence[str], *, stdin_writer=None, stderr_path: Path) -> None:
    log.debug("running %s", " ".join(cmd))
    with open(stderr_path, "w+b") as err:
        try:
            proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE if stdin_writer else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, bufsize=PIPE_BUFFER)
        except OSError as exc:
            raise PullError(f"cannot run {cmd[0]}: {exc}") from None
        if proc.stdin is not None:
            _grow_pipe(proc.stdin.fileno())
        try:
            if stdin_writer is not None:
                assert proc.stdin is not None
                try:
                    stdin_writer(proc.stdin)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # mksquashfs stopped reading: its exit status and message say why
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        if rc != 0:
            err.seek(0)
            raise PullError(f"mksquashfs failed (exit {rc}): {_last_line(err.read())}")


def build_squashfs(
    layers: Iterable[LayerBlob],
    image_config: Mapping[str, Any],
    dest: Path,
    *,
    source_ref: str,
    source_digest: str,
    compression: str = "zstd",
    level: Optional[int] = None,
    processors: Optional[int] = None,
    workdir: Path,
    method: str = "auto",
    preserve_owners: bool = True,
    mksquashfs: str = "mksquashfs",
    offset: int = 0,
) -> str:
    """Merge ``layers`` (lowest first), add Apptainer's files, and write the squashfs to ``dest``.

    ``layers`` may be a lazy iterable that yields each layer once it is downloaded and verified:
    pass 1 (headers) then runs while later layers download. Pass 2 streams the surviving data,
    decompressed once more, into the native writer or mksquashfs (see the module docstring), both
    compressing with a thread per core (``processors`` to choose: by default every core this
    process may run on, a Slurm job's, for the native writer; every core for mksquashfs). Memory
    holds the tree of directories (not files, nor data); disk holds only the blobs.

    ``dest`` is written directly (the caller publishes it with temp + rename; it is removed here on
    failure), from byte ``offset`` on: the squashfs goes straight to its place in the SIF, see
    ``shpc_lite.sif.InPlace`` (mksquashfs needs ``-offset``, >= 4.4). ``workdir`` holds scratch
    files (and the rootfs for ``method="dir"``). ``level`` None means the compressor's default here
    (zstd 3, gzip 9). Owners from the image are kept when ``preserve_owners`` and the build can
    express them (``"native"`` and ``"tar"`` always; ``"dir"`` only as root); otherwise everything
    is root-owned (``-all-root``), as an unprivileged ``apptainer pull`` does. Returns the method
    used.

    Raises LayerError for unsafe or unreadable layers, PullError when the build fails.
    """
    dest = Path(dest)
    if method not in METHODS:
        raise PullError(f"unknown squashfs build method {method!r} (one of {', '.join(METHODS)})")
    if uses_native(compression, method):
        method = "native"
        if not squashfs_writer.supports(compression):
            raise PullError(f"squashfs compression {compression} needs mksquashfs (the native writer does "
                            "gzip and zstd)")
        lvl = compression_level(compression, level)
        assert lvl is not None

        from ..workers import usable_cores

        def build(tree: RootfsTree, scratch: Path) -> None:
            squashfs_writer.write_squashfs(tree, dest, compression=compression, level=lvl,
                                           workers=processors or usable_cores(), owners=preserve_owners,
                                           offset=offset, scratch=scratch)
    else:
        method, build = _mksquashfs_build("auto" if method == "mksquashfs" else method, dest, compression, level,
                                          processors, preserve_owners, mksquashfs, offset)

    cfg = inner_config(image_config)
    extras = apptainer_files(image_config, source_ref=source_ref, source_digest=source_digest)
    workdir = Path(workdir)
    try:
        tree = build_tree(layers, extras, _created_time(image_config) or _created_time(cfg))
        workdir.mkdir(parents=True, exist_ok=True)
        with tree, tempfile.TemporaryDirectory(dir=workdir, prefix="squashfs-") as scratch:
            build(tree, Path(scratch))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            dest.unlink()
        if isinstance(exc, OSError):  # scratch space full, unwritable workdir ...
            raise PullError(f"building {dest.name} in {workdir} failed: {exc}") from None
        if isinstance(exc, (LayerError, PullError)):  # add the image (a LayerError names the layer and entry)
            raise type(exc)(f"{source_ref}: {exc}") from None
        raise
    return method


def _mksquashfs_build(method: str, dest: Path, compression: str, level: Optional[int], processors: Optional[int],
                      preserve_owners: bool, mksquashfs: str, offset: int) -> Tuple[str, "functools.partial[None]"]:
    """The method (``"tar"`` or ``"dir"``; for ``"auto"`` whichever this mksquashfs has) and its
    ``build(tree, scratch)``, with the options both share."""
    feats = mksquashfs_features(mksquashfs)
    comp_args = compression_args(compression, level, feats)
    has_tar = {"-tar", "-no-strip", "-root-mode"} <= feats
    if method == "auto":
        method = DEFAULT_METHOD if has_tar or DEFAULT_METHOD == "dir" else "dir"
    if method == "tar" and not has_tar:
        raise PullError(f"{mksquashfs} has no -tar mode (squashfs-tools >= 4.5 needed); use method 'dir'")
    common = ["-noappend", *comp_args, "-no-xattrs"]
    if processors:
        common += ["-processors", str(int(processors))]
    if "-mem" in feats:
        common += ["-mem", MKSQUASHFS_MEM]
    if offset:
        if "-offset" not in feats:
            raise PullError(f"{mksquashfs} has no -offset option (squashfs-tools >= 4.4 needed)")
        common += ["-offset", str(int(offset))]
    common += [o for o in ("-quiet", "-no-progress", "-exit-on-error") if o in feats]
    if method == "tar":
        return method, functools.partial(_build_tar, dest=dest, common=common, owners=preserve_owners, exe=mksquashfs)
    return method, functools.partial(_build_dir, dest=dest, common=common, chown=preserve_owners and is_root(),
                                     exe=mksquashfs)


def _build_tar(tree: RootfsTree, scratch: Path, *, dest: Path, common: List[str], owners: bool, exe: str) -> None:
    cmd = [exe, "-", str(dest), "-tar", "-no-strip", *common,
           "-root-mode", "0755", "-root-uid", "0", "-root-gid", "0"]  # -root-time is ignored with -tar (4.5.1)
    if not owners:
        cmd.append("-all-root")

    def feed(pipe) -> None:
        write_merged_tar(tree, pipe)

    _run(cmd, stdin_writer=feed, stderr_path=scratch / "mksquashfs.err")


def _build_dir(tree: RootfsTree, scratch: Path, *, dest: Path, common: List[str], chown: bool, exe: str) -> None:
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    try:
        result = write_rootfs_dir(tree, rootfs, chown=chown)
        cmd = [exe, str(rootfs), str(dest), *common]
        if not chown:
            cmd.append("-all-root")
        if result.fixups:
            lines = []
            for path, (mode, uid, gid) in sorted(result.fixups.items()):
                name = _pseudo_name(path)
                if name is None:
                    log.warning("cannot restore mode %o of %r in the squashfs (name has a newline)", mode, path)
                    continue
                lines.append(f"{name} m {mode:04o} {uid if chown else 0} {gid if chown else 0}\n")
            pf = scratch / "modes.pseudo"
            pf.write_text("".join(lines), encoding="utf-8", errors="surrogateescape")
            cmd += ["-pf", str(pf)]
        _run(cmd, stderr_path=scratch / "mksquashfs.err")
    finally:
        _force_rmtree(rootfs)


__all__ = ["build_squashfs", "compression_args", "mksquashfs_features", "DEFAULT_METHOD"]
