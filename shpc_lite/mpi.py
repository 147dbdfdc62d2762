"""MPI with the host's stack: which MPI a library or an image carries, and whether the two fit.

The model (docs/environments.md): the image is built against an MPI of the MPICH ABI (its
binaries need ``libmpi.so.12``, or Debian's name ``libmpich.so.12``), and with ``mpi: host`` the
wrappers bind the host's MPI and fabric libraries in (config ``mpi_binds``) and set what finds them
(config ``mpi_env``, e.g. ``LD_LIBRARY_PATH``), so the host's library is loaded instead of the
image's. That works only when both have the same soname: Open MPI (``libmpi.so.40``) is not of
that ABI. The facts here are read from files (ELF headers, the image's directory table), never by
running the libraries.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from shpc_lite.config import Config

NONE, HOST = "none", "host"
# The sonames of the MPICH ABI initiative (MPICH, Intel MPI, Cray MPICH, MVAPICH); Debian and
# Ubuntu ship MPICH's library as libmpich.so.12.
MPICH_ABI = ("libmpi.so.12", "libmpich.so.12")
# An MPI library's file name or soname: libmpi.so.40, libmpich.so.12.2.2 (not libmpi_cxx, libmpifort)
_MPI_LIB = re.compile(r"\Alib(mpi|mpich)\.so\.(\d+)(\.[\d.]*)?\Z")


def mode(recipe_mpi: Optional[str], config: Config) -> str:
    """The recipe's ``features.mpi`` wins; a recipe that says nothing takes config ``mpi``."""
    return recipe_mpi or config["mpi"]


def settings_digest(config: Config) -> str:
    """What an install recorded of ``mpi_binds`` and ``mpi_env`` (they are written into the
    wrappers): doctor tells the modules installed with other settings than the config's now."""
    import hashlib
    import json

    text = json.dumps([config["mpi_binds"], config["mpi_env"]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def soname_of_name(name: str) -> Optional[str]:
    """``libmpich.so.12.2.2`` -> ``libmpich.so.12``; None for what is not an MPI library's name."""
    found = _MPI_LIB.match(name)
    return f"lib{found.group(1)}.so.{found.group(2)}" if found else None


def describe(soname: str) -> str:
    """What a soname says about the ABI, for a doctor line."""
    if soname in MPICH_ABI:
        return f"{soname} (MPICH ABI)"
    if soname == "libmpi.so.40" or soname == "libmpi.so.20":
        return f"{soname} (Open MPI, not the MPICH ABI)"
    return f"{soname} (not the MPICH ABI)"


def compatible(image: str, host: str) -> bool:
    """Whether the host's library can stand in for the image's: the same ABI family and major."""
    if image in MPICH_ABI or host in MPICH_ABI:
        return image in MPICH_ABI and host in MPICH_ABI
    return image == host


def elf_soname(path: str | Path) -> Optional[str]:
    """DT_SONAME of an ELF shared library (the ``SONAME`` line of ``readelf -d``), read from its
    section headers; None when the file is not an ELF library or has no soname."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
                return None
            wide, end = head[4] == 2, "<" if head[5] == 1 else ">"
            if wide:
                shoff, = struct.unpack_from(end + "Q", head, 0x28)
                shentsize, shnum = struct.unpack_from(end + "HH", head, 0x3A)
            else:
                shoff, = struct.unpack_from(end + "I", head, 0x20)
                shentsize, shnum = struct.unpack_from(end + "HH", head, 0x2E)
            if not shoff or not 0 < shnum <= 4096:
                return None
            fh.seek(shoff)
            table = fh.read(shentsize * shnum)
            shdr = end + ("IIQQQQIIQQ" if wide else "IIIIIIIIII")
            sections = [struct.unpack_from(shdr, table, i * shentsize) for i in range(shnum)
                        if (i + 1) * shentsize <= len(table)]
            for section in sections:
                if section[1] != 6:  # SHT_DYNAMIC
                    continue
                offset, size, link = section[4], section[5], section[6]
                if link >= len(sections):
                    return None
                fh.seek(offset)
                dynamic = fh.read(min(size, 1 << 20))
                entry = end + ("qQ" if wide else "iI")
                step = struct.calcsize(entry)
                for i in range(0, len(dynamic) - step + 1, step):
                    tag, value = struct.unpack_from(entry, dynamic, i)
                    if tag == 0:  # DT_NULL
                        break
                    if tag == 14:  # DT_SONAME: an offset into the linked string table
                        fh.seek(sections[link][4] + value)
                        return fh.read(256).split(b"\0", 1)[0].decode("utf-8", "replace")
            return None
    except (OSError, struct.error):
        return None


@dataclass(frozen=True)
class Library:
    """An MPI library found on the host among the bind sources: its path and soname."""

    path: str
    soname: str


def bind_source(bind: str) -> str:
    """The host side of a bind (``SRC[:DST[:ro|rw]]``)."""
    return bind.split(":", 1)[0]


def host_libraries(binds: Iterable[str]) -> list[Library]:
    """The MPI libraries the binds bring in: a bound file, or the files of a bound directory
    whose names are an MPI library's (``libmpi.so.12``, ``libmpich.so.12.2.2``)."""
    found = []
    for bind in binds:
        src = Path(bind_source(bind))
        if src.is_dir():
            try:
                candidates = sorted(p for p in src.iterdir() if soname_of_name(p.name))
            except OSError:
                continue
        else:
            candidates = [src] if soname_of_name(src.name) and src.is_file() else []
        for path in candidates:
            soname = elf_soname(path)
            if soname:
                found.append(Library(str(path), soname))
    first: dict[str, Library] = {}
    for lib in found:  # one per soname: the first name found (libmpich.so.12 before libmpich.so.12.2.2)
        first.setdefault(lib.soname, lib)
    return list(first.values())


def image_sonames(names: Iterable[str]) -> list[str]:
    """The MPI sonames an image's file names show (its directory table, shpc_lite.imagetree)."""
    return sorted({s for s in (soname_of_name(os.path.basename(n)) for n in names) if s})


def ldconfig_suggestion() -> list[str]:
    """The host's MPICH-ABI libraries the dynamic linker's cache knows (``ldconfig -p``): what
    doctor suggests for an empty ``mpi_binds``. Only a suggestion: which MPI a site wants users
    to get (and its fabric libraries) is the admin's call."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=20).stdout
            break
        except (OSError, subprocess.TimeoutExpired):
            continue
    else:
        return []
    paths = []
    for line in out.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.split(" ", 1)[0] in MPICH_ABI and path and path not in paths:
            paths.append(path)
    return paths
