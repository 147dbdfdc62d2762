"""An image's file tree from its SIF's squashfs directory table, without reading file contents.

``unsquashfs -l`` prints the names of the directory table and ``-lln`` adds modes and symlink
targets; neither decompresses a data block, so listing a multi-GB image reads well under a MB.
The package scan at install (names: ``list_names``) and ``shpc-lite discover`` (modes and
targets of a few directories: ``list_sif`` with paths) read the tree through here, streamed
line by line so memory does not grow with the image.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from shpc_lite.errors import SifError
from shpc_lite.scrub import printable

if TYPE_CHECKING:
    from shpc_lite.pull.layers import RootfsTree

ROOT = "squashfs-root"
_PREFIX = ROOT + "/"
_MODES = frozenset("-dlcbps")
_WILDCARDS = str.maketrans({c: "\\" + c for c in "\\*?["})


@dataclass(frozen=True)
class Entry:
    """One name in the image: ``kind`` is ``f`` (file), ``d``, ``l`` (symlink) or ``o`` (other)."""

    path: str  # absolute inside the image, e.g. /usr/bin/python3
    kind: str
    executable: bool = False
    target: str = ""  # symlinks only


def parse_line(line: str) -> Entry | None:
    """One line of ``unsquashfs -lln``: mode, owner, size (``major, minor`` for devices), date,
    time, path[ -> target]. None for the root, or a line that is not an entry (the rest of a
    name holding a newline). Split, not a regular expression: this runs once per file."""
    fields = line.rstrip("\n").split(None, 6 if line[:1] in ("c", "b") else 5)
    if len(fields) < 6 or len(fields[0]) != 10 or fields[0][0] not in _MODES:
        return None
    mode, rest = fields[0], fields[-1]
    if not rest.startswith(_PREFIX):
        return None
    rest = rest[len(ROOT):]
    if mode[0] == "l":
        path, sep, target = rest.partition(" -> ")
        return Entry(path, "l", target=target) if sep else None
    kind = {"-": "f", "d": "d"}.get(mode[0], "o")
    return Entry(rest, kind, executable=kind == "f" and (mode[3] in "xs" or mode[6] in "xs" or mode[9] in "xt"))


def _lines(sif: str | Path, option: str, paths: Sequence[str] = ()) -> Iterator[str]:
    """The lines of ``unsquashfs OPTION`` on a SIF's primary partition (of ``paths`` only, each
    with its ancestors and, for a directory, everything below it), streamed. SifError when
    the SIF cannot be listed (no squashfs-tools, not a SIF, a damaged partition)."""
    from shpc_lite.sif import partition_offset, read_sif

    offset = partition_offset(read_sif(str(sif)))
    exe = shutil.which("unsquashfs")
    if exe is None:
        raise SifError(f"{sif}: listing the image needs unsquashfs (squashfs-tools)")
    # unsquashfs takes the paths as wildcards: the image's own names must match only themselves
    extract = [p.lstrip("/").translate(_WILDCARDS) for p in paths]
    argv = [exe, option, "-no-progress", "-o", str(offset), "-d", ROOT, str(sif), *extract]
    # stderr to a file, not a pipe: a damaged image can make unsquashfs write more errors than a
    # pipe holds while we are still reading stdout
    with tempfile.TemporaryFile() as errors, subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True,
            errors="surrogateescape") as proc:
        assert proc.stdout is not None
        yield from proc.stdout
        if proc.wait() != 0:
            errors.seek(0)
            last = (errors.read(1 << 16).decode("utf-8", "replace").strip().splitlines() or ["failed"])[-1]
            raise SifError(f"{sif}: unsquashfs cannot list the image: {printable(last)}")


def list_names(sif: str | Path) -> Iterator[str]:
    """Every path in the image (``unsquashfs -l``: names only, the cheapest listing)."""
    for line in _lines(sif, "-l"):
        if line.startswith(_PREFIX):
            yield line[len(ROOT):].rstrip("\n")


def list_sif(sif: str | Path, paths: Sequence[str] = ()) -> Iterator[Entry]:
    """The entries of the image (of ``paths`` and what is below them, when given), with modes
    and symlink targets (``unsquashfs -lln``)."""
    for line in _lines(sif, "-lln", paths):
        entry = parse_line(line)
        if entry is not None:
            yield entry


def rootfs_entries(tree: "RootfsTree") -> Iterator[Entry]:
    """The entries of an image merged from its layers' tar headers (shpc_lite.pull.layers, which
    settles whiteouts, opaque dirs and hard links), in the model the SIF listing gives, so
    discover reads a registry image and a SIF alike."""
    plan = tree.plan()
    for path, _directory in plan.dirs:
        yield Entry("/" + path, "d")
    for path, link in plan.symlinks:
        yield Entry("/" + path, "l", target=link.target)
    for path, _fifo in plan.fifos:
        yield Entry("/" + path, "o")
    for node, names in plan.inodes():
        for path in names:
            yield Entry("/" + path, "f", executable=bool(node.mode & 0o111))
