"""Apply OCI image layers: a model of the final root filesystem, then two writers.

Why a model first: every path of every layer is resolved *inside* the model, as container runtimes
resolve it inside the rootfs (a symlink in a parent component is followed within the tree, an
absolute target starts at the tree's root, ``..`` stops at the root), so whiteouts, opaque
directories, hard links and symlink tricks are settled before a single byte is written. The result
is a tree whose every node sits under real directories; the writers then only create fresh entries
in a fresh tree (``O_CREAT|O_EXCL|O_NOFOLLOW``), so nothing can land outside it and no existing
file is ever written through.

The model's directories, symlinks and FIFOs are objects; its regular files, most of any image,
are rows of an on-disk index (:class:`_FileIndex`), so a pull's memory does not grow with the
number of files.

Pass 1 (:meth:`RootfsTree.apply_layer`) reads only tar headers. Pass 2 streams the file data that
survived into either a directory (:func:`write_rootfs_dir`, for ``mksquashfs DIR``) or one merged
tar stream (:func:`write_merged_tar`, for ``mksquashfs - OUT -tar``); layers with nothing left in
the final image are not read again.

Layer semantics (OCI image-spec layer.md): ``.wh.<name>`` removes ``<name>`` from lower layers,
``.wh..wh..opq`` hides every lower entry of its directory; entries of the same layer survive both;
whiteout files never appear in the result. Hard links name a path of the same or a lower layer.
Modes keep setuid/setgid/sticky bits (Python's tarfile extraction filters would clear them).
Sparse files (GNU tar's old ``S`` entries and pax sparse formats 0.0, 0.1 and 1.0, which GNU tar
``--sparse`` and bsdtar write for files with holes) become the files they stand for, holes as
zeros, streamed; their maps are bounded and checked first (see :class:`_LayerTarInfo`).
FIFOs are kept. Device nodes are not created (a note is logged); they are not needed in an
Apptainer image, whose /dev is mounted at run time. Extended attributes are not kept. (How this
compares with umoci, the reference unpacker: docs/registries.md, tests/test_differential.py.)
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import itertools
import logging
import lzma
import os
import re
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import zstandard

try:
    import sqlite3
except ImportError:  # a Python built without libsqlite3: said in one line when a merge starts
    sqlite3 = None  # type: ignore[assignment]

from ..errors import LayerError, PullError
from .apptainer_files import ExtraEntry
from .ustar import checksum as header_checksum
from .ustar import next_member

log = logging.getLogger(__name__)

MAX_ENTRY_SIZE = 64 << 30  # a larger declared size is refused as absurd
MAX_SYMLINKS = 255  # symlinks followed while resolving one path (then: a loop)
NAME_MAX = 255
PATH_MAX = 4096
MAX_TIME = 2**32 - 1  # squashfs stores unsigned 32-bit seconds
COPY_CHUNK = 1 << 20
MAX_HEADER_READ = 64 << 20  # largest single read of a compressed layer's stream (pax/long-name data)
MAX_SPARSE_ENTRIES = 1 << 16  # data segments of one sparse file (GNU tar writes one per run of data)
# entries of all layers together (an NGC image has a few hundred thousand): past this a layer of
# empty headers, which compress ~100x, is refused before its file index fills the temp dir
MAX_ENTRIES = 10_000_000

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


@dataclass(frozen=True)
class LayerBlob:
    """A downloaded layer: its file, its descriptor's media type and digest (used in messages)."""

    path: Path
    media_type: str = ""
    digest: str = ""

    @property
    def label(self) -> str:
        return self.digest or Path(self.path).name


def _entry_error(blob: LayerBlob, name: str, reason: str) -> LayerError:
    # repr() keeps control characters of hostile names out of the one-line message
    return LayerError(f"layer {blob.label}: entry {name!r}: {reason}")


# --------------------------------------------------------------------------------------------
# reading layers


