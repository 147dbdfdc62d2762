"""Write a merged tree as a squashfs 4.0 image, with memory that does not grow with the file count.

Why not mksquashfs here: ``mksquashfs -tar`` keeps every inode, directory entry and duplicate-check
record in memory until it writes its tables at the end, about 0.7 KB a file whatever ``-mem`` says
(95 MB for a 2.5 GB image of 52,000 files, growing with every file; squashfs-tools-ng's tar2sqfs
keeps ~0.25 KB). The merge already holds every file as a row of an on-disk index
(:class:`shpc_lite.pull.layers._FileIndex`), so this writer puts what it learns per file there too
and keeps only bounded buffers in memory. ``mksquashfs`` stays the path for compressors other than
zstd and gzip (methods ``"tar"`` and ``"dir"`` in :mod:`.squashfs`).

The format is the one the Linux kernel (``fs/squashfs``), squashfuse and unsquashfs read::

    superblock (96 bytes) | data and fragment blocks | inode table | directory table
    | fragment table (metadata blocks, then their index) | id table (metadata blocks, then index)

Two passes over the merged tree:

1. Data, in the order the layers stream it (``layers._iter_file_data``): each file of at least a
   block is cut into 128 KiB blocks, compressed by a thread per core, 8 blocks to a task (zlib
   and zstd release the GIL), put back in order and written by a thread of its own; smaller files
   are packed into shared fragment blocks. All-zero blocks are stored as holes (size 0), as
   mksquashfs does. Per inode, the block sizes and fragment place go into a table beside the
   file index.
2. Metadata, directories depth first, children before parents: a directory's listing needs each
   child's inode reference (metadata block and offset), and its own inode needs where the listing
   went. Inodes and listings are written as they are made into compressed 8 KiB metadata blocks
   spooled to temp files, then copied after the data. Directories get inode numbers first (a
   directory inode names its parent's), everything else as it is written.

No duplicate-file detection (mksquashfs's costs memory per file; images are larger by what their
identical files take), no extended attributes (the merge keeps none), no NFS export table.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import io
import os
import queue
import shutil
import struct
import tempfile
import threading
import zlib
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from ..errors import PullError
from .layers import (
    Plan, RootfsTree, _Data, _Dir, _Entry, _Fifo, _File, _FILE_META, _Symlink, _label, _name_key, _copy_exact,
    _iter_file_data, index_errors,
)

BLOCK_LOG = 17
BLOCK_SIZE = 1 << BLOCK_LOG  # mksquashfs's default
METADATA_SIZE = 8192  # a metadata block before compression
SUPERBLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")
MAGIC = 0x73717368
NO_XATTRS = 0x0200  # superblock flag
INVALID_TABLE = 0xFFFFFFFFFFFFFFFF
NO_FRAGMENT = 0xFFFFFFFF
NO_XATTR = 0xFFFFFFFF
UNCOMPRESSED_DATA = 1 << 24  # in a data block's or fragment's size word
UNCOMPRESSED_META = 1 << 15  # in a metadata block's header
DIR_RUN = 256  # entries under one directory header, at most
MAX_IDS = 1 << 16  # distinct owners and groups (an inode stores their index as 16 bits)
PAD = 4096  # the image is padded to a multiple of this, as mksquashfs does

# inode types (a directory entry stores the basic type even for an extended inode)
DIR, REG, SYMLINK, FIFO = 1, 2, 3, 6
LDIR, LREG = 8, 9

COMPRESSION_IDS = {"gzip": 1, "zstd": 6}

_HEADER = struct.Struct("<HHHHII")  # type, mode, uid index, gid index, mtime, inode number
_BASIC_FILE = struct.Struct("<IIII")  # blocks start, fragment, offset in it, size
_LONG_FILE = struct.Struct("<QQQIIII")  # blocks start, size, sparse bytes, nlink, fragment, offset, xattr
_BASIC_DIR = struct.Struct("<IIHHI")  # listing block, nlink, size + 3, listing offset, parent
_LONG_DIR = struct.Struct("<IIIIHHI")  # nlink, size + 3, listing block, parent, index count, offset, xattr
_DIR_HEADER = struct.Struct("<III")  # entries - 1, inode block, base inode number
_DIR_ENTRY = struct.Struct("<HhHH")  # inode offset, number - base, type, name length - 1
_DIR_INDEX = struct.Struct("<III")  # header's place in the listing, its metadata block, first name's length - 1
_FRAGMENT = struct.Struct("<QII")  # start, size word, unused
_ZERO_BLOCK = bytes(BLOCK_SIZE)
# blocks a compressing thread takes at once: 8 (1 MiB) made the data pass of the bench's 2.5 GB
# image ~1 s faster than 1 (fewer hand-overs between threads, each needing the GIL)
BLOCKS_PER_TASK = 8
MAX_TASKS_AHEAD = 16  # tasks compressed ahead of the writing, at most (memory: 1 MiB each)


def supports(compression: str) -> bool:
    """Whether this writer can compress with ``compression`` (others need mksquashfs)."""
    return compression in COMPRESSION_IDS


def compressor(compression: str, level: int) -> Callable[[bytes], bytes]:
    """A thread-safe ``bytes -> bytes`` compressor in squashfs's framing: a zlib stream for gzip
    (the kernel inflates with zlib headers), one zstd frame for zstd."""
    if compression == "gzip":
        return lambda data: zlib.compress(data, level)
    if compression == "zstd":
        import zstandard

        local = threading.local()  # a ZstdCompressor is not safe to share between threads

        def compress(data: bytes) -> bytes:
            cctx = getattr(local, "cctx", None)
            if cctx is None:
                cctx = local.cctx = zstandard.ZstdCompressor(level=level)
            return cctx.compress(data)
        return compress
    raise PullError(f"the native squashfs writer cannot compress with {compression} (use gzip or zstd)")


class _MetadataTable:
    """A table of metadata blocks (inodes, listings, fragment entries, ids), spooled to a temp file.

    A reference to what is added next is ``block start << 16 | offset``: where its metadata block
    starts, counted from the table's start, and where it is in that block once inflated."""

    def __init__(self, compress: Callable[[bytes], bytes], spool: BinaryIO):
        self._compress = compress
        self._spool = spool
        self._buf = bytearray()
        self.length = 0  # bytes written to the spool
        self.block_starts: List[int] = []  # of each metadata block (the fragment and id tables index them)

    def ref(self) -> int:
        return self.length << 16 | len(self._buf)

    @property
    def pending(self) -> int:
        """Bytes of the metadata block being filled."""
        return len(self._buf)

    def add(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= METADATA_SIZE:
            self._emit(bytes(self._buf[:METADATA_SIZE]))
            del self._buf[:METADATA_SIZE]

    def _emit(self, block: bytes) -> None:
        packed = self._compress(block)
        header = len(packed)
        if header >= len(block):
            packed, header = block, len(block) | UNCOMPRESSED_META
        self.block_starts.append(self.length)
        self._spool.write(struct.pack("<H", header))
        self._spool.write(packed)
        self.length += 2 + len(packed)

    def finish(self) -> None:
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()

    def copy_to(self, out: BinaryIO, at: int) -> int:
        """Append the table's blocks to ``out``, where the image is at ``at``; returns where it ends."""
        self.finish()
        self._spool.flush()
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, out, 1 << 20)
        return at + self.length

    def write_index(self, out: BinaryIO, blocks_at: int, at: int) -> int:
        """Append the index of the table's blocks (copied to ``blocks_at``), as the fragment and id
        tables have; returns where it ends."""
        out.write(b"".join(struct.pack("<Q", blocks_at + start) for start in self.block_starts))
        return at + 8 * len(self.block_starts)


