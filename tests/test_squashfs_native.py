"""The native squashfs writer (``build_squashfs(method="native")``) against ``mksquashfs -tar``.

mksquashfs is the reference: the same layers built both ways must give images that unsquashfs
lists and extracts alike (paths, types, modes with setuid/setgid/sticky, owners, mtimes, symlink
targets byte for byte, contents, hard-link groups), and that squashfuse and the kernel mount and
read as unsquashfs extracts them, with mksquashfs's link counts. Allowed differences: no
duplicate-file detection (image size), directory sizes, the root's and the superblock's times.

Random layer stacks (whiteouts, opaque directories, ``..``, type changes, hard links across
layers; seeded) cover the merge's shapes; one fixed edge image covers what they rarely reach: a
directory of 5,000 entries (several directory headers, a listing over 64 KiB, the lookup index
the kernel and squashfuse search), 2,700 owners (an id table over one metadata block), all-zero
blocks, sizes around the 128 KiB block, Latin-1 and 255-byte names, a 100-level path, and the
offset at which a SIF holds its partition.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import pytest
import zstandard

from shpc_lite.errors import LayerError
from shpc_lite.pull import LayerBlob, build_squashfs
from tests import imagetools as it
from tests.needs import missing, need_tools, requires
from tests.test_layers import MTIME, E, blob_from_tar, disk_tree, make_layer

BLOCK = 128 << 10  # the block size both builds use
OFFSET = 4096 + 512  # where the native image starts in its file, as in a SIF
CONFIG = {"created": "2024-05-01T10:00:00Z", "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"]}}
ZSTD = zstandard.ZstdDecompressor()
SEEDS = range(100)  # about half are refused by the merge (and must be by both builds)


@pytest.fixture(autouse=True)
def _squashfs_tools() -> None:
    need_tools("mksquashfs", "unsquashfs")  # the reference and the reader: a failure under CI=true


needs_fuse = requires(os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK),
                      reason="squashfuse needs a usable /dev/fuse")


# ---- reading an image back


LLN = re.compile(rb"^(\S{10}) (\d+)/(\d+) +(\d+) (\S+ \S+) squashfs-root(/.*?)?(?: -> (.*))?$", re.S)
Listing = Dict[str, Tuple[str, str, Optional[int], Optional[str], Optional[str]]]


def lln(image: Path, offset: int = 0) -> Listing:
    """``{path: (mode string, uid/gid, size (None for directories), mtime to the minute (None for
    the root: mksquashfs -tar stamps it "now"), symlink target)}`` from ``unsquashfs -lln``."""
    proc = subprocess.run(["unsquashfs", "-o", str(offset), "-lln", "-UTC", str(image)], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode(errors="replace")[-2000:]
    out: Listing = {}
    for line in proc.stdout.splitlines():
        m = LLN.match(line)
        assert m, line
        mode, uid, gid, size, when, path, target = m.groups()
        rel = os.fsdecode(path[1:]) if path else ""
        is_dir = mode.startswith(b"d")
        out[rel] = (mode.decode(), f"{int(uid)}/{int(gid)}", None if is_dir else int(size),
                    when.decode() if rel else None, None if target is None else os.fsdecode(target))
    return out


def extract(image: Path, dest: Path, offset: int = 0) -> Dict[str, Tuple]:
    """``tree`` of what ``unsquashfs -n -d`` extracts; it must exit 0 and say nothing on stderr
    (a warning there is a corrupt or unexpected structure that it worked around)."""
    proc = subprocess.run(["unsquashfs", "-o", str(offset), "-n", "-d", str(dest), str(image)], capture_output=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stderr == b"", (proc.returncode, proc.stderr.decode(errors="replace")[-2000:])
    return tree(dest)


def tree(root: Path) -> Dict[str, Tuple]:
    """``disk_tree`` with the hard-link groups of FIFOs and symlinks too (it groups regular files)."""
    t = disk_tree(root)
    by_inode: Dict[int, List[str]] = {}
    for rel, v in t.items():
        if v[0] in ("fifo", "symlink"):
            by_inode.setdefault(os.lstat(Path(root, rel)).st_ino, []).append(rel)
    groups = {name: tuple(sorted(g)) for g in by_inode.values() if len(g) > 1 for name in g}
    return {k: v[:5] + (groups.get(k, v[5]),) + v[6:] for k, v in t.items()}


def superblock(image: Path, offset: int = 0) -> str:
    proc = subprocess.run(["unsquashfs", "-o", str(offset), "-s", str(image)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "Found a valid SQUASHFS 4:0 superblock" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


class Squashfs:
    """Just enough of squashfs 4.0 to follow a path to a directory inode and read its lookup index
    (unsquashfs ignores the index; the kernel and squashfuse search it on every name lookup)."""

    SUPER = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")

    def __init__(self, image: Path, offset: int = 0):
        with open(image, "rb") as fh:
            fh.seek(offset)
            self.data = fh.read()
        sb = self.SUPER.unpack_from(self.data)
        self.compression, self.root, self.inode_table, self.dir_table = sb[5], sb[11], sb[15], sb[16]

    def block(self, pos: int) -> Tuple[bytes, int]:
        """The metadata block at ``pos``, uncompressed, and where the next one starts."""
        (head,) = struct.unpack_from("<H", self.data, pos)
        raw = self.data[pos + 2:pos + 2 + (head & 0x7FFF)]
        if not head & 0x8000:  # compressed (compression 1 is gzip, 6 zstd)
            raw = zlib.decompress(raw) if self.compression == 1 else ZSTD.decompressobj().decompress(raw)
        return raw, pos + 2 + (head & 0x7FFF)

    def meta(self, table: int, block: int, offset: int, size: int) -> Tuple[bytes, List[int]]:
        """``size`` bytes from ``offset`` in metadata block ``block`` of a table on, and the blocks'
        starts (relative to the table)."""
        out, pos, starts = b"", table + block, []
        while len(out) < offset + size:
            starts.append(pos - table)
            raw, pos = self.block(pos)
            out += raw
        return out[offset:offset + size], starts

    def inode(self, ref: int) -> Dict:
        head, _ = self.meta(self.inode_table, ref >> 16, ref & 0xFFFF, 40)
        kind = struct.unpack_from("<H", head)[0]
        if kind == 1:  # basic directory: no index
            block, nlink, size, offset, _parent = struct.unpack_from("<IIHHI", head, 16)
            return dict(kind=kind, size=size, block=block, offset=offset, index=[])
        assert kind == 8, kind  # extended directory
        nlink, size, block, _parent, count, offset, _xattr = struct.unpack_from("<IIIIHHI", head, 16)
        head, _ = self.meta(self.inode_table, ref >> 16, ref & 0xFFFF, 40 + count * (12 + 256))
        index, pos = [], 40
        for _ in range(count):
            at, start, n = struct.unpack_from("<III", head, pos)
            index.append((at, start, head[pos + 12:pos + 13 + n]))
            pos += 13 + n
        return dict(kind=kind, size=size, block=block, offset=offset, index=index)

    def listing(self, d: Dict) -> Tuple[bytes, List[int]]:
        return self.meta(self.dir_table, d["block"], d["offset"], d["size"] - 3)

    def lookup(self, path: str) -> Dict:
        node = self.inode(self.root)
        for part in path.split("/"):
            listing, _ = self.listing(node)
            pos, found = 0, None
            while pos < len(listing) and found is None:
                count, start, _base = struct.unpack_from("<III", listing, pos)
                pos += 12
                for _ in range(count + 1):
                    offset, _num, _kind, n = struct.unpack_from("<HhHH", listing, pos)
                    if listing[pos + 8:pos + 9 + n] == part.encode():
                        found = start << 16 | offset
                    pos += 9 + n
            assert found is not None, part
            node = self.inode(found)
        return node




_LONGEST_ENTRY = 12 + 8 + 256  # a header, an entry and a 256-byte name: what may run past a block


def index_problems(image: Path, offset: int, path: str) -> List[str]:
    """What is wrong with the lookup index of directory ``path``. A lookup reads the listing from
    the last index entry not after the name (from the listing's start without one), so entries
    must come about every 8 KiB metadata block of listing, as mksquashfs writes them;
    each must point at a directory header in the block it names, whose first name it carries,
    in name order."""
    fs = Squashfs(image, offset)
    d = fs.lookup(path)
    listing, starts = fs.listing(d)
    problems = []
    points = [0] + [at for at, _, _ in d["index"]] + [len(listing)]
    gap = max(b - a for a, b in zip(points, points[1:]))
    if gap > 8192 + _LONGEST_ENTRY:
        problems.append(f"{len(d['index'])} index entries for a listing of {len(listing)} bytes: {gap} bytes "
                        "scanned from one")
    for at, start, name in d["index"]:
        first = None
        if at + 20 <= len(listing):
            n = struct.unpack_from("<H", listing, at + 18)[0]
            first = listing[at + 20:at + 21 + n]
        block = (d["offset"] + at) // 8192
        if first != name or block >= len(starts) or starts[block] != start:
            problems.append(f"index entry {name!r} -> listing byte {at}, block {start}: finds {first!r}")
    if [name for _, _, name in d["index"]] != sorted(name for _, _, name in d["index"]):
        problems.append("index entries out of name order")
    return problems


def link_counts(root: Path) -> Dict[str, int]:
    """``st_nlink`` of everything below a mount (``find`` trusts a directory's count of 2 + subdirs)."""
    out = {"": os.lstat(root).st_nlink}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = os.lstat(p).st_nlink
    return out


def _unmount(mnt: Path) -> None:
    for args in (["-u"], ["-u", "-z"]):
        for tool in ("fusermount3", "fusermount"):
            if shutil.which(tool) and subprocess.run([tool, *args, str(mnt)], capture_output=True,
                                                     timeout=60).returncode == 0:
                return


@contextlib.contextmanager
def squashfuse(image: Path, mnt: Path, offset: int = 0, tool: str = "squashfuse_ll") -> Iterator[Path]:
    """``image`` mounted read-only at ``offset``, unmounted on the way out whatever happened.
    ``squashfuse_ll`` (which Apptainer prefers) reports the image's inode numbers, so hard links
    show as one inode; ``squashfuse`` (tests/runtime_*.sh) numbers paths itself."""
    need_tools(tool)
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        missing("needs fusermount3 or fusermount on PATH")
    mnt.mkdir()
    err = mnt.with_name(mnt.name + ".err")
    with open(err, "w+b") as fh:  # the daemon keeps its stderr: a pipe here would never reach EOF
        rc = subprocess.run([tool, "-o", f"ro,offset={offset}", str(image), str(mnt)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=fh, timeout=60).returncode
    assert rc == 0 and os.path.ismount(mnt), f"{tool} {image.name} failed ({rc}): {err.read_text(errors='replace')}"
    try:
        yield mnt
    finally:
        _unmount(mnt)


@contextlib.contextmanager
def kernel_mount(image: Path, mnt: Path, offset: int = 0, reference: bool = False) -> Iterator[Path]:
    """``image`` loop-mounted read-only at ``offset`` by the Linux squashfs driver (how setuid
    Apptainer and Singularity mount a SIF), unmounted on the way out. Root, loop devices and the
    squashfs driver are the host's, not a part the setup installs: where they are missing, or even
    mksquashfs's image (``reference``) cannot be mounted, the test is skipped, on CI too; where the
    reference mounts, the native image must."""
    if not (os.geteuid() == 0 and os.path.exists("/dev/loop-control")
            and "squashfs" in Path("/proc/filesystems").read_text()):
        pytest.skip("a kernel squashfs mount needs root, loop devices and the squashfs driver (a property of the host)")
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "squashfs", "-o", f"loop,ro,offset={offset}", str(image), str(mnt)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if proc.returncode and reference:
        pytest.skip(f"the kernel cannot mount mksquashfs's image on this host: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"mount {image.name} failed ({proc.returncode}): {proc.stderr}"
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60).returncode:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def mounted(reader: str, image: Path, mnt: Path, offset: int = 0,
            reference: bool = False) -> "contextlib.AbstractContextManager[Path]":
    """A mount by ``reader``: "kernel", "squashfuse_ll" or "squashfuse"."""
    if reader == "kernel":
        return kernel_mount(image, mnt, offset, reference)
    return squashfuse(image, mnt, offset, tool=reader)


def without_groups(t: Dict[str, Tuple]) -> Dict[str, Tuple]:
    return {k: v[:5] + v[6:] for k, v in t.items()}


def readdir_orders(root: Path) -> Dict[str, List[bytes]]:
    """Directories whose entries a mount lists out of byte order (the lookups of the kernel and of
    squashfuse rely on it): ``{dir: names}``, empty when all are sorted."""
    bad = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        names = os.listdir(dirpath)
        if names != sorted(names):
            bad[os.fsdecode(dirpath)] = names
    return bad


def build(layers: List[LayerBlob], dest: Path, method: str, *, compression: str = "zstd", offset: int = 0,
          owners: bool = True, config: Mapping = CONFIG, level: Optional[int] = None) -> Union[Path, str]:
    """The image at ``dest``, or the one-line message of the LayerError refusing the stack (after
    checking that no image was left behind)."""
    try:
        used = build_squashfs(layers, config, dest, source_ref="registry.example/random:1", source_digest="sha256:feed",
                              compression=compression, level=level, workdir=dest.with_name(dest.name + ".work"),
                              method=method, preserve_owners=owners, offset=offset)
    except LayerError as exc:
        assert not dest.exists() and "\n" not in str(exc)
        return str(exc)
    assert used == method and dest.is_file()
    return dest


# ---- random layer stacks


NAMES = ["a", "b", "c", "d", ".wh.a", ".wh.b", ".wh.c", ".wh..wh..opq", "..", "."]
MODES = [0o644, 0o755, 0o4755, 0o2750, 0o1777, 0o600, 0o000, 0o7777]
OWNERS = [(0, 0), (0, 0), (1000, 1000), (0, 5), (70000, 70001), (65534, 65534)]
SIZES = [BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 3 * BLOCK + 4321]


def _random_path(rng: random.Random, depth: int = 3) -> str:
    """Mostly a/b/c/d, sometimes through ``..``, ``.`` or a whiteout name; the last part never ``..``."""
    n = rng.randint(1, depth)
    parts = [rng.choice(NAMES[:4] if rng.random() < 0.8 else NAMES) for _ in range(n - 1)]
    return "/".join(parts + [rng.choice(NAMES[:8])])


def _random_data(rng: random.Random) -> bytes:
    """Small files mostly (fragments); sometimes a size around the block, random, text, zeros, or
    data with all-zero blocks between."""
    size = rng.randint(0, 700) if rng.random() < 0.8 else rng.choice(SIZES)
    style = rng.choice(["random", "text", "zeros", "holes"])
    if style == "random":
        return rng.randbytes(size)
    if style == "text":
        return (b"line %d of a text file\n" % rng.randint(0, 9999) * (size // 20 + 1))[:size]
    if style == "zeros":
        return bytes(size)
    blocks = [rng.randbytes(BLOCK) if i % 2 else bytes(BLOCK) for i in range(size // BLOCK)]
    return b"".join(blocks) + rng.randbytes(size % BLOCK)


def _random_layer(rng: random.Random, names: List[str]) -> List[dict]:
    entries = []
    for _ in range(rng.randint(1, 14)):
        name = _random_path(rng)
        kind = rng.choice(["file"] * 5 + ["dir"] * 3 + ["symlink"] * 2 + ["hardlink", "fifo", "chr"])
        uid, gid = rng.choice(OWNERS)
        mtime = rng.choice([rng.randint(0, 2000), MTIME, 2**32 - 1])
        attrs = dict(mode=rng.choice(MODES), uid=uid, gid=gid, mtime=mtime)
        if kind != "dir" and rng.random() < 0.7:  # mostly leaves, under the names directories use
            name = "/".join([*(rng.choice("ab") for _ in range(rng.randint(0, 2))), rng.choice("cdef")])
        if kind == "file":
            entries.append(E(name, data=_random_data(rng), **attrs))
        elif kind == "symlink":
            entries.append(E(name, "symlink", link=rng.choice(["/", "", "../"]) + _random_path(rng), **attrs))
        elif kind == "hardlink":
            target = rng.choice(names) if names and rng.random() < 0.95 else _random_path(rng)
            entries.append(E(name, "hardlink", link=target, **attrs))
        else:
            entries.append(E(name, kind, **attrs))
        if kind not in ("dir", "chr") and ".wh." not in name:  # what a hard link can name
            names.append(name)
    return entries


def random_stack(rng: random.Random, directory: Path) -> List[LayerBlob]:
    """1-4 layers of 1-14 entries each, every layer compressed its own way."""
    names: List[str] = []
    return [make_layer(directory, _random_layer(rng, names), rng.choice(["gzip", "zstd", "none"]))
            for _ in range(rng.randint(1, 4))]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_stack_matches_mksquashfs(tmp_path: Path, seed: int) -> None:
    """A random stack built natively lists and extracts as ``mksquashfs -tar`` builds it; a stack the
    merge refuses is refused with the same message (and leaves no image) both ways."""
    rng = random.Random(seed)
    layers = random_stack(rng, tmp_path)
    config = rng.choice([CONFIG, {}])  # {}: Apptainer's files take the newest layer time
    owners = rng.random() < 0.8
    compression = ("zstd", "gzip")[seed % 2]
    offset = OFFSET if seed % 3 == 0 else 0
    ref = build(layers, tmp_path / "ref.sqfs", "tar", compression=compression, owners=owners, config=config)
    got = build(layers, tmp_path / "native.sqfs", "native", compression=compression, owners=owners, config=config,
                offset=offset)
    if isinstance(ref, str) or isinstance(got, str):
        assert got == ref
        return
    assert lln(got, offset) == lln(ref)
    assert extract(got, tmp_path / "x-native", offset) == extract(ref, tmp_path / "x-ref")


@pytest.mark.parametrize("reader", [pytest.param("squashfuse_ll", marks=needs_fuse),
                                    pytest.param("squashfuse", marks=needs_fuse), "kernel"])
def test_random_stacks_mount(tmp_path: Path, reader: str) -> None:
    """Natively built stacks (every eighth seed, gzip and zstd, with and without an offset) read
    through squashfuse_ll, squashfuse (as tests/runtime_*.sh mount; it numbers inodes itself, so
    hard links are not compared) and the kernel as unsquashfs extracts them, with mksquashfs's
    link counts and sorted listings."""
    done = 0
    for seed in SEEDS[::8]:
        rng = random.Random(seed)
        work = tmp_path / str(seed)
        work.mkdir()
        layers = random_stack(rng, work)
        offset = OFFSET if seed % 16 == 0 else 0
        compression = ("zstd", "gzip")[seed // 8 % 2]
        got = build(layers, work / "native.sqfs", "native", compression=compression, offset=offset)
        ref = build(layers, work / "ref.sqfs", "tar", compression=compression)
        if isinstance(got, str):
            continue
        assert isinstance(ref, Path)
        expected = extract(got, work / "x", offset)
        with mounted(reader, ref, work / "mnt-ref", reference=True) as ref_mnt, \
                mounted(reader, got, work / "mnt", offset) as mnt:
            if reader == "squashfuse":
                assert without_groups(tree(mnt)) == without_groups(expected), seed
            else:
                assert tree(mnt) == expected, seed
            assert link_counts(mnt) == link_counts(ref_mnt), seed
            assert readdir_orders(mnt) == {}, seed
        done += 1
    assert done >= 3


# ---- the edge image

PREFIX = "a-long-prefix-shared-by-many-names-" * 7  # 245 bytes: with 5 digits a name of 250
BIG = 5_000
WIDE = 1_200  # more than 256 entries (one header's limit), a listing of 8-64 KiB (a basic inode's size)
DEEP = "deep/" + "/".join(f"level{i:03d}" for i in range(100)) + "/leaf"


def big_name(i: int) -> str:
    """Every third name long and sharing the prefix, the others short: 5,000 names in byte order
    neither by number nor by length."""
    return f"{PREFIX}{i:05d}" if i % 3 == 0 else (f"f{i}" if i % 3 == 1 else f"F-{i:05d}")


def _latin1_layer(directory: Path) -> Tuple[LayerBlob, Dict[str, bytes]]:
    """Names and a symlink target that are Latin-1 bytes, not UTF-8 (a GNU tar made on such a host)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        for name, kind, data, link in [("latin", tarfile.DIRTYPE, b"", ""),
                                       ("latin/café", tarfile.REGTYPE, b"latte", ""),
                                       ("latin/dé", tarfile.DIRTYPE, b"", ""),
                                       ("latin/dé/thé", tarfile.REGTYPE, b"tea", ""),
                                       ("latin/lien", tarfile.LNKTYPE, b"", "latin/café"),
                                       ("latin/sym", tarfile.SYMTYPE, b"", "dé/thé"),
                                       ("latin/" + "é" * 255, tarfile.REGTYPE, b"255 Latin-1 bytes", "")]:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.size, ti.mtime = kind, link, len(data), MTIME
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tf.addfile(ti, io.BytesIO(data) if data else None)
    files = {os.fsdecode(b"latin/caf\xe9"): b"latte", os.fsdecode(b"latin/d\xe9/th\xe9"): b"tea",
             os.fsdecode(b"latin/" + b"\xe9" * 255): b"255 Latin-1 bytes"}
    return blob_from_tar(directory, out.getvalue(), "gzip"), files


def edge_layers(directory: Path) -> Tuple[List[LayerBlob], Dict[str, bytes]]:
    """The edge image's layers and ``{path: content}`` of its files whose bytes are checked directly."""
    rng = random.Random(2024)
    text = b"".join(b"%06d some compressible text\n" % i for i in range(200_000))
    files: Dict[str, bytes] = {}

    def f(path: str, data: bytes, **kw) -> dict:
        files[path] = data
        return E(path, data=data, **kw)

    entries = [E("big", "dir"), E("big/sub-a", "dir"), E("big/sub-b", "dir")]
    entries += [E(f"big/{big_name(i)}", data=b"%d\n" % i, uid=1000 + i % 3000, gid=100 + i % 7, mtime=MTIME + i)
                for i in range(BIG)]
    for i in range(WIDE):
        kinds = [E(f"wide/s{i:04d}", "symlink", link=f"target-{i}"), E(f"wide/p{i:04d}", "fifo"),
                 E(f"wide/d{i:04d}", "dir")]
        entries.append(kinds[i % 3] if i % 4 else f(f"wide/f{i:04d}", b"w" * (i % 1000)))
    for n in (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 5 * BLOCK - 3):
        entries += [f(f"sizes/text-{n}", text[:n]), f(f"sizes/random-{n}", rng.randbytes(n))]
    holes = rng.randbytes(12 * BLOCK) + bytes(6 * BLOCK) + text[:14 * BLOCK] + bytes(BLOCK) + rng.randbytes(777)
    entries += [
        f("sparse/holes.bin", holes),  # 4.1 MB: a run of 6 all-zero blocks, another one, a tail
        f("sparse/all-zero.bin", bytes(3 * BLOCK + 10)), f("sparse/zero-blocks.bin", bytes(2 * BLOCK)),
        f("sparse/zero-then-data", bytes(BLOCK) + b"x"),
        f("long/" + "n" * 255, b"n"), E("long/" + "s" * 255, "symlink", link="n" * 255),
        E("long/" + "h" * 255, "hardlink", link="long/" + "n" * 255),
        f("long/" + "d" * 255 + "/" + "f" * 255, b"f"), f(DEEP, b"at the bottom"),
        E("links/long-target", "symlink", link="/" + "t/" * 1000),
        E("empty", "dir"), E("empty-nested/inner/innermost", "dir", mode=0o700),
        f("modes/suid", b"s", mode=0o4755), f("modes/sgid", b"g", mode=0o2711), f("modes/none", b"", mode=0),
        f("modes/all", b"a", mode=0o7777), E("modes/sticky", "dir", mode=0o1777),
        E("modes/sgid-dir", "dir", mode=0o2775), E("modes/fifo", "fifo", mode=0o1620),
        f("links/a", b"a" * 200), E("links/b", "hardlink", link="links/a"),
        E("big/zz-hardlink", "hardlink", link="links/a"), E("links/holes-2", "hardlink", link="sparse/holes.bin"),
        E("links/fifo", "fifo"), E("links/fifo-2", "hardlink", link="links/fifo"),
        E("links/sym", "symlink", link="a"), E("links/sym-2", "hardlink", link="links/sym"),
        f("times/zero", b"0", mtime=0), f("times/2038", b"8", mtime=2**31), f("times/max", b"m", mtime=2**32 - 1),
        f("owners/high", b"h", uid=2**31 + 7, gid=2**32 - 2), E("owners/dir", "dir", uid=1000, gid=1000, mode=0o700),
    ]
    latin, latin_files = _latin1_layer(directory)
    files.update(latin_files)
    gone = [f"big/{big_name(i)}" for i in range(0, BIG, 10)]
    top = [E(f"big/.wh.{name[4:]}") for name in gone] + [f("big/added", b"added on top")]
    return [make_layer(directory, entries, "zstd"), latin, make_layer(directory, top, "none")], files


@dataclass
class Edge:
    compression: str
    base: Path
    reference: Path  # mksquashfs -tar, offset 0
    image: Path  # native, at OFFSET
    files: Dict[str, bytes]
    _trees: Dict[str, Dict[str, Tuple]] = field(default_factory=dict)

    def extracted(self, which: str = "image") -> Dict[str, Tuple]:
        """``extract`` of the native image (or the reference), once per module."""
        if which not in self._trees:
            image, offset = (self.image, OFFSET) if which == "image" else (self.reference, 0)
            self._trees[which] = extract(image, self.base / f"x-{which}", offset)
        return self._trees[which]


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory) -> Tuple[List[LayerBlob], Dict[str, bytes]]:
    return edge_layers(tmp_path_factory.mktemp("edge-layers"))


@pytest.fixture(scope="module", params=["gzip", "zstd"])
def edge(request, tmp_path_factory, edge_stack) -> Edge:
    need_tools("mksquashfs", "unsquashfs")
    layers, files = edge_stack
    base = tmp_path_factory.mktemp(f"edge-{request.param}")
    ref = build(layers, base / "ref.sqfs", "tar", compression=request.param)
    image = build(layers, base / "native.sqfs", "native", compression=request.param, offset=OFFSET)
    assert isinstance(ref, Path) and isinstance(image, Path), (ref, image)
    return Edge(request.param, base, ref, image, files)


def test_edge_image_lists_as_mksquashfs(edge: Edge) -> None:
    """Every path with its mode, owner, size, time and symlink target, as mksquashfs stores it."""
    got = lln(edge.image, OFFSET)
    assert got == lln(edge.reference)
    assert sum(1 for p in got if p.startswith("big/")) == BIG - BIG // 10 + 4  # whiteouts applied
    assert got["modes/suid"][0] == "-rwsr-xr-x" and got["modes/sticky"][0] == "drwxrwxrwt"
    assert got["modes/all"][0] == "-rwsrwsrwt" and got["modes/sgid-dir"][0] == "drwxrwsr-x"
    assert got["owners/high"][1] == f"{2**31 + 7}/{2**32 - 2}" and got["big/" + big_name(2999)][1] == "3999/103"
    assert got[""][:2] == ("drwxr-xr-x", "0/0")
    assert got["times/max"][3] == "2106-02-07 06:28" and got["times/zero"][3] == "1970-01-01 00:00"


def test_edge_image_extracts_as_mksquashfs(edge: Edge) -> None:
    """The extracted trees are equal (contents, hard-link groups, modes, owners, mtimes), and the
    files hold exactly the bytes put in: sizes around the block, all-zero blocks, Latin-1 names."""
    got = edge.extracted()
    assert got == edge.extracted("reference")
    assert {path: got[path][4] for path in edge.files} == edge.files
    assert got["links/a"][5] == ("big/zz-hardlink", "links/a", "links/b")
    assert got["sparse/holes.bin"][5] == ("links/holes-2", "sparse/holes.bin")
    assert got["links/sym"][0] == "symlink" and got["links/sym-2"][4] == "a"
    assert got["links/long-target"][4] == "/" + "t/" * 1000
    assert got[os.fsdecode(b"latin/sym")][4] == os.fsdecode(b"d\xe9/th\xe9")
    assert got[os.fsdecode(b"latin/lien")][5] == (os.fsdecode(b"latin/caf\xe9"), "latin/lien")
    assert got["empty"][0] == "dir" and got["empty-nested/inner/innermost"][:2] == ("dir", 0o700)
    assert got["modes/fifo"][:2] == ("fifo", 0o1620) and got["links/fifo-2"][:2] == ("fifo", 0o644)
    assert got["times/max"][6] == 2**32 - 1 and got["times/2038"][6] == 2**31


def test_edge_image_superblock_size_and_scratch(edge: Edge) -> None:
    """``unsquashfs -s`` names the compression asked for and the 128 KiB block; the image is padded to
    4 KiB after its offset (a loop device drops a partial last sector), nothing is written before
    the offset, and no scratch file is left in the work directory."""
    stats = superblock(edge.image, OFFSET)
    assert f"Compression {edge.compression}" in stats and "Block size 131072" in stats
    used = int(re.search(r"Filesystem size (\d+) bytes", stats).group(1))
    size = edge.image.stat().st_size
    assert (size - OFFSET) % 4096 == 0 and used <= size - OFFSET < used + 4096
    with open(edge.image, "rb") as fh:
        assert fh.read(OFFSET) == bytes(OFFSET)
    work = edge.image.with_name(edge.image.name + ".work")
    assert not work.exists() or list(work.iterdir()) == []
    # no duplicate detection, but not much larger than mksquashfs's image either
    assert size - OFFSET < 1.5 * edge.reference.stat().st_size + (64 << 10)


@pytest.mark.parametrize("path", ["big", "wide"])
def test_edge_image_large_directories_have_a_lookup_index(edge: Edge, path: str) -> None:
    """Directories whose listing spans metadata blocks carry an index, as mksquashfs writes it:
    without one every name looked up in them (the kernel, squashfuse) reads the listing from its
    start. Through squashfuse, lookups in the 5,000-entry directory took 4-20x as long without."""
    assert index_problems(edge.reference, 0, path) == []  # (the reader reads mksquashfs's right)
    assert index_problems(edge.image, OFFSET, path) == []


@pytest.mark.parametrize("reader", [pytest.param("squashfuse_ll", marks=needs_fuse), "kernel"])
def test_edge_image_mounts(edge: Edge, reader: str) -> None:
    """Mounted by squashfuse (unprivileged Apptainer) or by the kernel (setuid Apptainer), the
    native image at its offset reads as unsquashfs extracts it, with mksquashfs's link counts,
    entries in byte order, and name lookups in the 5,000-entry directory (both readers search its
    index) that find what is there and nothing else."""
    expected = edge.extracted()
    with mounted(reader, edge.reference, edge.base / f"mnt-ref-{reader}", reference=True) as ref, \
            mounted(reader, edge.image, edge.base / f"mnt-{reader}", OFFSET) as mnt:
        assert tree(mnt) == expected
        assert link_counts(mnt) == link_counts(ref)
        assert readdir_orders(mnt) == {}
        big = mnt / "big"  # (every name there was looked up by tree(); a miss costs the kernel ~3 ms)
        for i in range(0, BIG, 40):
            assert not os.path.lexists(big / big_name(i)), big_name(i)  # whited out by the top layer
        for i in range(1, BIG, 50):
            for miss in (big_name(i) + "!", big_name(i) + "~"):  # sorts right after a name: between two
                assert not os.path.lexists(big / miss), miss
        for miss in ("0", "E", "a", "zzz", PREFIX, PREFIX + "99999"):
            assert not os.path.lexists(big / miss), miss
        assert (mnt / DEEP).read_bytes() == b"at the bottom"
        assert (mnt / os.fsdecode(b"latin/d\xe9/th\xe9")).read_bytes() == b"tea"


def test_a_sparse_file_over_4_gib(tmp_path: Path) -> None:
    """A file of 4 GiB + 5 bytes (a size a basic inode cannot hold), mostly holes as GNU tar
    ``--sparse`` stores it: the right size and bytes come back, and its empty blocks take no room."""
    src = tmp_path / "src"
    src.mkdir()
    size = (4 << 30) + 5
    it.make_sparse_file(src / "huge.img", size, {0: b"head", 2 << 30: b"middle", size - 4: b"tail"})
    layer = blob_from_tar(tmp_path, it.tar_directory("gnu", src), "zstd")
    image = build([layer], tmp_path / "huge.sqfs", "native", offset=OFFSET)
    assert isinstance(image, Path), image
    assert lln(image, OFFSET)["huge.img"][2] == size
    assert image.stat().st_size < OFFSET + (256 << 10)
    got = tmp_path / "x" / "huge.img"
    subprocess.run(["unsquashfs", "-o", str(OFFSET), "-n", "-d", str(tmp_path / "x"), str(image)], check=True,
                   capture_output=True, timeout=120)
    assert got.stat().st_size == size
    with open(got, "rb") as fh:
        assert fh.read(5) == b"head\0" and fh.seek(2 << 30) and fh.read(6) == b"middle"
        assert fh.seek(size - 5) and fh.read() == b"\0tail"


def test_more_fragments_than_one_table_block(tmp_path: Path) -> None:
    """600 files just under a block each fill a fragment of their own: the fragment table spans two
    metadata blocks (512 entries each), and every file still reads back as mksquashfs stores it."""
    text = b"".join(b"%06d text\n" % i for i in range(12_000))[:BLOCK - 7]
    layer = make_layer(tmp_path, [E(f"frag/{i:04d}", data=b"%06d" % i + text) for i in range(600)], "zstd")
    ref = build([layer], tmp_path / "ref.sqfs", "tar")
    got = build([layer], tmp_path / "native.sqfs", "native")
    assert isinstance(ref, Path) and isinstance(got, Path)
    assert "Number of fragments 60" in superblock(got)
    assert lln(got) == lln(ref)
    assert extract(got, tmp_path / "x-native") == extract(ref, tmp_path / "x-ref")


def test_inode_numbers_far_apart_in_one_directory(tmp_path: Path) -> None:
    """A directory whose entries' inode numbers lie more than 32,767 apart (a directory header
    stores each as a signed 16-bit difference from its base): 34,000 files elsewhere put them so."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(34_000):
            tf.addfile(tarfile.TarInfo(f"a/f{i}"))
        for name in ["z/b-file", "z/sub/x", "z/zz-file"]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(name), MTIME
            tf.addfile(ti, io.BytesIO(name.encode()))
    image = build([blob_from_tar(tmp_path, out.getvalue(), "zstd")], tmp_path / "far.sqfs", "native")
    assert isinstance(image, Path), image
    proc = subprocess.run(["unsquashfs", "-n", "-d", str(tmp_path / "x"), str(image), "z"], capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    t = tree(tmp_path / "x")
    assert {k: v[4] for k, v in t.items()} == {"z": None, "z/b-file": b"z/b-file", "z/sub": None,
                                               "z/sub/x": b"z/sub/x", "z/zz-file": b"z/zz-file"}
    assert t["z/sub"][0] == "dir"


# ---- memory


_PEAK_OF_A_BUILD = r"""
import sys
from pathlib import Path
from shpc_lite.pull import LayerBlob, build_squashfs

layer, dest = sys.argv[1], Path(sys.argv[2])
build_squashfs([LayerBlob(layer, "application/vnd.oci.image.layer.v1.tar+gzip", "sha256:x")], {}, dest,
               source_ref="r", source_digest="d", workdir=dest.parent / "work", method="native", processors=2)
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def test_native_build_memory_does_not_grow_with_the_file_count(tmp_path: Path) -> None:
    """The native build (merge and writer) of 60,000 files peaks within a few MB of one of 20,000:
    its per-file state is on disk, where mksquashfs keeps ~0.7 KB a file in memory (+28 MB here).
    (Below ~20,000 files the peak still rises while SQLite's capped cache fills.)"""
    peaks = {}
    for files in (20_000, 60_000):
        layer = tmp_path / f"{files}.tar.gz"
        it.many_files_layer(layer, files)
        out = subprocess.run([sys.executable, "-c", _PEAK_OF_A_BUILD, str(layer), str(tmp_path / f"{files}.sqfs")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[files] = int(out.stdout.split()[-1]) / 1024
        assert "module_%d.py" % (files - 1) in subprocess.run(
            ["unsquashfs", "-lc", str(tmp_path / f"{files}.sqfs")], capture_output=True, text=True).stdout
    assert peaks[60_000] - peaks[20_000] < 3, peaks