def detect_compression(blob: LayerBlob) -> str:
    """``"gzip"``, ``"zstd"``, ``"xz"`` or ``"none"``, from the magic bytes (which win over the media type)."""
    try:
        with open(blob.path, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise LayerError(f"layer {blob.label}: cannot read {blob.path}: {exc.strerror or exc}") from None
    if head.startswith(GZIP_MAGIC):
        kind = "gzip"
    elif head.startswith(ZSTD_MAGIC):
        kind = "zstd"
    elif head.startswith(XZ_MAGIC):
        kind = "xz"
    else:
        kind = "none"
    mt = blob.media_type or ""
    declared = "gzip" if mt.endswith(("gzip", "+gzip")) else "zstd" if mt.endswith("+zstd") else None
    if declared and declared != kind:
        log.debug("layer %s: media type %s but content is %s; using the content", blob.label, mt, kind)
    return kind


def _gzip_reader_class() -> Callable[..., IO[bytes]]:
    """The fastest gzip reader available: python-isal's ``IGzipFile`` (ISA-L inflate), else stdlib.

    Measured on these 2-core machines (100 MB of mixed text and random data, gzip -6, best of 3):
    stdlib ``gzip`` 237 MB/s, zlib-ng's ``gzip_ng`` 500 MB/s, isal ``igzip`` 749 MB/s (its
    threaded reader 664 MB/s: the extra thread only helps when a core is idle, and mksquashfs
    keeps them busy). Every layer is read twice (headers, then data), so this is most of the
    Python-side cost of a pull. isal is a declared dependency; the stdlib fallback keeps a
    platform without its wheels working (same bytes, only slower).
    """
    global _GZIP_READER
    if _GZIP_READER is None:
        try:
            from isal import igzip
        except ImportError:
            log.debug("python-isal not importable: reading gzip layers with the stdlib gzip module")
            _GZIP_READER = gzip.GzipFile
        else:
            _GZIP_READER = igzip.IGzipFile
    return _GZIP_READER


_GZIP_READER: Optional[Callable[..., IO[bytes]]] = None


def _gzip_errors() -> Tuple[type, ...]:
    """Exceptions a corrupt gzip stream raises from whichever reader is in use."""
    try:
        from isal import isal_zlib
    except ImportError:
        return ()
    return (isal_zlib.error,)


@contextlib.contextmanager
def open_layer(blob: LayerBlob) -> Iterator[BinaryIO]:
    """The uncompressed tar stream of a layer."""
    kind = detect_compression(blob)
    with open(blob.path, "rb") as raw:
        if kind == "gzip":
            stream: IO[bytes] = _gzip_reader_class()(fileobj=raw, mode="rb")
        elif kind == "zstd":
            dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
            stream = dctx.stream_reader(raw, read_size=COPY_CHUNK, read_across_frames=True)
        elif kind == "xz":
            stream = lzma.LZMAFile(raw, "rb")
        else:
            stream = raw
        with contextlib.closing(stream):
            yield stream  # type: ignore[misc]


class _Sequential:
    """Forward-only file object over a decompressing stream, so tarfile's random-access mode can be
    used: skipping an entry's data is one discarding read loop, not a copy through tarfile's
    stream buffer (about twice as fast for pass 1). Reads are exact (short reads are retried)."""

    def __init__(self, stream: IO[bytes]):
        self._s = stream
        self._pos = 0
        self._back = b""  # a block given back by unread, read again first
        self.name = None

    def unread(self, data: bytes) -> None:
        """Give back the bytes just read (the fast header reader does, for tarfile to read them)."""
        self._back = data + self._back
        self._pos -= len(data)

    def read(self, n: Optional[int] = -1) -> bytes:
        if n is None or n < 0 or n > MAX_HEADER_READ:
            # tarfile reads whole entries only for metadata (pax, GNU long names): refuse a
            # decompression bomb there; file data is always read in small chunks
            raise OSError(errno.EFBIG, "tar metadata entry too large")
        if self._back:
            data, self._back = self._back[:n], self._back[n:]
            if len(data) < n:
                data += self._read(n - len(data))
            self._pos += len(data)
            return data
        data = self._read(n)
        self._pos += len(data)
        return data

    def _read(self, n: int) -> bytes:
        data = self._s.read(n)
        if 0 < len(data) < n:
            parts, got = [data], len(data)
            while got < n:
                more = self._s.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence != 0:
            raise OSError(errno.ESPIPE, "cannot seek from the end of a layer stream")
        if pos < self._pos:
            raise OSError(errno.ESPIPE, "cannot seek backwards in a layer stream")
        if self._back and pos > self._pos:
            dropped = self._back[:pos - self._pos]
            self._back = self._back[len(dropped):]
            self._pos += len(dropped)
        while pos > self._pos:
            chunk = self._s.read(min(pos - self._pos, COPY_CHUNK))
            if not chunk:
                break  # end of data: the next read returns b"", which tarfile reports
            self._pos += len(chunk)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True


class _SparseError(Exception):
    """A sparse entry's map is malformed or too large; carries the entry's name for the message."""

    def __init__(self, name: str, reason: str):
        super().__init__(reason)
        self.name, self.reason = name, reason


def _sparse_number(name: str, text: Union[str, bytes]) -> int:
    """One decimal number of a pax sparse map (``int()`` alone would accept ``+1``, ``1_0`` and spaces)."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    if not raw.isdigit() or len(raw) > 20:
        raise _SparseError(name, f"malformed sparse map value {raw[:24]!r}")
    return int(raw)


def _sparse_name(member: tarfile.TarInfo, pax_headers: Mapping[str, str]) -> str:
    """The name of a pax sparse entry before tarfile applies its records (for error messages)."""
    return pax_headers.get("GNU.sparse.name") or pax_headers.get("path") or member.name


class _LayerTarInfo(tarfile.TarInfo):
    """TarInfo that parses GNU sparse maps (old GNU ``S`` type, pax 0.0, 0.1 and 1.0) with bounds.

    Why not tarfile's own parsing: it accepts maps of any length (a 1.0 map is read from the data
    area until its declared count is reached, a 0.0 map is every match in a pax header up to
    ``MAX_HEADER_READ``), and with a pax ``size`` record it computes the next header's offset from
    the real (expanded) size. Here a sparse member gets ``sparse`` (the data segments, empty ones
    dropped), ``size`` (the real size) and ``sparse_data`` (bytes stored in the archive); whether the
    map is consistent is checked by :meth:`RootfsTree._check_sparse`, where the layer is known.
    """

    sparse_data: Optional[int] = None  # bytes of file data stored in the archive (sparse members)
    _sparse_area: Tuple[int, int] = (0, 0)  # (offset, size) of the whole data area (map included)
    _sparse_realsize: int = 0

    def _proc_sparse(self, archive):  # type: ignore[no-untyped-def,override]
        structs, isextended, origsize = self._sparse_structs
        del self._sparse_structs
        entries = list(structs)
        while isextended:
            if len(entries) > MAX_SPARSE_ENTRIES:
                raise _SparseError(self.name, f"more than {MAX_SPARSE_ENTRIES} sparse map entries")
            buf = archive.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) != tarfile.BLOCKSIZE:
                raise _SparseError(self.name, "sparse map truncated")
            for pos in range(0, 21 * 24, 24):
                entries.append((self._gnu_number(buf[pos:pos + 12]), self._gnu_number(buf[pos + 12:pos + 24])))
            isextended = bool(buf[504])
        self.sparse = [(off, n) for off, n in entries if n]
        self.sparse_data = self.size
        self.offset_data = archive.fileobj.tell()
        archive.offset = self.offset_data + self._block(self.size)
        self.size = origsize
        return self

    def _gnu_number(self, field_: bytes) -> int:
        try:
            return tarfile.nti(field_)
        except (tarfile.HeaderError, ValueError):
            raise _SparseError(self.name, "malformed sparse map value") from None

    def _proc_pax(self, archive):  # type: ignore[no-untyped-def,override]
        member = super()._proc_pax(archive)
        if isinstance(member, _LayerTarInfo) and member.sparse_data is not None:
            # the real size wins over a pax "size" record, and the next header follows the stored data
            member.size = member._sparse_realsize
            if "GNU.sparse.name" in member.pax_headers:  # the real name, whatever order the records came in
                member.name = member.pax_headers["GNU.sparse.name"]
            start, stored = member._sparse_area
            archive.offset = start + member._block(stored)
        return member

    def _set_pax_sparse(self, member: tarfile.TarInfo, pax_headers: Mapping[str, str], realsize_key: str,
                        numbers: List[int], map_bytes: int = 0) -> None:
        name = _sparse_name(member, pax_headers)
        if self.type not in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            raise _SparseError(name, "sparse map in a global pax header")
        if len(numbers) % 2:
            raise _SparseError(name, "sparse map has an offset without a length")
        if len(numbers) > 2 * MAX_SPARSE_ENTRIES:
            raise _SparseError(name, f"more than {MAX_SPARSE_ENTRIES} sparse map entries")
        if realsize_key not in pax_headers:
            raise _SparseError(name, f"sparse entry without {realsize_key}")
        stored = _sparse_number(name, pax_headers["size"]) if "size" in pax_headers else member.size
        if map_bytes > stored:
            raise _SparseError(name, "sparse map larger than the entry")
        assert isinstance(member, _LayerTarInfo)
        member.sparse = [(off, n) for off, n in zip(numbers[::2], numbers[1::2]) if n]
        member._sparse_realsize = _sparse_number(name, pax_headers[realsize_key])
        member._sparse_area = (member.offset_data - map_bytes, stored)
        member.sparse_data = stored - map_bytes

    def _proc_gnusparse_00(self, next, pax_headers, buf):  # type: ignore[no-untyped-def,override]
        name = _sparse_name(next, pax_headers)
        if buf.count(b" GNU.sparse.offset=") > MAX_SPARSE_ENTRIES:
            raise _SparseError(name, f"more than {MAX_SPARSE_ENTRIES} sparse map entries")
        offsets = [int(m.group(1)) for m in re.finditer(rb"\d+ GNU\.sparse\.offset=(\d{1,20})\n", buf)]
        sizes = [int(m.group(1)) for m in re.finditer(rb"\d+ GNU\.sparse\.numbytes=(\d{1,20})\n", buf)]
        if len(offsets) != len(sizes):
            raise _SparseError(name, "sparse map has an offset without a length")
        self._set_pax_sparse(next, pax_headers, "GNU.sparse.size", [x for pair in zip(offsets, sizes) for x in pair])

    def _proc_gnusparse_01(self, next, pax_headers):  # type: ignore[no-untyped-def,override]
        name = _sparse_name(next, pax_headers)
        text = pax_headers["GNU.sparse.map"]
        if text.count(",") >= 2 * MAX_SPARSE_ENTRIES:
            raise _SparseError(name, f"more than {MAX_SPARSE_ENTRIES} sparse map entries")
        numbers = [_sparse_number(name, x) for x in text.split(",")] if text else []
        self._set_pax_sparse(next, pax_headers, "GNU.sparse.size", numbers)

    def _proc_gnusparse_10(self, next, pax_headers, archive):  # type: ignore[no-untyped-def,override]
        # the map is the start of the data area: a count, then offset/size pairs, one per line
        name = _sparse_name(next, pax_headers)
        start = archive.fileobj.tell()
        buf = b""
        count: Optional[int] = None
        numbers: List[int] = []
        while count is None or len(numbers) < 2 * count:
            while b"\n" not in buf:
                if len(buf) > 2 * tarfile.BLOCKSIZE:
                    raise _SparseError(name, "malformed sparse map")
                block = archive.fileobj.read(tarfile.BLOCKSIZE)
                if len(block) != tarfile.BLOCKSIZE:
                    raise _SparseError(name, "sparse map truncated")
                buf += block
            line, buf = buf.split(b"\n", 1)
            value = _sparse_number(name, line)
            if count is None:
                if value > MAX_SPARSE_ENTRIES:
                    raise _SparseError(name, f"more than {MAX_SPARSE_ENTRIES} sparse map entries")
                count = value
            else:
                numbers.append(value)
        next.offset_data = archive.fileobj.tell()
        self._set_pax_sparse(next, pax_headers, "GNU.sparse.realsize", numbers, next.offset_data - start)


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError, ValueError,
                *_gzip_errors())


def iter_members(blob: LayerBlob) -> Iterator[Tuple[int, tarfile.TarInfo, tarfile.TarFile]]:
    """Yield ``(ordinal, member, tarfile)`` for each entry; the member's data is readable until the next one."""
    ordinal = 0
    with open_layer(blob) as stream:
        try:
            fileobj = stream if isinstance(stream, io.BufferedReader) else _Sequential(stream)
            tf = tarfile.open(fileobj=fileobj, mode="r:", tarinfo=_LayerTarInfo)  # type: ignore[call-overload]
        except _SparseError as exc:  # opening reads the first member
            raise _entry_error(blob, exc.name, exc.reason) from None
        except tarfile.ReadError as exc:
            if "empty file" in str(exc):
                return  # a zero-length layer: nothing to apply
            raise LayerError(f"layer {blob.label}: not a readable tar archive: {exc}") from None
        except _READ_ERRORS as exc:
            raise LayerError(f"layer {blob.label}: not a readable tar archive: {exc}") from None
        last = None
        while True:
            try:
                member = next_member(tf, fileobj)
            except _SparseError as exc:
                raise _entry_error(blob, exc.name, exc.reason) from None
            except _READ_ERRORS as exc:
                where = f"entry {last!r}" if last is not None else "the first entry"
                raise LayerError(f"layer {blob.label}: unreadable at or after {where}: {exc}") from None
            if member is None:
                return
            tf.members.clear()  # tarfile keeps every header otherwise
            last = member.name
            yield ordinal, member, tf
            ordinal += 1