class _Ids:
    """Owner and group numbers -> their index in the id table."""

    def __init__(self) -> None:
        self.order: Dict[int, int] = {}

    def index(self, value: int) -> int:
        found = self.order.get(value)
        if found is None:
            if len(self.order) >= MAX_IDS:
                raise PullError(f"the image has more than {MAX_IDS} distinct owners and groups (squashfs's limit)")
            found = self.order[value] = len(self.order)
        return found


class _Stored:
    """Where one file inode's data went: its first block, each block's size word, its fragment.
    ``key``: the inode's identity in the file index (layer, ordinal, number of names), or None for
    a generated file."""

    __slots__ = ("key", "start", "sizes", "fragment", "offset", "sparse", "blocks_left")

    def __init__(self, key: Optional[Tuple[int, int, int]] = None) -> None:
        self.key = key
        self.start = 0
        self.sizes = array("I")
        self.fragment, self.offset = NO_FRAGMENT, 0
        self.sparse = 0  # bytes of all-zero blocks stored as holes
        self.blocks_left = 0

    def packed(self) -> bytes:
        return _STORED.pack(self.start, self.fragment, self.offset, self.sparse) + self.sizes.tobytes()

    @classmethod
    def unpack(cls, data: bytes) -> "_Stored":
        s = cls()
        s.start, s.fragment, s.offset, s.sparse = _STORED.unpack_from(data)
        s.sizes.frombytes(data[_STORED.size:])
        return s


