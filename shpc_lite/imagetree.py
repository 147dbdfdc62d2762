"""An image's file tree from its SIF's squashfs directory table, without reading file contents.

``unsquashfs -lln`` prints the directory table (names, modes, symlink targets) and never
decompresses a data block, so listing a multi-GB image costs what ``unsquashfs -l`` costs.
The package scan at install and ``shpc-lite discover`` both read the tree through here; the
output is streamed line by line so memory does not grow with the image.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shpc_lite.errors import SifError
from shpc_lite.scrub import printable

ROOT = "squashfs-root"

# mode, owner/group, size (or "major, minor" for devices), date, time, path[ -> target]
_LINE = re.compile(r"\A(?P<mode>[-dlcbps][-rwxsStT]{9}) +\S+ +\S+(?:, *\S+)? +\d{4}-\d\d-\d\d \d\d:\d\d "
                   + re.escape(ROOT) + r"(?P<rest>/.*)?\Z")


@dataclass(frozen=True)
class Entry:
    """One name in the image: ``kind`` is ``f`` (file), ``d``, ``l`` (symlink) or ``o`` (other)."""

    path: str  # absolute inside the image, e.g. /usr/bin/python3
    kind: str
    executable: bool = False
    target: str = ""  # symlinks only


def parse_line(line: str) -> Entry | None:
    """One line of ``unsquashfs -lln``; None for the root, or a line that is not an entry
    (a continuation of a name holding a newline is not an entry)."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None or not m.group("rest"):
        return None
    mode, rest = m.group("mode"), m.group("rest")
    if mode[0] == "l":
        path, sep, target = rest.partition(" -> ")
        return Entry(path, "l", target=target) if sep else None
    kind = {"-": "f", "d": "d"}.get(mode[0], "o")
    return Entry(rest, kind, executable=kind == "f" and any(c in "xs" for c in (mode[3], mode[6], mode[9])))


def list_sif(path: str | Path) -> Iterator[Entry]:
    """Every entry of a SIF's primary partition, streamed. SifError when the SIF cannot be
    listed (no squashfs-tools, not a SIF, a damaged partition)."""
    from shpc_lite.sif import partition_offset, read_sif

    offset = partition_offset(read_sif(str(path)))
    exe = shutil.which("unsquashfs")
    if exe is None:
        raise SifError(f"{path}: listing the image needs unsquashfs (squashfs-tools)")
    argv = [exe, "-lln", "-no-progress", "-o", str(offset), "-d", ROOT, str(path)]
    # stderr to a file, not a pipe: a damaged image can make unsquashfs write more errors than a
    # pipe holds while we are still reading stdout
    with tempfile.TemporaryFile() as errors, subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True,
            errors="surrogateescape") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            entry = parse_line(line)
            if entry is not None:
                yield entry
        if proc.wait() != 0:
            errors.seek(0)
            last = (errors.read(1 << 16).decode("utf-8", "replace").strip().splitlines() or ["failed"])[-1]
            raise SifError(f"{path}: unsquashfs cannot list the image: {printable(last)}")