# --------------------------------------------------------------------------------------------
# the model


class _Node:
    """What every entry of the model is (directories, symlinks, FIFOs keep their metadata in slots)."""

    __slots__ = ("mode", "uid", "gid", "mtime")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int):
        self.mode, self.uid, self.gid, self.mtime = mode, uid, gid, mtime


_DIR_IDS = itertools.count()


class _Dir(_Node):
    """A directory: its children that are not layer files (those are in the :class:`_FileIndex`,
    under ``ident``; an id is never reused, so files of a directory that was removed are unreachable)."""

    __slots__ = ("children", "ident")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int):
        super().__init__(mode, uid, gid, mtime)
        self.children: Dict[str, "_Entry"] = {}
        self.ident = next(_DIR_IDS)


class _Symlink(_Node):
    __slots__ = ("target",)

    def __init__(self, mode: int, uid: int, gid: int, mtime: int, target: str):
        super().__init__(mode, uid, gid, mtime)
        self.target = target


class _Fifo(_Node):
    """A named pipe: no data, only its metadata."""

    __slots__ = ()


# mode uid gid mtime size offset layer ordinal: a file's numbers as the _FileIndex stores them
_FILE_META = struct.Struct("<HIIqQQIi")


class _File:
    """A regular file's inode. ``offset`` is where the data starts in the layer's uncompressed
    stream (pass 2 reads it from there without parsing a tar header again); ``layer`` and
    ``ordinal`` (its place in the layer) are its identity.

    Layer files live in the :class:`_FileIndex`, and an object is made only for one looked up or
    being written. Generated files (``data``: their bytes) stay in their directory's ``children``,
    where the same object under several names is a hard link (``linked`` is then set)."""

    __slots__ = ("mode", "uid", "gid", "mtime", "size", "offset", "layer", "ordinal", "data", "sparse", "linked")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int, size: int, offset: int, layer: int, ordinal: int,
                 data: Optional[bytes] = None, sparse: Optional[List[Tuple[int, int]]] = None):
        self.mode, self.uid, self.gid, self.mtime, self.size = mode, uid, gid, mtime, size
        self.offset, self.layer, self.ordinal = offset, layer, ordinal
        self.data, self.sparse = data, sparse  # generated files only; sparse files only: the map of data segments
        self.linked = False

    def packed(self) -> bytes:
        return _FILE_META.pack(self.mode, self.uid, self.gid, self.mtime, self.size, self.offset, self.layer,
                               self.ordinal)


_Entry = Union[_Node, _File]  # what a directory's children are

_SPARSE_SEGMENT = struct.Struct("<QQ")


def _file_from_row(meta: bytes, sparse: Optional[bytes]) -> _File:
    """The :class:`_File` a row of the :class:`_FileIndex` stands for."""
    return _File(*_FILE_META.unpack(meta), sparse=None if sparse is None else list(_SPARSE_SEGMENT.iter_unpack(sparse)))


def _sparse_blob(sparse: Optional[List[Tuple[int, int]]]) -> Optional[bytes]:
    return None if sparse is None else b"".join(_SPARSE_SEGMENT.pack(*seg) for seg in sparse)