_STORED = struct.Struct("<QIIQ")  # a _Stored as the index keeps it, before its block sizes


class _BackgroundWriter:
    """Writes to ``out`` in a thread of its own, so the thread that puts the blocks in order does
    not wait on the page cache (in line, writing 1.4 GB took ~3 s of a 14 s data pass; mksquashfs
    has a writer thread too). At most ``depth`` writes wait. A failed write is raised by the next
    :meth:`write` or by :meth:`close`."""

    def __init__(self, out: BinaryIO, depth: int = 32):
        self._out = out
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="squashfs-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is None:  # after a failure, only drain the queue
                try:
                    self._out.write(data)
                except BaseException as exc:
                    self._error = exc

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self) -> None:
        """Wait for every write; raise the first one that failed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


class _DataWriter:
    """Data and fragment blocks, compressed by a pool of threads and written in submission order.
    ``placed`` is called with each file's :class:`_Stored` once all its data has a place."""

    def __init__(self, out: BinaryIO, compress: Callable[[bytes], bytes], workers: int, fragments: _MetadataTable,
                 placed: Callable[[_Stored], None]):
        self._out = _BackgroundWriter(out)
        self._compress_one = compress
        self._placed = placed
        self.position = SUPERBLOCK.size  # from the image's start
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="squashfs")
        self._queue: Deque[Tuple[Future, Callable[[int, int], None]]] = deque()
        self._in_flight = min(2 * workers, MAX_TASKS_AHEAD)  # tasks (2 per thread kept each of them busy)
        self._fragment = bytearray()
        self.fragment_count = 0
        self._fragments = fragments

    def _compress(self, blocks: List[bytes]) -> List[Tuple[bytes, int]]:
        """Each block compressed (kept as is when that does not make it smaller), with its size
        word; an all-zero block becomes a hole: no bytes, size 0."""
        out = []
        for block in blocks:
            if block == _ZERO_BLOCK:
                out.append((b"", 0))
                continue
            packed = self._compress_one(block)
            out.append((block, len(block) | UNCOMPRESSED_DATA) if len(packed) >= len(block) else (packed, len(packed)))
        return out

    def _submit(self, blocks: List[bytes], then: Callable[[int, int], None]) -> None:
        """Queue consecutive blocks (one task: fewer hand-overs between threads); ``then(position,
        size word)`` for each once it is written."""
        self._queue.append((self._pool.submit(self._compress, blocks), then))
        self._drain(self._in_flight)

    def _drain(self, keep: int) -> None:
        queue = self._queue
        while queue and (len(queue) > keep or queue[0][0].done()):
            future, then = queue.popleft()
            for packed, word in future.result():
                if packed:
                    self._out.write(packed)
                then(self.position, word)
                self.position += len(packed)

    def file(self, stored: _Stored, reader: _Data, size: int, label: str, name: str) -> None:
        """Queue the data of one file: a file smaller than a block goes into a fragment."""
        if isinstance(reader, bytes):
            reader = io.BytesIO(reader)
        if 0 < size < BLOCK_SIZE:
            data = _read_exact(reader, size, label, name)
            if len(self._fragment) + size > BLOCK_SIZE:
                self._flush_fragment()
            stored.fragment, stored.offset = self.fragment_count, len(self._fragment)
            self._fragment += data
            self._placed(stored)
            return
        stored.blocks_left = blocks = -(-size // BLOCK_SIZE)
        if not blocks:
            self._placed(stored)
            return
        then = functools.partial(self._block_placed, stored)
        group: List[bytes] = []
        for i in range(blocks):
            group.append(_read_exact(reader, min(BLOCK_SIZE, size - i * BLOCK_SIZE), label, name))
            if len(group) == BLOCKS_PER_TASK or i == blocks - 1:
                self._submit(group, then)
                group = []

    def _block_placed(self, stored: _Stored, position: int, word: int) -> None:
        if not stored.sizes:
            stored.start = position
        if not word:
            stored.sparse += BLOCK_SIZE
        stored.sizes.append(word)
        stored.blocks_left -= 1
        if not stored.blocks_left:
            self._placed(stored)

    def _flush_fragment(self) -> None:
        if self._fragment:
            self._submit([bytes(self._fragment)], self._fragment_placed)
            self._fragment.clear()
            self.fragment_count += 1

    def _fragment_placed(self, position: int, word: int) -> None:
        self._fragments.add(_FRAGMENT.pack(position, word, 0))  # in order: entry i is fragment i

    def finish(self) -> None:
        self._flush_fragment()
        self._drain(0)
        self._out.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(BaseException):  # the error that brought us here is the one to report
            self._out.close()


def _read_exact(reader: _Data, size: int, label: str, name: str) -> bytes:
    """Exactly ``size`` bytes of a file's data (a short read is the layer's fault: LayerError)."""
    parts: List[bytes] = []
    _copy_exact(reader, size, parts.append, label, name)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --------------------------------------------------------------------------------------------


class _Inode:
    """What a directory entry needs of a written inode."""

    __slots__ = ("ref", "number", "kind")

    def __init__(self, ref: int, number: int, kind: int):
        self.ref, self.number, self.kind = ref, number, kind


class _Listing:
    """One directory's entries, written to the directory table in runs under a shared header.

    A listing that crosses metadata blocks also gets an index (one entry per block a header starts
    in: the header's place and its first name), as mksquashfs writes it: the kernel and squashfuse
    look a name up from the last index entry not after it instead of from the listing's start."""

    def __init__(self, table: _MetadataTable):
        self._table = table
        self.ref = table.ref()
        self.size = 0
        self.index: List[bytes] = []  # entries of the extended directory inode's index
        self._run: List[bytes] = []
        self._first = b""
        self._block = self._base = self._run_bytes = 0

    def add(self, name: bytes, inode: _Inode) -> None:
        block, number = inode.ref >> 16, inode.number
        run = self._run
        # a new header where the inode block changes, the run is full, the number is out of reach
        # of the base, or the run would cross into the next metadata block (so every block of a
        # long listing has a header to index, as with mksquashfs)
        if run and (block != self._block or len(run) == DIR_RUN or not -32768 <= number - self._base <= 32767
                    or self._table.pending + self._run_bytes + _DIR_ENTRY.size + len(name) > METADATA_SIZE):
            self._flush()
        if not run:
            self._block, self._base, self._first = block, number, name
            self._run_bytes = _DIR_HEADER.size
        entry = _DIR_ENTRY.pack(inode.ref & 0xFFFF, number - self._base, inode.kind, len(name) - 1) + name
        run.append(entry)
        self._run_bytes += len(entry)

    def _flush(self) -> None:
        at = self._table.ref() >> 16
        if at != self.ref >> 16 and (not self.index or at != _DIR_INDEX.unpack_from(self.index[-1])[1]):
            self.index.append(_DIR_INDEX.pack(self.size, at, len(self._first) - 1) + self._first)
        data = _DIR_HEADER.pack(len(self._run) - 1, self._block, self._base) + b"".join(self._run)
        self._table.add(data)
        self.size += len(data)
        self._run.clear()

    def finish(self) -> None:
        if self._run:
            self._flush()


def _by_name(entry: Tuple[bytes, object, object]) -> bytes:
    return entry[0]


class _Writer:
    """Both passes over one tree, data then metadata (see the module docstring)."""

    def __init__(self, tree: RootfsTree, out: BinaryIO, spool_dir: Path, compress: Callable[[bytes], bytes],
                 workers: int, owners: bool):
        self.tree = tree
        self.owners = owners
        self.ids = _Ids()
        self.compress = compress
        self._spools: List[BinaryIO] = []
        self._spool_dir = spool_dir
        self.inodes = self._table()
        self.listings = self._table()
        self.fragments = self._table()
        self.data = _DataWriter(out, compress, workers, self.fragments, self._placed)
        self.count = 0  # inode numbers given
        self.db = tree.files.connection
        with index_errors():
            self.db.execute("CREATE TABLE stored (layer INTEGER NOT NULL, ordinal INTEGER NOT NULL,"
                            " nlink INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (layer, ordinal)) WITHOUT ROWID")
            self.db.execute("CREATE TABLE linked (layer INTEGER NOT NULL, ordinal INTEGER NOT NULL,"
                            " ref INTEGER NOT NULL, number INTEGER NOT NULL, PRIMARY KEY (layer, ordinal))"
                            " WITHOUT ROWID")
        self._stored_rows: List[Tuple[int, int, int, bytes]] = []
        self._generated: Dict[int, Tuple[_Stored, int]] = {}  # generated files by identity: data, nlink
        self._generated_links: Dict[int, _Inode] = {}

    def _table(self) -> _MetadataTable:
        spool = tempfile.TemporaryFile(dir=self._spool_dir, prefix="squashfs-table-")
        self._spools.append(spool)
        return _MetadataTable(self.compress, spool)

    def id_table(self) -> _MetadataTable:
        """The owners and groups the inodes named, by index (after every inode is written)."""
        table = self._table()
        table.add(b"".join(struct.pack("<I", value) for value in self.ids.order))
        return table

    def close(self) -> None:
        self.data.close()
        for spool in self._spools:
            spool.close()

    # ---- data

    def write_data(self) -> Plan:
        plan = self.tree.plan()
        for node, names, reader in _iter_file_data(self.tree, plan):
            if node.data is None:
                stored = _Stored((node.layer, node.ordinal, len(names)))
            else:
                stored = _Stored()
                self._generated[id(node)] = (stored, len(names))
            self.data.file(stored, reader, node.size, _label(self.tree, node), names[0])
        self.data.finish()
        self._flush_stored()
        return plan

    def _placed(self, stored: _Stored) -> None:
        if stored.key is not None:
            self._stored_rows.append((*stored.key, stored.packed()))
            if len(self._stored_rows) >= 512:
                self._flush_stored()

    def _flush_stored(self) -> None:
        if self._stored_rows:
            with index_errors():
                self.db.executemany("INSERT INTO stored VALUES (?, ?, ?, ?)", self._stored_rows)
            self._stored_rows.clear()

    # ---- metadata: inodes and directories

    def _header(self, kind: int, node: "_Entry", number: int) -> bytes:
        uid, gid = (node.uid, node.gid) if self.owners else (0, 0)
        return _HEADER.pack(kind, node.mode & 0o7777, self.ids.index(uid), self.ids.index(gid), node.mtime, number)

    def _add_inode(self, kind: int, body: bytes, number: int = 0) -> _Inode:
        ref = self.inodes.ref()
        self.inodes.add(body)
        return _Inode(ref, number, DIR if kind == LDIR else REG if kind == LREG else kind)

    def _next_number(self) -> int:
        self.count += 1
        return self.count

    def _file_inode(self, node: _File, stored: _Stored, nlink: int) -> _Inode:
        """A file's inode: basic unless it needs an extended one's fields (links, holes, 4 GiB)."""
        number = self._next_number()
        if nlink == 1 and not stored.sparse and stored.start < 1 << 32 and node.size < 1 << 32:
            body = self._header(REG, node, number) + _BASIC_FILE.pack(stored.start, stored.fragment, stored.offset,
                                                                         node.size)
            return self._add_inode(REG, body + stored.sizes.tobytes(), number)
        body = self._header(LREG, node, number) + _LONG_FILE.pack(stored.start, node.size, stored.sparse, nlink,
                                                                     stored.fragment, stored.offset, NO_XATTR)
        return self._add_inode(LREG, body + stored.sizes.tobytes(), number)

    def _layer_file(self, layer: int, ordinal: int, meta: bytes, data: bytes, nlink: int) -> _Inode:
        if nlink > 1:
            with index_errors():
                found = self.db.execute("SELECT ref, number FROM linked WHERE layer = ? AND ordinal = ?",
                                        (layer, ordinal)).fetchone()
            if found is not None:
                return _Inode(found[0], found[1], REG)
        inode = self._file_inode(_File(*_FILE_META.unpack(meta)), _Stored.unpack(data), nlink)
        if nlink > 1:
            with index_errors():
                self.db.execute("INSERT INTO linked VALUES (?, ?, ?, ?)", (layer, ordinal, inode.ref, inode.number))
        return inode

    def _other(self, node: "_Entry", subdirs: Dict[int, _Inode]) -> _Inode:
        if isinstance(node, _Dir):
            return subdirs[node.ident]
        if isinstance(node, _File):  # a generated file
            known = self._generated_links.get(id(node))
            if known is None:
                stored, nlink = self._generated[id(node)]
                known = self._generated_links[id(node)] = self._file_inode(node, stored, nlink)
            return known
        number = self._next_number()
        if isinstance(node, _Symlink):
            target = _name_key(node.target)
            return self._add_inode(SYMLINK, self._header(SYMLINK, node, number)
                                   + struct.pack("<II", 1, len(target)) + target, number)
        assert isinstance(node, _Fifo)
        return self._add_inode(FIFO, self._header(FIFO, node, number) + struct.pack("<I", 1), number)

    def _entries(self, d: _Dir) -> Iterator[Tuple[bytes, Optional["_Entry"], Optional[tuple]]]:
        """The directory's children sorted by name bytes (as squashfs wants them): model objects
        and index rows merged."""
        objects = sorted(((_name_key(name), node, None) for name, node in d.children.items()), key=_by_name)
        with index_errors():
            rows = self.db.execute("SELECT f.name, f.layer, f.ordinal, f.meta, s.data, s.nlink FROM f"
                                   " JOIN stored s ON s.layer = f.layer AND s.ordinal = f.ordinal"
                                   " WHERE f.dir = ? ORDER BY f.name", (d.ident,))
            yield from heapq.merge(objects, ((r[0], None, r[1:]) for r in rows), key=_by_name)

    def _directory(self, d: _Dir, number: int, parent: Optional[int], subdirs: Dict[int, _Inode],
                   root_mtime: int) -> _Inode:
        """Write the inodes of ``d``'s entries that are not directories (``subdirs`` has those),
        its listing, then its own inode. The root (``parent`` None) is 0755 root:root, with the
        image's time, and names as its parent one past the last inode number, as mksquashfs does."""
        listing = _Listing(self.listings)
        nlink = 2
        for name, node, row in self._entries(d):
            if row is not None:
                inode = self._layer_file(*row)
            else:
                assert node is not None
                nlink += isinstance(node, _Dir)
                inode = self._other(node, subdirs)
            listing.add(name, inode)
        listing.finish()
        node = d if parent is not None else _Dir(0o755, 0, 0, root_mtime)
        parent = self.count + 1 if parent is None else parent
        size = listing.size + 3  # readers count "." and ".." as 3 bytes
        block, offset = listing.ref >> 16, listing.ref & 0xFFFF
        if size <= 0xFFFF and not listing.index:
            body = self._header(DIR, node, number) + _BASIC_DIR.pack(block, nlink, size, offset, parent)
            return self._add_inode(DIR, body, number)
        body = self._header(LDIR, node, number) + _LONG_DIR.pack(nlink, size, block, parent, len(listing.index),
                                                                  offset, NO_XATTR)
        return self._add_inode(LDIR, body + b"".join(listing.index), number)

    def write_tree(self, root_mtime: int) -> int:
        """Every inode and listing, depth first (children before parents); returns the root's reference."""
        # directory numbers first, so that a directory's inode can name its parent's
        numbers: Dict[int, int] = {}
        stack = [self.tree.root]
        while stack:
            d = stack.pop()
            numbers[d.ident] = self._next_number()
            stack.extend(c for c in d.children.values() if isinstance(c, _Dir))
        written: Dict[int, _Inode] = {}  # directories done, until their parent is
        todo: List[Tuple[_Dir, Optional[_Dir], Iterator[_Dir]]] = []

        def enter(d: _Dir, parent: Optional[_Dir]) -> None:
            subdirs = sorted((name, c) for name, c in d.children.items() if isinstance(c, _Dir))
            todo.append((d, parent, iter([c for _, c in subdirs])))

        enter(self.tree.root, None)
        root_ref = 0
        while todo:
            d, parent, subdirs = todo[-1]
            child = next(subdirs, None)
            if child is not None:
                enter(child, d)
                continue
            todo.pop()
            parent_number = numbers[parent.ident] if parent is not None else None
            inode = self._directory(d, numbers[d.ident], parent_number, written, root_mtime)
            for c in d.children.values():
                if isinstance(c, _Dir):
                    del written[c.ident]
            written[d.ident] = inode
            root_ref = inode.ref
        return root_ref


def write_squashfs(tree: RootfsTree, dest: Path, *, compression: str, level: int, workers: int, owners: bool,
                   offset: int, scratch: Path) -> None:
    """Write ``tree`` as a squashfs at byte ``offset`` of ``dest`` (created or truncated).

    ``workers`` threads compress; ``owners`` False makes everything root-owned; ``scratch`` holds
    the spooled tables. Raises LayerError for unreadable layer data, PullError (or OSError, a
    full disk) otherwise; the caller removes ``dest`` on failure."""
    compress = compressor(compression, level)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    with open(fd, "wb", buffering=1 << 20) as out:
        out.seek(offset + SUPERBLOCK.size)
        writer = _Writer(tree, out, scratch, compress, max(1, workers), owners)
        try:
            plan = writer.write_data()
            root_ref = writer.write_tree(plan.root_mtime)
            # the tables after the data, in the order the kernel checks them
            inode_start = writer.data.position
            dir_start = writer.inodes.copy_to(out, inode_start)
            fragment_blocks = writer.listings.copy_to(out, dir_start)
            fragment_index = writer.fragments.copy_to(out, fragment_blocks)
            id_blocks = writer.fragments.write_index(out, fragment_blocks, fragment_index)
            ids = writer.id_table()
            id_index = ids.copy_to(out, id_blocks)
            used = ids.write_index(out, id_blocks, id_index)
            out.write(bytes(-used % PAD))
            out.seek(offset)
            out.write(SUPERBLOCK.pack(
                MAGIC, writer.count, plan.root_mtime, BLOCK_SIZE, writer.data.fragment_count,
                COMPRESSION_IDS[compression], BLOCK_LOG, NO_XATTRS, len(writer.ids.order), 4, 0, root_ref, used,
                id_index, INVALID_TABLE, inode_start, dir_start, fragment_index, INVALID_TABLE))
        finally:
            with contextlib.suppress(Exception):
                writer.close()


__all__ = ["write_squashfs", "supports", "compressor", "BLOCK_SIZE"]