def _name_key(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")  # a tar name need not be UTF-8


class _IndexErrors:
    """Turns an SQLite failure of the file index (a full or unwritable temp dir) into one line."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if sqlite3 is not None and isinstance(exc, sqlite3.Error):
            raise PullError(f"the merge's file index (in SQLITE_TMPDIR, else TMPDIR, else /var/tmp or /tmp) "
                            f"failed: {exc}") from None


_INDEX_ERRORS = _IndexErrors()


def index_errors() -> _IndexErrors:
    """A context in which an SQLite failure becomes a one-line PullError (for users of
    :attr:`_FileIndex.connection`)."""
    return _INDEX_ERRORS


class _FileIndex:
    """The layers' regular files, on disk: a private temporary SQLite database.

    Why: files are most of an image's entries (a 2 GB image has ~50,000, an NGC one a few hundred
    thousand), and held as objects they made the merge grow by ~0.3 KB each. Here a row costs disk;
    memory is SQLite's page cache, capped at ``CACHE_KIB`` whatever the image (what does not fit
    goes to a temp file that SQLite unlinks as it opens it: a crash leaves nothing behind).
    Directories, symlinks and FIFOs stay objects, as paths are resolved through them.

    A row is one name of a file: its directory's id (:class:`_Dir`), the name (bytes), ``gen`` the
    layer that put the name there (whiteouts of that same layer spare it), the inode's layer and
    ordinal (its identity: a hard link's row copies its target's), its packed numbers (the form of
    :class:`_File`) and its sparse map, if any. Only the merge thread writes; pass 2 only reads."""

    CACHE_KIB = 2048
    BATCH = 512

    def __init__(self) -> None:
        if sqlite3 is None:
            raise PullError(f"this Python ({sys.executable}) has no sqlite3 module, which the builtin puller needs "
                            "(build Python with libsqlite3, or use puller apptainer)")
        with _INDEX_ERRORS:
            db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
            for pragma in (f"cache_size=-{self.CACHE_KIB}", "journal_mode=OFF", "synchronous=OFF", "temp_store=FILE"):
                db.execute(f"PRAGMA {pragma}")
            db.execute("CREATE TABLE f (dir INTEGER NOT NULL, name BLOB NOT NULL, gen INTEGER NOT NULL,"
                       " layer INTEGER NOT NULL, ordinal INTEGER NOT NULL, meta BLOB NOT NULL, sparse BLOB,"
                       " PRIMARY KEY (dir, name)) WITHOUT ROWID")
            db.execute("BEGIN")  # one transaction, never committed: nothing here outlives the process
        self._execute = db.execute
        self._db = db
        # rows not yet inserted: one executemany per BATCH costs ~1 us a row, an execute ~4
        self._pending: Dict[Tuple[int, str], Tuple[int, bytes, int, int, int, bytes, Optional[bytes]]] = {}

    def put(self, directory: int, name: str, gen: int, meta: bytes, layer: int, ordinal: int,
            sparse: Optional[bytes]) -> None:
        pending = self._pending
        pending[directory, name] = (directory, _name_key(name), gen, layer, ordinal, meta, sparse)
        if len(pending) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            with _INDEX_ERRORS:
                self._db.executemany("INSERT OR REPLACE INTO f VALUES (?, ?, ?, ?, ?, ?, ?)", self._pending.values())
            self._pending.clear()

    def get(self, directory: int, name: str) -> Optional[Tuple[int, _File]]:
        """``(gen, file)`` of the name, or ``None``."""
        row = self._pending.get((directory, name))
        if row is not None:
            return row[2], _file_from_row(row[5], row[6])
        with _INDEX_ERRORS:
            found = self._execute("SELECT gen, meta, sparse FROM f WHERE dir = ? AND name = ?",
                                  (directory, _name_key(name))).fetchone()
        return None if found is None else (found[0], _file_from_row(found[1], found[2]))

    def delete(self, directory: int, name: str) -> None:
        self._pending.pop((directory, name), None)
        with _INDEX_ERRORS:
            self._execute("DELETE FROM f WHERE dir = ? AND name = ?", (directory, _name_key(name)))

    def delete_lower(self, directory: int, gen: int) -> None:
        """Remove the directory's files not put there by layer ``gen`` (an opaque whiteout of it)."""
        self._flush()
        with _INDEX_ERRORS:
            self._execute("DELETE FROM f WHERE dir = ? AND gen != ?", (directory, gen))

    def rows(self) -> Iterator[Tuple[int, int, int, bytes, bytes, Optional[bytes]]]:
        """``(layer, ordinal, dir, name, meta, sparse)`` of every name, by layer and ordinal (SQLite's
        sorter works within the same cache and spills to temp files)."""
        self._flush()
        with _INDEX_ERRORS:  # the sorter may need the temp dir too
            yield from self._execute("SELECT layer, ordinal, dir, name, meta, sparse FROM f ORDER BY layer, ordinal")

    @property
    def connection(self) -> "sqlite3.Connection":
        """The index's database, where a writer keeps its own per-file tables (same temp file,
        same capped cache; run statements under :func:`index_errors`)."""
        self._flush()
        return self._db

    def close(self) -> None:
        self._db.close()


def split_path(name: str) -> List[str]:
    """Lexically clean an archive path: drop ``""``/``.``, ``..`` stops at the root (as runtimes do)."""
    parts: List[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        parts.append(comp)
    return parts


def _clamp_time(value: float) -> int:
    return min(max(int(value), 0), MAX_TIME)


class RootfsTree:
    """The final root filesystem of an image, built from tar headers only."""

    def __init__(self) -> None:
        self.root = _Dir(0o755, 0, 0, 0)
        self.files = _FileIndex()  # the layers' regular files (everything else is under root)
        self.layers: List[LayerBlob] = []
        self._gen = -1  # the layer being applied
        self._entries = 0  # of all layers so far (MAX_ENTRIES)
        self.notes: List[str] = []
        self.newest_mtime = 0
        # per layer being applied: the names it created in each directory (by path), and the
        # ancestors of those (for same-layer whiteout rules). Keyed by directory, not by whole path:
        # an entry then costs one set slot, not a tuple of its path (~20 MB a 100,000-file layer).
        self._touched: Dict[Tuple[str, ...], Set[str]] = {}
        self._touched_prefixes: Set[Tuple[str, ...]] = set()
        # the last parent directory an entry was put in: (its path as archived, _resolve_dir's result).
        # Entries of one directory mostly come in a row; adding entries cannot change how an existing
        # path resolves, so it stays valid until a node is replaced or removed (then it is dropped).
        self._last_parent: Optional[Tuple[List[str], Tuple[List[str], _Dir]]] = None

    def close(self) -> None:
        """Drop the file index (its temp file goes with it)."""
        self.files.close()

    def __enter__(self) -> "RootfsTree":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- path resolution inside the tree

    def _resolve_dir(self, parts: List[str], *, create: bool, mtime: int, blob: Optional[LayerBlob],
                     name: str) -> Optional[Tuple[List[str], _Dir]]:
        """Resolve a directory path, following symlinks inside the tree; ``None`` if missing and not ``create``."""
        stack: List[_Dir] = [self.root]
        names: List[str] = []
        todo = list(reversed(parts))
        followed = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if names:
                    stack.pop()
                    names.pop()
                continue
            cur = stack[-1]
            child = cur.children.get(comp)
            if child is None:
                if not create:
                    return None
                if self.files.get(cur.ident, comp) is not None:
                    if blob is None:
                        return None
                    raise _entry_error(blob, name, f"parent {'/'.join(names + [comp])!r} is not a directory")
                child = _Dir(0o755, 0, 0, mtime)
                cur.children[comp] = child
                self._mark(tuple(names) + (comp,))
            elif isinstance(child, _Symlink):
                followed += 1
                if followed > MAX_SYMLINKS:
                    if blob is None:
                        return None
                    raise _entry_error(blob, name, "too many levels of symbolic links")
                if child.target.startswith("/"):
                    del stack[1:]
                    names.clear()
                todo.extend(reversed(child.target.split("/")))
                continue
            elif not isinstance(child, _Dir):
                if not create or blob is None:
                    return None
                raise _entry_error(blob, name, f"parent {'/'.join(names + [comp])!r} is not a directory")
            stack.append(child)  # type: ignore[arg-type]
            names.append(comp)
        return names, stack[-1]

    def lookup(self, path: str, *, follow: bool = False) -> Optional[_Entry]:
        """The node at ``path``: parents resolved inside the tree, the last component followed if ``follow``."""
        todo = path.split("/")
        base: List[str] = []  # resolved directory the remaining path is relative to
        for _ in range(MAX_SYMLINKS + 1):
            comps = [c for c in todo if c not in ("", ".")]
            if not comps or comps[-1] == "..":
                res = self._resolve_dir(base + comps, create=False, mtime=0, blob=None, name=path)
                return res[1] if res else None
            res = self._resolve_dir(base + comps[:-1], create=False, mtime=0, blob=None, name=path)
            if res is None:
                return None
            names, parent = res
            node = parent.children.get(comps[-1])
            if node is None:
                found = self.files.get(parent.ident, comps[-1])
                return None if found is None else found[1]
            if not (follow and isinstance(node, _Symlink)):
                return node
            todo = node.target.split("/")
            base = [] if node.target.startswith("/") else names
        return None

    def _mark(self, path: Tuple[str, ...]) -> None:
        created = self._touched.get(path[:-1])
        if created is not None:  # its parent and their ancestors are marked already
            created.add(path[-1])
            return
        self._touched[path[:-1]] = {path[-1]}
        self._mark_parents(path[:-1])

    def _mark_parents(self, names: Sequence[str]) -> None:
        """Record that the directory ``names`` and its ancestors hold something this layer made
        (a file alone is marked only so: the file itself is marked by its row's ``gen``)."""
        for i in range(len(names), 0, -1):
            prefix = tuple(names[:i])
            if prefix in self._touched_prefixes:
                break
            self._touched_prefixes.add(prefix)

    def _hide_lower(self, directory: _Dir, path: Tuple[str, ...]) -> None:
        """Remove from ``directory`` everything not created by the layer being applied."""
        created = self._touched.get(path, ())
        self.files.delete_lower(directory.ident, self._gen)
        for name, child in list(directory.children.items()):
            p = path + (name,)
            if name in created or p in self._touched_prefixes:
                if isinstance(child, _Dir):
                    self._hide_lower(child, p)
                continue
            del directory.children[name]

    # ---- applying a layer

    def apply_layer(self, blob: LayerBlob, headers: Optional["LayerHeaders"] = None) -> None:
        """Pass 1 for one layer (call in order, lowest first): settle its entries in the tree.
        ``headers``: the layer's entries as another thread reads them (:class:`LayerHeaders`)."""
        index = self._gen = len(self.layers)
        self.layers.append(blob)
        self._touched, self._touched_prefixes = {}, set()
        self._last_parent = None
        skipped: List[str] = []
        if headers is None:
            for ordinal, member, _tf in iter_members(blob):
                self._apply_member(blob, index, ordinal, member, skipped)
        else:  # an error of the reader is raised where reading stopped, as if read right here
            for ordinal, member in enumerate(headers):
                self._apply_member(blob, index, ordinal, member, skipped)
        if skipped:
            shown = ", ".join(repr(s) for s in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            note = f"layer {blob.label}: skipped {len(skipped)} device node(s)/unsupported entries: {shown}"
            self.notes.append(note)
            log.info("%s", note)
        self._touched, self._touched_prefixes = {}, set()

    def _check_name(self, blob: LayerBlob, name: str) -> None:
        if "\0" in name:
            raise _entry_error(blob, name, "NUL byte in path")
        if len(name) > PATH_MAX:
            raise _entry_error(blob, name, f"path longer than {PATH_MAX}")

    def _apply_member(self, blob: LayerBlob, index: int, ordinal: int, m: tarfile.TarInfo, skipped: List[str]) -> None:
        name = m.name
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise _entry_error(blob, name, f"the image has more than {MAX_ENTRIES:,} entries")
        self._check_name(blob, name)
        parts = split_path(name)
        for comp in parts:
            if len(comp.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise _entry_error(blob, name, f"name component longer than {NAME_MAX} bytes")
        mtime = _clamp_time(m.mtime)
        if not parts:  # the root itself ("./"): only its time is kept; the root is always 0755 root:root
            if not m.isdir():
                raise _entry_error(blob, name, "non-directory entry for the root")
            self.root.mtime = mtime
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(blob, name, parts)
            return
        if not (0 <= m.uid < 2**32 and 0 <= m.gid < 2**32):
            raise _entry_error(blob, name, f"owner {m.uid}:{m.gid} out of range")
        mode = m.mode & 0o7777
        self.newest_mtime = max(self.newest_mtime, mtime)

        node: Optional[_Entry] = None
        row: Optional[Tuple[bytes, int, int, Optional[bytes]]] = None  # a layer file: meta, layer, ordinal, sparse
        if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None:
            self._check_sparse(blob, name, m)
        if m.isreg():
            if m.size < 0 or m.size > MAX_ENTRY_SIZE:
                raise _entry_error(blob, name, f"absurd size {m.size}")
            meta = _FILE_META.pack(mode, m.uid, m.gid, mtime, m.size, m.offset_data, index, ordinal)
            row = meta, index, ordinal, _sparse_blob(m.sparse)
        elif m.isdir():
            node = _Dir(mode, m.uid, m.gid, mtime)
        elif m.issym():
            if not m.linkname or "\0" in m.linkname or len(m.linkname) > PATH_MAX:
                raise _entry_error(blob, name, "invalid symlink target")
            node = _Symlink(0o777, m.uid, m.gid, mtime, m.linkname)
        elif m.islnk():
            self._check_name(blob, m.linkname)
            target = self.lookup(m.linkname)
            if target is None:
                raise _entry_error(blob, name, f"hard link to {m.linkname!r}, which is not in this or a lower layer")
            if isinstance(target, _Dir):
                raise _entry_error(blob, name, f"hard link to directory {m.linkname!r}")
            if isinstance(target, _Symlink):  # keep it simple: a hard-linked symlink becomes a copy
                node = _Symlink(target.mode, target.uid, target.gid, target.mtime, target.target)
            elif isinstance(target, _Fifo):  # likewise a hard-linked FIFO (a pipe has no data to share)
                node = _Fifo(target.mode, target.uid, target.gid, target.mtime)
            elif isinstance(target, _File) and target.data is None:  # a layer file: a row for the same inode
                row = target.packed(), target.layer, target.ordinal, _sparse_blob(target.sparse)
            else:
                node = target
                target.linked = True
        elif m.isfifo():
            node = _Fifo(mode, m.uid, m.gid, mtime)
        else:  # char/block devices, anything else: not created; a lower entry there is removed
            skipped.append(name)
            self._last_parent = None
            res = self._resolve_dir(parts[:-1], create=False, mtime=mtime, blob=blob, name=name)
            if res is not None:
                if res[1].children.pop(base, None) is None:
                    self.files.delete(res[1].ident, base)
            return

        dir_parts = parts[:-1]
        cached = self._last_parent
        if cached is not None and cached[0] == dir_parts:
            res = cached[1]
        else:
            res = self._resolve_dir(dir_parts, create=True, mtime=mtime, blob=blob, name=name)
            assert res is not None
            self._last_parent = (dir_parts, res)
        names, parent = res
        existing = parent.children.get(base)  # a name is either there or in self.files, never both
        if row is not None:
            if existing is not None:
                del parent.children[base]
                self._last_parent = None  # a replaced node may have been on the cached path
            self.files.put(parent.ident, base, index, *row)
            self._mark_parents(names)
            return
        assert node is not None
        if existing is None:
            self.files.delete(parent.ident, base)
        if isinstance(node, _Dir) and isinstance(existing, _Dir):
            existing.mode, existing.uid, existing.gid, existing.mtime = node.mode, node.uid, node.gid, node.mtime
        else:
            parent.children[base] = node
            if existing is not None:
                self._last_parent = None  # a replaced node may have been on the cached path
        self._mark(tuple(names) + (base,))

    @staticmethod
    def _check_sparse(blob: LayerBlob, name: str, m: tarfile.TarInfo) -> None:
        """Refuse a sparse map pass 2 could not stream: segments out of order, overlapping, past the
        real size, or not adding up to the data stored (the holes themselves cost no memory)."""
        stored = getattr(m, "sparse_data", None)
        if m.sparse is None or stored is None or not m.isreg():
            raise _entry_error(blob, name, "sparse map on an entry that is not a regular file")
        if not 0 <= m.size <= MAX_ENTRY_SIZE:
            raise _entry_error(blob, name, f"absurd size {m.size}")
        end = total = 0
        for offset, length in m.sparse:
            if offset < end:
                raise _entry_error(blob, name, "malformed sparse map: segments overlap or are out of order")
            end = offset + length
            if end > m.size:
                raise _entry_error(blob, name, f"malformed sparse map: segment ends at {end}, past the size {m.size}")
            total += length
        if total != stored:
            raise _entry_error(blob, name, f"malformed sparse map: it maps {total} bytes, the entry stores {stored}")

    def _whiteout(self, blob: LayerBlob, name: str, parts: List[str]) -> None:
        self._last_parent = None  # what it removes may have been on the cached path
        base = parts[-1]
        victim = base[len(WHITEOUT_PREFIX):]
        if victim in ("", ".", ".."):
            raise _entry_error(blob, name, "whiteout of an invalid name")
        if victim.startswith(WHITEOUT_PREFIX) and base != OPAQUE_MARKER:
            return  # other AUFS metadata (.wh..wh.plnk ...): ignored
        res = self._resolve_dir(parts[:-1], create=False, mtime=0, blob=blob, name=name)
        if res is None:
            return  # nothing below to hide
        names, parent = res
        if base == OPAQUE_MARKER:
            self._hide_lower(parent, tuple(names))
            return
        child = parent.children.get(victim)
        if child is None:
            found = self.files.get(parent.ident, victim)
            if found is not None and found[0] != self._gen:  # a file of this same layer stays
                self.files.delete(parent.ident, victim)
            return
        path = tuple(names) + (victim,)
        if victim in self._touched.get(path[:-1], ()) or path in self._touched_prefixes:
            # created by this same layer: only what lower layers had there goes
            if isinstance(child, _Dir):
                self._hide_lower(child, path)
            return
        del parent.children[victim]

    # ---- Apptainer's additions

    def add_extras(self, extras: Mapping[str, ExtraEntry], mtime: int) -> None:
        """Add generated entries (after all layers). They replace what is there unless ``only_if_absent``."""
        index = self._gen = len(self.layers)
        self._touched, self._touched_prefixes = {}, set()
        self._last_parent = None
        mtime = _clamp_time(mtime)
        for path, e in extras.items():
            parts = split_path(path)
            if not parts:
                continue
            if e.only_if_absent and self.lookup(path, follow=True) is not None:
                continue
            res = self._resolve_dir(parts[:-1], create=True, mtime=mtime, blob=LayerBlob(Path(path), "", "generated"),
                                    name=path)
            assert res is not None
            parent = res[1]
            node: _Entry
            if e.kind == "dir":
                node = _Dir(e.mode, 0, 0, mtime)
            elif e.kind == "symlink":
                node = _Symlink(0o777, 0, 0, mtime, e.data.decode())
            else:
                node = _File(e.mode, 0, 0, mtime, len(e.data), 0, index, -1, data=e.data)
            existing = parent.children.get(parts[-1])
            if isinstance(node, _Dir) and isinstance(existing, _Dir):
                continue  # keep the image's own directory
            if existing is None:
                self.files.delete(parent.ident, parts[-1])
            parent.children[parts[-1]] = node

    # ---- walking the result

    def plan(self) -> "Plan":
        """The final tree in writing order. Directories, symlinks and FIFOs are listed; the layers'
        files are read from the index as they are written, so the plan holds a path per directory
        and nothing per file."""
        plan = Plan(self.files)
        links, generated, dir_paths = plan.links, plan.generated, plan.dir_paths
        stack: List[Tuple[str, _Dir]] = [("", self.root)]
        while stack:
            prefix, d = stack.pop()
            dir_paths[d.ident] = (len(dir_paths), prefix)
            subdirs = []
            for name in sorted(d.children):
                node = d.children[name]
                if isinstance(node, _File):  # generated (layer files are in self.files)
                    if node.linked:
                        names = links.get(id(node))
                        if names is not None:
                            names.append(prefix + name)
                            continue
                        names = links[id(node)] = [prefix + name]
                    else:
                        names = [prefix + name]
                    generated.append((node, names))
                    continue
                path = prefix + name
                if isinstance(node, _Dir):
                    plan.dirs.append((path, node))
                    subdirs.append((path + "/", node))
                elif isinstance(node, _Symlink):
                    plan.symlinks.append((path, node))
                else:
                    assert isinstance(node, _Fifo)
                    plan.fifos.append((path, node))
            stack.extend(reversed(subdirs))
        plan.root_mtime = self.root.mtime or self.newest_mtime
        return plan


def _in_walk_order(names: List[Tuple[int, str]]) -> List[str]:
    if len(names) > 1:
        names.sort()
    return [path for _, path in names]


@dataclass
class Plan:
    """The final tree in writing order: directories (parents first), symlinks, FIFOs, file inodes by source.

    ``dir_paths``: each directory still in the tree (by id) -> its place in the walk and its path
    with a trailing "/" (or ""); the index's rows under any other directory were removed with it.
    ``generated``: Apptainer's files, each with every name (``links``: by identity)."""

    files: _FileIndex
    dirs: List[Tuple[str, _Dir]] = field(default_factory=list)
    symlinks: List[Tuple[str, _Symlink]] = field(default_factory=list)
    fifos: List[Tuple[str, _Fifo]] = field(default_factory=list)
    dir_paths: Dict[int, Tuple[int, str]] = field(default_factory=dict)
    links: Dict[int, List[str]] = field(default_factory=dict)
    generated: List[Tuple[_File, List[str]]] = field(default_factory=list)
    root_mtime: int = 0

    def layer_inodes(self) -> Iterator[Tuple[_File, List[str]]]:
        """Every layer file inode still in the tree with all its names, layer by layer in the order
        of the layer's stream; a hard link's names in walk order, the first one to carry the data."""
        paths = self.dir_paths
        node: Optional[_File] = None
        names: List[Tuple[int, str]] = []  # (walk position, path) of the inode's names
        for layer, ordinal, directory, name, meta, sparse in self.files.rows():
            where = paths.get(directory)
            if where is None:
                continue
            path = where[1] + name.decode("utf-8", "surrogateescape")
            if node is not None and node.ordinal == ordinal and node.layer == layer:
                names.append((where[0], path))
                continue
            if node is not None:
                yield node, _in_walk_order(names)
            node, names = _file_from_row(meta, sparse), [(where[0], path)]
        if node is not None:
            yield node, _in_walk_order(names)

    def inodes(self) -> Iterator[Tuple[_File, List[str]]]:
        """Every file inode with its names: layer by layer in stream order, then the generated ones."""
        yield from self.layer_inodes()
        yield from self.generated


HEADER_READERS = 2  # layers whose headers are read at once, ahead of the merge
READ_AHEAD = 4  # layers read ahead and not yet merged, at most
HEADER_CHUNK = 256  # headers a reader hands to the merge at once
HEADER_CHUNKS = 8  # chunks a reader may hold before it waits for the merge to take them


class LayerHeaders:
    """A layer's tar entries, read in a worker thread and handed to the merge in order, in chunks.

    Why chunks and not the whole layer: a reader more than ``HEADER_CHUNKS`` chunks ahead of the
    merge waits, so read-ahead holds at most ``READ_AHEAD * HEADER_CHUNK * HEADER_CHUNKS`` headers
    whatever a layer holds (TarInfos are large: one 100,000-file layer read ahead whole peaked 50-200
    MB higher than ten layers of 10,000). Whatever stopped the reading (a LayerError,
    or anything else) is handed over last, so the merge raises it where it gets there."""

    def __init__(self) -> None:
        import queue
        import threading

        self._queue: "queue.Queue[object]" = queue.Queue(HEADER_CHUNKS)
        self._full = queue.Full
        self._cancelled = threading.Event()
        self._finished = False

    def read(self, blob: LayerBlob) -> None:
        """Read every entry's header (the data is decompressed and skipped); runs in a worker thread."""
        chunk: List[tarfile.TarInfo] = []
        end: Optional[BaseException] = None
        try:
            for _ordinal, member, _tf in iter_members(blob):
                chunk.append(member)
                if len(chunk) == HEADER_CHUNK:
                    if not self._put(chunk):
                        return
                    chunk = []
        except BaseException as exc:  # handed to the merge thread, which raises it in its turn
            end = exc
        if self._put(chunk) and self._put(end):
            self._finished = True

    def _put(self, item: object) -> bool:
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except self._full:
                continue
        return False

    def ready(self) -> bool:
        """Whether the merge can take this layer without waiting for more than the reader's next chunk."""
        return self._finished or self._queue.full()

    def cancel(self) -> None:
        """Stop the reader at its next hand-over (the merge has failed)."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while True:
            item = self._queue.get()
            if isinstance(item, list):
                yield from item
            elif item is None:
                return
            else:
                assert isinstance(item, BaseException)
                raise item


def build_tree(layers: Iterable[LayerBlob], extras: Optional[Mapping[str, ExtraEntry]] = None,
               extras_mtime: Optional[int] = None) -> RootfsTree:
    """Pass 1 over all layers (lowest first), then the generated entries.

    ``layers`` may be lazy (the puller yields each layer once it is downloaded and verified). Each
    layer's headers are read in a worker thread as soon as it arrives, while later layers still
    download and earlier ones are merged; inflating, most of the work, runs without the GIL. The
    merge itself applies the layers strictly in order in this thread, with the same errors, in the
    same order, as reading them here would give. (A layer's reader always runs by the time the
    merge waits for it: the pool starts readers in layer order and every earlier one is done.)"""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    tree = RootfsTree()
    ahead: "deque[Tuple[LayerBlob, LayerHeaders]]" = deque()
    readers: List[LayerHeaders] = []
    pool = ThreadPoolExecutor(max_workers=HEADER_READERS, thread_name_prefix="layer-headers")
    try:
        for blob in layers:
            headers = LayerHeaders()
            readers.append(headers)
            pool.submit(headers.read, blob)
            ahead.append((blob, headers))
            while ahead and (ahead[0][1].ready() or len(ahead) >= READ_AHEAD):
                tree.apply_layer(*ahead.popleft())
        while ahead:
            tree.apply_layer(*ahead.popleft())
    except BaseException:
        for headers in readers:
            headers.cancel()
        pool.shutdown(wait=False, cancel_futures=True)  # a layer being read is not waited for
        tree.close()
        raise
    pool.shutdown(wait=True)
    if extras:
        try:
            tree.add_extras(extras, tree.newest_mtime if extras_mtime is None else extras_mtime)
        except BaseException:
            tree.close()
            raise
    return tree


# --------------------------------------------------------------------------------------------
# pass 2: file data


_Data = Union[IO[bytes], "_SparseReader", bytes]  # a file's data: a reader, or the bytes themselves


def _iter_file_data(tree: RootfsTree, plan: Plan) -> Iterator[Tuple[_File, List[str], _Data]]:
    """Yield each surviving file inode with its names and a reader of its data, layer by layer.

    Pass 1 recorded where each file's data starts in its layer's uncompressed stream, so this only
    decompresses and skips forward: no tar header is parsed twice. The offsets are trusted because
    the blob is the one pass 1 read (verified against its digest when it was fetched, then never
    written again); a stream that ends early is still reported as truncated."""
    inodes = plan.layer_inodes()
    item = next(inodes, None)
    while item is not None:
        index = item[0].layer
        blob = tree.layers[index]
        try:
            with open_layer(blob) as stream:
                src = stream if isinstance(stream, io.BufferedReader) else _Sequential(stream)  # as pass 1 read it
                while item is not None and item[0].layer == index:
                    node, names = item
                    if src.seek(node.offset) != node.offset:
                        raise LayerError(f"layer {blob.label}: ended before all its entries were read (truncated?)")
                    if node.sparse is not None:
                        yield node, names, _SparseReader(src, node.offset, node.sparse, node.size)
                    else:
                        yield node, names, src
                    item = next(inodes, None)
        except _READ_ERRORS as exc:
            raise LayerError(f"layer {blob.label}: unreadable: {exc}") from None
    for node, names in plan.generated:
        yield node, names, node.data or b""


class _SparseReader:
    """A sparse member's data as the file it stands for: holes read as zeros.

    tarfile's own reader of sparse members joins every segment of a read into one bytes object and
    scans its map from the start when it loses its place; this one returns at most one segment (or
    one hole) per read, so memory stays at the caller's chunk size whatever the map, and it only
    moves forward through the layer stream (which cannot seek back)."""

    def __init__(self, fileobj: IO[bytes], offset_data: int, segments: List[Tuple[int, int]], size: int):
        self._f = fileobj
        self._raw = offset_data  # where the next stored byte is in the layer stream
        self._map = segments
        self._segments = iter(segments)
        self._segment: Optional[Tuple[int, int]] = next(self._segments, None)
        self._pos = 0
        self._size = size

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        while self._segment is not None and self._pos >= sum(self._segment):
            self._segment = next(self._segments, None)
        if self._segment is None or self._pos < self._segment[0]:
            hole_end = self._segment[0] if self._segment is not None else self._size
            count = min(n, hole_end - self._pos)
            self._pos += count
            return bytes(count)
        count = min(n, sum(self._segment) - self._pos)
        self._f.seek(self._raw)
        data = self._f.read(count)
        if len(data) != count:
            raise tarfile.ReadError("unexpected end of data")
        self._raw += count
        self._pos += count
        return data

    def write_holes_kept(self, fd: int, write: Callable[[bytes], object], blob_label: str, name: str) -> None:
        """Write the file into the fresh file ``fd`` with ``write``, seeking over the holes instead of
        writing zeros (a rootfs directory on disk then takes the space of the data only)."""
        for offset, length in self._map:
            self._pos = offset  # only forward: the map was checked to be ordered
            os.lseek(fd, offset, os.SEEK_SET)
            _copy_exact(self, length, write, blob_label, name)
        os.ftruncate(fd, self._size)
        self._pos = self._size


def _copy_exact(reader: _Data, size: int, write, blob_label: str, name: str) -> None:
    """Copy exactly ``size`` bytes; read problems are the layer's fault (LayerError), write problems are not."""
    if isinstance(reader, bytes):
        write(reader)
        return
    left = size
    while left:
        try:
            chunk = reader.read(min(left, COPY_CHUNK))
        except _READ_ERRORS as exc:
            raise LayerError(f"layer {blob_label}: entry {name!r}: unreadable data: {exc}") from None
        if not chunk:
            raise LayerError(f"layer {blob_label}: entry {name!r}: data truncated ({size - left} of {size} bytes)")
        write(chunk)
        left -= len(chunk)


def _label(tree: RootfsTree, node: _File) -> str:
    return tree.layers[node.layer].label if node.data is None else "generated"


# ---- writer (b): one merged tar stream


def _tarinfo(path: str, node: _Entry, kind: bytes, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.type = kind
    ti.mode = node.mode
    ti.uid, ti.gid = node.uid, node.gid
    ti.uname = ti.gname = ""
    ti.mtime = node.mtime
    ti.linkname = linkname
    ti.size = size
    return ti


def _header(ti: tarfile.TarInfo) -> bytes:
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_USTAR_TAIL = b"ustar\x0000" + b"\0" * 247  # magic, version; no owner names, device numbers or prefix
_OCTAL_MAX_7, _OCTAL_MAX_11 = 8 ** 7, 8 ** 11


def _fast_header(path: str, node: _Entry, kind: bytes, linkname: str = "", size: int = 0) -> bytes:
    """``_header(_tarinfo(...))`` without building a TarInfo, for the common entry that fits a
    plain ustar header (ASCII names of at most 100 bytes, numbers that fit their octal fields);
    anything else goes through tarfile's pax writer. Byte-identical to tarfile's output
    (tests/test_layers.py): a 2 GB image has tens of thousands of files, and tarfile took ~35 us
    per header."""
    name = path + "/" if kind == tarfile.DIRTYPE and not path.endswith("/") else path  # as tarfile does
    mode, uid, gid, mtime = node.mode, node.uid, node.gid, node.mtime
    if (len(name) > 100 or len(linkname) > 100 or not path.isascii() or not linkname.isascii()
            or not (uid < _OCTAL_MAX_7 and gid < _OCTAL_MAX_7 and size < _OCTAL_MAX_11
                    and 0 <= mtime < _OCTAL_MAX_11)):
        return _header(_tarinfo(path, node, kind, linkname=linkname, size=size))
    block = b"".join((
        name.encode().ljust(100, b"\0"),
        b"%07o\0%07o\0%07o\0%011o\0%011o\0        " % (mode & 0o7777, uid, gid, size, mtime),
        kind,
        linkname.encode().ljust(100, b"\0"),
        _USTAR_TAIL,
    ))
    chksum = header_checksum(block)
    return block[:148] + b"%06o\0" % chksum + block[155:]


def _symlink_header(path: str, node: _Symlink) -> bytes:
    """The header(s) of a symlink whose target ``mksquashfs -tar`` must store byte for byte.

    A target that fits the 100-byte ustar field as ASCII goes there. Any other would travel as a pax
    ``linkpath`` record, from which mksquashfs 4.5.1 strips a leading ``/``, ``./`` or ``../``
    (``/usr/share/x.crt`` became ``usr/share/x.crt``: a dangling link in the image); it keeps a GNU
    long-link (``K``) record verbatim, so such targets are sent as one, before a pax header that
    carries no link name. (Paths and hard-link names need no such care: they are written already
    clean, with no leading ``/``, ``.`` or ``..`` component, which is all mksquashfs strips.)
    """
    target = node.target.encode("utf-8", "surrogateescape")
    if len(target) < tarfile.LENGTH_LINK and target.isascii():
        return _fast_header(path, node, tarfile.SYMTYPE, linkname=node.target)
    longlink = tarfile.TarInfo("././@LongLink")
    longlink.type = tarfile.GNUTYPE_LONGLINK
    longlink.size = len(target) + 1
    data = target + b"\0"
    record = longlink.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return record + _header(_tarinfo(path, node, tarfile.SYMTYPE))


def write_merged_tar(tree: RootfsTree, out: BinaryIO) -> None:
    """Write the final tree as one tar stream (directories first, then symlinks, then file data).

    Give ``out`` a large buffer (the mksquashfs pipe has 1 MiB): headers and small files are then
    gathered into large writes instead of a few syscalls per file."""
    plan = tree.plan()
    write = out.write
    for path, d in plan.dirs:
        write(_fast_header(path, d, tarfile.DIRTYPE))
    for path, s in plan.symlinks:
        write(_symlink_header(path, s))
    for path, f in plan.fifos:
        write(_fast_header(path, f, tarfile.FIFOTYPE))
    zeros = bytes(tarfile.BLOCKSIZE)
    for node, names, reader in _iter_file_data(tree, plan):
        write(_fast_header(names[0], node, tarfile.REGTYPE, size=node.size))
        _copy_exact(reader, node.size, write, _label(tree, node), names[0])
        pad = -node.size % tarfile.BLOCKSIZE
        if pad:
            write(zeros[:pad])
        for other in names[1:]:
            write(_fast_header(other, node, tarfile.LNKTYPE, linkname=names[0]))
    write(b"\0" * (2 * tarfile.BLOCKSIZE))


# ---- writer (a): a directory


@dataclass
class DirResult:
    """What :func:`write_rootfs_dir` could not express on disk: ``path -> (mode, uid, gid)`` fix-ups."""

    fixups: Dict[str, Tuple[int, int, int]] = field(default_factory=dict)


def _readable_mode(mode: int, is_dir: bool) -> int:
    """``mode`` plus what the owner needs so mksquashfs can read the entry (read, and search for directories)."""
    return mode | (0o500 if is_dir else 0o400)


def write_rootfs_dir(tree: RootfsTree, root: Path, *, chown: bool) -> DirResult:
    """Write the final tree into the empty directory ``root``.

    Entries whose mode would keep ``mksquashfs`` from reading them as a normal user (files without
    owner read, directories without owner read+search) are written readable and returned as fix-ups
    for a pseudo file. With ``chown`` (root only) owners are set; otherwise files belong to the caller.
    """
    root = Path(root)
    if any(root.iterdir()):
        raise LayerError(f"rootfs directory {root} is not empty")
    result = DirResult()
    plan = tree.plan()
    rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for path, _d in plan.dirs:
            os.mkdir(path, 0o700, dir_fd=rootfd)
        for path, s in plan.symlinks:
            os.symlink(s.target, path, dir_fd=rootfd)
            if chown:
                os.chown(path, s.uid, s.gid, dir_fd=rootfd, follow_symlinks=False)
            os.utime(path, (s.mtime, s.mtime), dir_fd=rootfd, follow_symlinks=False)
        for path, f in plan.fifos:  # mksquashfs only stats a FIFO: its mode needs no fix-up
            os.mkfifo(path, 0o600, dir_fd=rootfd)
            if chown:
                os.chown(path, f.uid, f.gid, dir_fd=rootfd, follow_symlinks=False)
            os.chmod(path, f.mode, dir_fd=rootfd)  # a FIFO we just made, under directories we made
            os.utime(path, (f.mtime, f.mtime), dir_fd=rootfd, follow_symlinks=False)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for node, names, reader in _iter_file_data(tree, plan):
            fd = os.open(names[0], flags, 0o600, dir_fd=rootfd)
            try:
                with open(fd, "wb", buffering=0, closefd=False) as fh:
                    if isinstance(reader, _SparseReader):
                        reader.write_holes_kept(fd, fh.write, _label(tree, node), names[0])
                    else:
                        _copy_exact(reader, node.size, fh.write, _label(tree, node), names[0])
                if chown:
                    os.fchown(fd, node.uid, node.gid)  # before chmod: chown clears setuid/setgid
                mode = _readable_mode(node.mode, False)
                os.fchmod(fd, mode)
                os.utime(fd, (node.mtime, node.mtime))
            finally:
                os.close(fd)
            if mode != node.mode:
                result.fixups[names[0]] = (node.mode, node.uid, node.gid)
            for other in names[1:]:
                os.link(names[0], other, src_dir_fd=rootfd, dst_dir_fd=rootfd, follow_symlinks=False)
        for path, d in reversed(plan.dirs):  # deepest first: setting a mode may forbid writing below
            if chown:
                os.chown(path, d.uid, d.gid, dir_fd=rootfd, follow_symlinks=False)
            mode = _readable_mode(d.mode, True)
            os.chmod(path, mode, dir_fd=rootfd, follow_symlinks=True)  # a real directory we made
            os.utime(path, (d.mtime, d.mtime), dir_fd=rootfd, follow_symlinks=False)
            if mode != d.mode:
                result.fixups[path] = (d.mode, d.uid, d.gid)
        os.fchmod(rootfd, 0o755)
        if chown:
            os.fchown(rootfd, 0, 0)
        os.utime(rootfd, (plan.root_mtime, plan.root_mtime))
    finally:
        os.close(rootfd)
    return result


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


__all__ = [
    "LayerBlob",
    "RootfsTree",
    "Plan",
    "build_tree",
    "detect_compression",
    "open_layer",
    "iter_members",
    "split_path",
    "write_merged_tar",
    "write_rootfs_dir",
]
