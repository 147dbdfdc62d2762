"""Layer application: OCI whiteout semantics, links, modes, compression detection, and hostile layers."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import zstandard

from shpc_lite.errors import LayerError
from shpc_lite.pull.layers import LayerBlob, build_tree, split_path, write_merged_tar, write_rootfs_dir
from tests import imagetools as it

MTIME = 1_700_000_000


# ---- helpers shared with test_squashfs


def E(name: str, kind: str = "file", data: bytes = b"", mode: Optional[int] = None, uid: int = 0, gid: int = 0,
      link: str = "", size: Optional[int] = None, mtime: int = MTIME) -> dict:
    """One tar entry: kind is file, dir, symlink, hardlink, chr, blk or fifo."""
    return dict(name=name, kind=kind, data=data, mode=mode, uid=uid, gid=gid, link=link, size=size, mtime=mtime)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
          "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


def tar_bytes(entries: List[dict]) -> bytes:
    """A tar archive written header by header (so hostile names and sizes go in exactly as given)."""
    out = io.BytesIO()
    for e in entries:
        ti = tarfile.TarInfo(e["name"])
        ti.type = _TYPES[e["kind"]]
        ti.mode = e["mode"] if e["mode"] is not None else (0o755 if e["kind"] == "dir" else 0o644)
        ti.uid, ti.gid, ti.mtime = e["uid"], e["gid"], e["mtime"]
        ti.linkname = e["link"]
        data = e["data"] if e["kind"] == "file" else b""
        ti.size = e["size"] if e["size"] is not None else len(data)
        out.write(ti.tobuf(tarfile.PAX_FORMAT))
        if e["size"] is None and data:
            out.write(data + b"\0" * (-len(data) % 512))
    if not any(e["size"] is not None for e in entries):
        out.write(b"\0" * 1024)
    return out.getvalue()


def make_layer(directory: Path, entries: List[dict], compression: str = "gzip", media_type: Optional[str] = None) -> LayerBlob:
    return blob_from_tar(directory, tar_bytes(entries), compression, media_type)


def blob_from_tar(directory: Path, raw: bytes, compression: str = "gzip",
                  media_type: Optional[str] = None) -> LayerBlob:
    """A layer blob file in ``directory`` holding the tar ``raw``, compressed as asked."""
    if compression == "gzip":
        blob = gzip.compress(raw)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(raw)
    else:
        blob = raw
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = Path(directory) / (digest.split(":")[1][:16] + ".blob")
    path.write_bytes(blob)
    mt = media_type or {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}.get(compression,
                                                                                 "application/vnd.oci.image.layer.v1.tar")
    return LayerBlob(path, mt, digest)


def disk_tree(root: Path) -> Dict[str, Tuple]:
    """``{relpath: (kind, mode, uid, gid, content or link target, hard-link group, mtime)}`` of a directory."""
    out: Dict[str, Tuple] = {}
    by_inode: Dict[int, List[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", None, st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None)
            else:
                data = p.read_bytes() if os.access(p, os.R_OK) else "<unreadable>"
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, data)
                by_inode.setdefault(st.st_ino, []).append(rel)
    groups = {n: tuple(sorted(names)) for names in by_inode.values() if len(names) > 1 for n in names}
    return {k: v + (groups.get(k), int(os.lstat(Path(root, k)).st_mtime)) for k, v in out.items()}


def snapshot(path: Path) -> Dict[str, Tuple]:
    """Everything about a directory that a write outside the rootfs could change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [""] + dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, data)
    return out


def apply_to_dir(tmp_path: Path, layers: List[LayerBlob], name: str = "rootfs") -> Path:
    root = tmp_path / name
    root.mkdir()
    write_rootfs_dir(build_tree(layers), root, chown=os.geteuid() == 0)
    return root


# ---- semantics


def test_split_path_clamps_at_root():
    assert split_path("./a//b/./c/") == ["a", "b", "c"]
    assert split_path("/../../etc/passwd") == ["etc", "passwd"]
    assert split_path("a/../../b") == ["b"]
    assert split_path("..") == []


def test_whiteouts_opaque_links_and_modes(tmp_path):
    l1 = make_layer(tmp_path, [
        E("etc", "dir"), E("etc/passwd", data=b"root\n"), E("etc/group", data=b"g\n"),
        E("tmp", "dir", mode=0o1777), E("usr/bin/su", data=b"su", mode=0o4755),
        E("usr/bin/wall", data=b"w", mode=0o2755), E("opt/app/old", data=b"old"), E("opt/app/sub/deep", data=b"d"),
        E("opt/keep", data=b"k"), E("bin", "symlink", link="usr/bin"), E("data/a", data=b"A"),
        E("data/b", "hardlink", link="data/a"),
    ], "gzip")
    l2 = make_layer(tmp_path, [
        E("opt/app", "dir", mode=0o750),
        E("opt/app/.wh..wh..opq"),
        E("opt/app/new", data=b"new"),
        E("etc/.wh.group"),
        E("bin/hl", "hardlink", link="/usr/bin/su"),  # parent symlink followed inside the tree
        E("data/b", data=b"B2"),  # rewriting one name of a hard link must not touch the other
        E(".wh.nonexistent"),
    ], "zstd")
    l3 = make_layer(tmp_path, [E("usr/.wh.bin"), E("usr/bin/only", data=b"o")], "none")
    root = apply_to_dir(tmp_path, [l1, l2, l3])
    t = disk_tree(root)
    assert t["tmp"][:2] == ("dir", 0o1777)
    assert t["opt/app"][:2] == ("dir", 0o750)
    assert not any(k.startswith("opt/app/") and k != "opt/app/new" for k in t)
    assert t["opt/app/new"][4] == b"new" and t["opt/keep"][4] == b"k"
    assert "etc/group" not in t and t["etc/passwd"][4] == b"root\n"
    assert t["bin"][4] == "usr/bin"
    # usr/bin was whited out by layer 3 (with su and the hard link made through the symlink)
    assert sorted(k for k in t if k.startswith("usr/")) == ["usr/bin", "usr/bin/only"]
    assert t["data/a"][4] == b"A" and t["data/b"][4] == b"B2" and t["data/a"][5] is None
    assert not any(".wh." in k for k in t)


def test_setuid_setgid_and_hardlink_through_symlink(tmp_path):
    l1 = make_layer(tmp_path, [E("usr/bin/su", data=b"su", mode=0o4755), E("usr/bin/wall", data=b"w", mode=0o2711),
                               E("bin", "symlink", link="/usr/bin")])
    l2 = make_layer(tmp_path, [E("bin/hl", "hardlink", link="bin/su")], "zstd")
    t = disk_tree(apply_to_dir(tmp_path, [l1, l2]))
    assert t["usr/bin/su"][1] == 0o4755 and t["usr/bin/wall"][1] == 0o2711
    assert t["usr/bin/hl"][5] == ("usr/bin/hl", "usr/bin/su")


def test_same_layer_whiteout_only_hides_lower_entries(tmp_path):
    l1 = make_layer(tmp_path, [E("d/lower", data=b"l"), E("f", data=b"old")])
    # whiteouts *after* the same layer's entries (allowed, though not recommended, by the spec)
    l2 = make_layer(tmp_path, [E("d/upper", data=b"u"), E("d/.wh..wh..opq"), E("f", data=b"new"), E(".wh.f")])
    t = disk_tree(apply_to_dir(tmp_path, [l1, l2]))
    assert "d/lower" not in t and t["d/upper"][4] == b"u" and t["f"][4] == b"new"


def test_type_changes(tmp_path):
    l1 = make_layer(tmp_path, [E("a/x", data=b"x"), E("b", data=b"file"), E("c", "symlink", link="a")])
    l2 = make_layer(tmp_path, [E("a", data=b"now a file"), E("b", "dir"), E("b/y", data=b"y"), E("c", "dir")])
    t = disk_tree(apply_to_dir(tmp_path, [l1, l2]))
    assert t["a"][0] == "file" and "a/x" not in t
    assert t["b"][0] == "dir" and t["b/y"][4] == b"y"
    assert t["c"][0] == "dir"


def test_a_directory_replaced_mid_layer_is_not_written_into(tmp_path):
    """Entries of the same directory in a row reuse its resolved path; once that directory is
    replaced (symlink, file) or removed within the layer, later entries resolve afresh."""
    l1 = make_layer(tmp_path, [E("a", "dir"), E("b", "dir"), E("c", "dir"), E("c/old", data=b"o")])
    l2 = make_layer(tmp_path, [
        E("a/x", data=b"x"), E("a", "symlink", link="b"), E("a/y", data=b"y"),  # a/y lands in b
        E("c/z", data=b"z"), E("c", data=b"now a file"), E("c/w", data=b"w"),  # c/w: parent is a file
    ])
    with pytest.raises(LayerError, match="not a directory"):
        build_tree([l1, l2])
    l3 = make_layer(tmp_path, [E("c/z", data=b"z"), E(".wh.c"), E("c/w", data=b"w"), E("a/x", data=b"x"),
                               E("a", "symlink", link="b"), E("a/y", data=b"y")])
    t = disk_tree(apply_to_dir(tmp_path, [l1, l3]))
    assert t["a"][0] == "symlink" and t["b/y"][4] == b"y" and "a/x" not in t and "b/x" not in t
    assert t["c/w"][4] == b"w" and t["c/z"][4] == b"z" and "c/old" not in t
    # a device node (not created) removes the directory it replaces; e/y then makes a new one
    l4 = make_layer(tmp_path, [E("e/x", data=b"x"), E("e", "chr"), E("e/y", data=b"y")])
    t = disk_tree(apply_to_dir(tmp_path, [l4], "rootfs-e"))
    assert t["e"][0] == "dir" and t["e/y"][4] == b"y" and "e/x" not in t


@pytest.mark.parametrize("compression,media_type", [
    ("gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    ("zstd", "application/vnd.oci.image.layer.v1.tar+gzip"),  # wrong media type: magic bytes win
    ("gzip", "application/vnd.oci.image.layer.v1.tar"),
    ("none", "application/vnd.oci.image.layer.v1.tar+zstd"),
])
def test_compression_detected_by_magic(tmp_path, compression, media_type):
    layer = make_layer(tmp_path, [E("hello", data=b"hi")], compression, media_type)
    assert disk_tree(apply_to_dir(tmp_path, [layer]))["hello"][4] == b"hi"


def test_empty_layer(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    layer = make_layer(tmp_path, [E("x", data=b"1")])
    t = disk_tree(apply_to_dir(tmp_path, [LayerBlob(empty, "", "sha256:empty"), layer]))
    assert list(t) == ["x"]


def test_corrupt_layer_is_one_line_error(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(gzip.compress(b"x" * 4096)[:-20])
    with pytest.raises(LayerError) as ei:
        build_tree([LayerBlob(bad, "application/vnd.oci.image.layer.v1.tar+gzip", "sha256:bad")])
    assert "sha256:bad" in str(ei.value) and "\n" not in str(ei.value)


def test_devices_skipped_with_a_note_fifos_kept(tmp_path):
    l1 = make_layer(tmp_path, [E("dev/null", data=b"was a file")])
    l2 = make_layer(tmp_path, [E("dev/null", "chr"), E("dev/sda", "blk"), E("run/fifo", "fifo", mode=0o620),
                               E("run/fifo2", "hardlink", link="run/fifo"), E("ok", data=b"1")])
    tree = build_tree([l1, l2])
    assert any("skipped 2" in n and l2.digest in n for n in tree.notes)
    root = tmp_path / "rootfs"
    root.mkdir()
    write_rootfs_dir(tree, root, chown=False)
    t = disk_tree(root)
    assert "dev/null" not in t and "dev/sda" not in t and t["ok"][4] == b"1"
    assert t["run/fifo"][:2] == t["run/fifo2"][:2] == ("fifo", 0o620)


# ---- hostile layers: confined or refused, never a write outside the rootfs


@pytest.fixture
def arena(tmp_path):
    """A rootfs-to-be and a sentinel directory next to it that must stay untouched."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_bytes(b"do not touch")
    (sentinel / "sub").mkdir()
    before = snapshot(sentinel)
    yield tmp_path, sentinel
    assert snapshot(sentinel) == before, "something outside the rootfs changed"


def _hostile_cases(sentinel: Path):
    s = str(sentinel)
    return {
        "dotdot": ([[E("../sentinel/evil", data=b"x"), E("../../../../../.." + s + "/evil2", data=b"x")]],
                   {"sentinel/evil": b"x", s.lstrip("/") + "/evil2": b"x"}),
        "absolute": ([[E(s + "/evil", data=b"x"), E("/" + s + "/sub/evil", data=b"y")]],
                     {s.lstrip("/") + "/evil": b"x", s.lstrip("/") + "/sub/evil": b"y"}),
        "symlink_then_write_through": ([[E("evil", "symlink", link=s), E("evil/x", data=b"x"),
                                         E("evil/secret", data=b"overwritten?")]],
                                       {s.lstrip("/") + "/x": b"x", s.lstrip("/") + "/secret": b"overwritten?"}),
        "symlink_in_lower_layer": ([[E("evil", "symlink", link=s + "/sub")], [E("evil/x", data=b"x"), E("evil/.wh.y")]],
                                   {s.lstrip("/") + "/sub/x": b"x"}),
        "dotdot_symlink_chain": ([[E("a/b", "dir"), E("a/b/up", "symlink", link="../../../../.."),
                                   E("a/b/up2", "symlink", link="up/../.."), E("a/b/up2/sentinel/y", data=b"y"),
                                   E("a/b/up/sentinel/z", data=b"z")]],
                                 {"sentinel/y": b"y", "sentinel/z": b"z"}),
        "whiteout_through_symlink": ([[E("evil", "symlink", link=s)], [E("evil/.wh.secret"), E("evil/.wh..wh..opq")]],
                                     {}),
        "hardlink_to_etc_passwd": ([[E("etc/passwd", data=b"image passwd")],
                                    [E("x", "hardlink", link="../../../../etc/passwd"),
                                     E("y", "hardlink", link="/etc/passwd")]],
                                   {"x": b"image passwd", "y": b"image passwd", "etc/passwd": b"image passwd"}),
        "symlink_target_is_data_only": ([[E("link", "symlink", link="/etc/shadow"), E("link2", "symlink", link="../../" + s)]],
                                        {}),
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink_then_write_through", "symlink_in_lower_layer",
                                  "dotdot_symlink_chain", "whiteout_through_symlink", "hardlink_to_etc_passwd",
                                  "symlink_target_is_data_only"])
def test_hostile_layers_are_confined(arena, case):
    tmp_path, sentinel = arena
    layer_entries, expected = _hostile_cases(sentinel)[case]
    layers = [make_layer(tmp_path, entries, "gzip") for entries in layer_entries]
    root = apply_to_dir(tmp_path, layers)
    t = disk_tree(root)
    for rel, data in expected.items():
        assert t[rel][0] == "file" and t[rel][4] == data, rel
    assert (sentinel / "secret").read_bytes() == b"do not touch"
    if case == "hardlink_to_etc_passwd":
        assert t["x"][5] == ("etc/passwd", "x", "y")
    if case == "symlink_target_is_data_only":
        assert t["link"][4] == "/etc/shadow"


@pytest.mark.parametrize("entries,needle", [
    ([E("x", "hardlink", link="../sentinel/secret")], "not in this or a lower layer"),
    ([E("x", "hardlink", link="/nonexistent")], "not in this or a lower layer"),
    ([E("d", "dir"), E("x", "hardlink", link="d")], "hard link to directory"),
    ([E("loop", "symlink", link="loop/x"), E("loop/y", data=b"y")], "too many levels of symbolic links"),
    ([E("a", "symlink", link="b"), E("b", "symlink", link="a"), E("a/f", data=b"f")], "too many levels"),
    ([E("huge", size=1 << 50)], "absurd size"),
    ([E("f", data=b"file"), E("f/child", data=b"x")], "is not a directory"),
    ([E("d/.wh..")], "invalid name"),
    ([E("n" * 300, data=b"x")], "longer than 255"),
    ([E("x", "symlink", link="")], "invalid symlink target"),
])
def test_hostile_layers_are_refused(arena, entries, needle):
    tmp_path, sentinel = arena
    layer = make_layer(tmp_path, entries, "gzip")
    with pytest.raises(LayerError) as ei:
        apply_to_dir(tmp_path, [layer])
    msg = str(ei.value)
    assert needle in msg and layer.digest in msg and "\n" not in msg


def test_truncated_data_is_refused(arena):
    tmp_path, _ = arena
    # declared 10 MiB, but the archive ends right after the header
    layer = make_layer(tmp_path, [E("big", size=10 << 20)], "zstd")
    with pytest.raises(LayerError) as ei:
        apply_to_dir(tmp_path, [layer])
    msg = str(ei.value)
    assert ("truncated" in msg or "unexpected end of data" in msg) and "'big'" in msg and "\n" not in msg


def test_oversized_tar_metadata_is_refused(arena, monkeypatch):
    tmp_path, _ = arena
    from shpc_lite.pull import layers as layers_mod

    monkeypatch.setattr(layers_mod, "MAX_HEADER_READ", 4096)
    layer = make_layer(tmp_path, [E("d/" * 3000 + "f", data=b"x")], "gzip")  # a 6 KB pax path record
    with pytest.raises(LayerError) as ei:
        build_tree([layer])
    assert "too large" in str(ei.value) and layer.digest in str(ei.value)


def test_lookup_follows_symlinks_inside_the_tree(tmp_path):
    tree = build_tree([make_layer(tmp_path, [
        E("run/hosts", data=b"h"), E("etc/hosts", "symlink", link="../run/hosts"), E("tmp", "symlink", link="/var/tmp"),
        E("var/tmp", "dir"), E("x", "symlink", link="y"), E("y", "symlink", link="x"), E("dangling", "symlink", link="/no"),
    ])])
    hosts = tree.lookup("run/hosts")
    assert hosts is not None and tree.lookup("etc/hosts", follow=True).packed() == hosts.packed()  # the same inode
    assert tree.lookup("tmp", follow=True) is tree.lookup("var/tmp")
    assert tree.lookup("tmp/..", follow=True) is tree.lookup("var")
    assert tree.lookup("x", follow=True) is None and tree.lookup("dangling", follow=True) is None
    assert tree.lookup("../../../etc/hosts") is not None


def test_writer_refuses_a_non_empty_rootfs(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "x").write_text("x")
    with pytest.raises(LayerError):
        write_rootfs_dir(build_tree([make_layer(tmp_path, [E("a", data=b"a")])]), root, chown=False)


# ---- sparse files (GNU tar, bsdtar): the content of the file they stand for, holes as zeros

SPARSE_WRITERS = ["gnu", "posix-0.0", "posix-0.1", "posix-1.0", "bsdtar"]


def sparse_sources(src: Path) -> Dict[str, bytes]:
    """Files with holes in the middle, at the end, and nothing but a hole; ``{name: content}``."""
    src.mkdir()
    it.make_sparse_file(src / "holes.bin", 3 << 20, {1 << 20: b"hello", 2_000_000: b"tail" * 3000})
    it.make_sparse_file(src / "lead.bin", 200 << 10, {0: b"x" * 5000})
    it.make_sparse_file(src / "all-hole.bin", 1 << 20, {})
    (src / "after.txt").write_bytes(b"an entry after the sparse ones")
    return {p.name: p.read_bytes() for p in src.iterdir()}


@pytest.mark.parametrize("writer", SPARSE_WRITERS)
def test_sparse_files_from_real_tar_writers(tmp_path, writer):
    expected = sparse_sources(tmp_path / "src")
    raw = it.tar_directory(writer, tmp_path / "src")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:  # the writer really wrote sparse entries
        assert any(m.sparse for m in tf.getmembers() if m.name.endswith("holes.bin"))
    t = disk_tree(apply_to_dir(tmp_path, [blob_from_tar(tmp_path, raw, "gzip")]))
    assert {name: t[name][4] for name in expected} == expected


def _pax_sparse(name: str, pax: Dict[str, str], data: bytes, size: Optional[int] = None) -> bytes:
    """A pax-headed entry carrying GNU sparse records as given (well formed or not) and ``data``."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if size is None else size
    ti.mtime = MTIME
    ti.pax_headers = pax
    return ti.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)


def _old_gnu_sparse(name: str, structs: List[Tuple[int, int]], realsize: int, data: bytes) -> bytes:
    """An old GNU ``S`` entry with up to four map entries in its header."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = tarfile.GNUTYPE_SPARSE, len(data), MTIME
    buf = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    for i, (offset, length) in enumerate(structs):
        field = tarfile.itn(offset, 12, tarfile.GNU_FORMAT) + tarfile.itn(length, 12, tarfile.GNU_FORMAT)
        buf[386 + 24 * i:410 + 24 * i] = field
    buf[483:495] = tarfile.itn(realsize, 12, tarfile.GNU_FORMAT)
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf) + data + b"\0" * (-len(data) % 512)


def _map10(*numbers: int) -> bytes:
    text = "".join(f"{n}\n" for n in numbers).encode()
    return text + b"\0" * (-len(text) % 512)


@pytest.mark.parametrize("raw,needle", [
    (_pax_sparse("overlap", {"GNU.sparse.size": "100", "GNU.sparse.map": "0,10,5,10"}, b"x" * 20),
     "overlap or are out of order"),
    (_pax_sparse("unordered", {"GNU.sparse.size": "100", "GNU.sparse.map": "50,10,0,10"}, b"x" * 20),
     "out of order"),
    (_pax_sparse("beyond", {"GNU.sparse.size": "100", "GNU.sparse.map": "95,10"}, b"x" * 10), "past the size 100"),
    (_pax_sparse("short", {"GNU.sparse.size": "100", "GNU.sparse.map": "0,10"}, b"x" * 20),
     "maps 10 bytes, the entry stores 20"),
    (_pax_sparse("nan", {"GNU.sparse.size": "100", "GNU.sparse.map": "0,1x"}, b"x"), "malformed sparse map value"),
    (_pax_sparse("odd", {"GNU.sparse.size": "100", "GNU.sparse.map": "0,10,20"}, b"x" * 10), "offset without a length"),
    (_pax_sparse("huge", {"GNU.sparse.size": str(1 << 50), "GNU.sparse.map": "0,1"}, b"x"), "absurd size"),
    (_pax_sparse("count", {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
                 _map10(10 ** 9, 0, 1)), "more than 65536 sparse map entries"),
    (_pax_sparse("cut", {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
                 _map10(3, 0, 1)), "malformed sparse map"),
    (_pax_sparse("neg", {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
                 b"1\n-1\n0\n" + b"\0" * 505), "malformed sparse map value b'-1'"),
    (_old_gnu_sparse("oldgnu", [(0, 10), (5, 10)], 100, b"y" * 20), "overlap"),
], ids=["overlap", "unordered", "beyond", "short", "nan", "odd", "huge", "count", "cut", "neg", "oldgnu"])
def test_malformed_sparse_maps_are_refused(tmp_path, request, raw, needle):
    layer = blob_from_tar(tmp_path, raw + tar_bytes([E("next", data=b"n")]), "gzip")
    with pytest.raises(LayerError) as ei:
        build_tree([layer])
    msg = str(ei.value)
    assert needle in msg and layer.digest in msg and "\n" not in msg
    assert f"entry {request.node.callspec.id!r}" in msg  # each case's entry is named as its id


def test_sparse_map_entries_are_capped(tmp_path, monkeypatch):
    from shpc_lite.pull import layers as layers_mod

    monkeypatch.setattr(layers_mod, "MAX_SPARSE_ENTRIES", 4)
    numbers = ",".join(f"{i * 10},1" for i in range(5))
    layer = blob_from_tar(tmp_path, _pax_sparse("many", {"GNU.sparse.size": "100", "GNU.sparse.map": numbers},
                                                b"x" * 5) + b"\0" * 1024)
    with pytest.raises(LayerError) as ei:
        build_tree([layer])
    assert "more than 4 sparse map entries" in str(ei.value) and "'many'" in str(ei.value)


def test_a_huge_sparse_file_streams_in_bounded_memory(tmp_path):
    import tracemalloc

    size = 512 << 20
    src = tmp_path / "src"
    src.mkdir()
    it.make_sparse_file(src / "big.img", size, {0: b"head", size - 4: b"tail"})
    layer = blob_from_tar(tmp_path, it.tar_directory("bsdtar", src), "zstd")

    class Sink:
        """Counts the stream and keeps only its non-zero 512-byte blocks' offsets."""
        def __init__(self) -> None:
            self.pos, self.nonzero = 0, []

        def write(self, chunk: bytes) -> None:
            if chunk.strip(b"\0"):
                self.nonzero.append(self.pos)
            self.pos += len(chunk)

    sink = Sink()
    tracemalloc.start()
    try:
        write_merged_tar(build_tree([layer]), sink)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.pos > size and peak < 16 << 20, peak
    assert len(sink.nonzero) < 10  # headers, "head", "tail": the holes came out as zeros
    # written to a directory (the squashfs build for old mksquashfs), the holes stay holes
    big = apply_to_dir(tmp_path, [layer]) / "big.img"
    assert big.stat().st_size == size and big.stat().st_blocks * 512 < 1 << 20
    with open(big, "rb") as fh:
        assert fh.read(4) == b"head" and fh.seek(size - 4) and fh.read() == b"tail"


# ---- issue 13: fast paths of the merged tar must not change a byte


def test_fast_ustar_headers_are_tarfiles_bytes():
    """The hand-built ustar header equals tarfile's pax writer's output for every shape it takes,
    and long, non-ASCII or out-of-range entries fall back to tarfile (a pax header)."""
    from shpc_lite.pull import layers as L

    checked = fallbacks = 0
    for path in ("a", "usr/bin/x", "x" * 99, "x" * 100, "y" * 101, "with space/f", "é/x", "d/"):
        for kind in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE):
            for uid, gid in ((0, 0), (1000, 5), (8 ** 7 - 1, 8 ** 7), (2 ** 32 - 1, 0)):
                for mode, mtime in ((0o644, 0), (0o4755, MTIME), (0o7777, 2 ** 32 - 1), (0, 8 ** 11)):
                    node = L._File(mode, uid, gid, mtime, 0, 0, 0, 0)
                    for link in ("", "target", "t" * 100, "t" * 101):
                        for size in (0, 1, 8 ** 11 - 1, 8 ** 11):
                            fast = L._fast_header(path, node, kind, link, size)
                            assert fast == L._header(L._tarinfo(path, node, kind, linkname=link, size=size))
                            checked += 1
                            fallbacks += len(fast) > 512
    assert checked == 8 * 5 * 4 * 4 * 4 * 4 and 0 < fallbacks < checked


def test_stdlib_gzip_fallback_gives_the_same_merged_tar(tmp_path, monkeypatch):
    """Gzip layers read with the stdlib (python-isal missing) merge into the same bytes as with isal."""
    from shpc_lite.pull import layers as L

    layers = [
        make_layer(tmp_path, [E("d", "dir"), E("d/a", data=b"a" * 70_000), E("d/gone", data=b"x"),
                              E("big", data=os.urandom(3 << 20), mode=0o600)]),
        make_layer(tmp_path, [E("d/.wh.gone"), E("d/b", data=b"b\n", uid=7, gid=8),
                              E("d/link", "hardlink", link="d/a")], "zstd"),
        make_layer(tmp_path, [E("top", data=b"t" * 513)]),
    ]

    def merged() -> bytes:
        out = io.BytesIO()
        write_merged_tar(build_tree(layers), out)
        return out.getvalue()

    L._GZIP_READER = None
    assert L._gzip_reader_class() is not gzip.GzipFile  # python-isal is a declared dependency
    fast = merged()
    monkeypatch.setattr(L, "_GZIP_READER", gzip.GzipFile)
    assert merged() == fast
    names = tarfile.open(fileobj=io.BytesIO(fast)).getnames()
    assert "d/gone" not in names and {"d/a", "d/b", "d/link", "big", "top"} <= set(names)


# ---- issue 13: bounded read-ahead of headers


def test_layers_larger_than_the_read_ahead_window_merge_the_same(tmp_path, monkeypatch):
    """Readers hand headers over a few at a time and wait for the merge: layers many times that
    window (whiteouts, an opaque dir, hard links to lower layers, a replaced directory) give the
    same merged tar as reading each layer in the merge thread, and the hard links keep all names."""
    from shpc_lite.pull import layers as L

    def layer(i: int) -> LayerBlob:
        entries = [E(f"d{i}/f{j}", data=b"%d-%d" % (i, j)) for j in range(40)]
        if i:
            entries += [E(f"d{i - 1}/.wh.f{j}") for j in range(0, 40, 7)] + [E(f"d{i - 1}/sub/.wh..wh..opq"),
                                                                            E(f"d{i}/ln", "hardlink", link=f"d{i - 1}/f1")]
        entries += [E(f"d{i}/sub/x", data=b"x"), E(f"d{i}/rep", "dir" if i % 2 else "file", data=b"r")]
        return make_layer(tmp_path / str(i), entries, "zstd" if i % 2 else "gzip")

    for i in range(6):
        (tmp_path / str(i)).mkdir()
    layers = [layer(i) for i in range(6)]
    expected = io.BytesIO()
    tree = L.RootfsTree()
    for blob in layers:
        tree.apply_layer(blob)  # read in this thread, no read-ahead
    write_merged_tar(tree, expected)
    monkeypatch.setattr(L, "HEADER_CHUNK", 3)
    monkeypatch.setattr(L, "HEADER_CHUNKS", 2)
    merged = io.BytesIO()
    write_merged_tar(build_tree(iter(layers)), merged)
    assert merged.getvalue() == expected.getvalue()
    with tarfile.open(fileobj=io.BytesIO(merged.getvalue())) as tf:
        names = set(tf.getnames())
    assert {"d4/f1", "d5/ln"} <= names and "d4/f7" not in names and "d3/sub/x" not in names


def test_a_bad_layer_behind_waiting_readers_fails_without_hanging(tmp_path, monkeypatch):
    """A broken layer stops the merge with its one-line error while later readers are blocked on a
    full hand-over (they are cancelled, not waited for forever)."""
    from shpc_lite.pull import layers as L

    monkeypatch.setattr(L, "HEADER_CHUNK", 2)
    monkeypatch.setattr(L, "HEADER_CHUNKS", 1)
    good = [make_layer(tmp_path, [E(f"g{i}/f{j}", data=b"g") for j in range(50)]) for i in range(3)]
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(tar_bytes([E("a", data=b"a" * 600)]))[:-40])
    layers = [good[0], LayerBlob(bad, "application/vnd.oci.image.layer.v1.tar+gzip", "sha256:bad"), *good[1:]]
    with pytest.raises(LayerError, match="sha256:bad"):
        build_tree(iter(layers))


# ---- issue 13: the merge's memory does not grow with the number of files

_PEAK_OF_A_MERGE = r"""
import sys
from shpc_lite.pull.layers import LayerBlob, build_tree, write_merged_tar

class Sink:
    def write(self, chunk):
        pass

with build_tree([LayerBlob(sys.argv[1], "application/vnd.oci.image.layer.v1.tar+gzip", "sha256:x")]) as tree:
    write_merged_tar(tree, Sink())
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def test_the_merge_memory_does_not_grow_with_the_file_count(tmp_path):
    """A pull's merge keeps its files on disk (SQLite, a capped cache), not one object per file: a
    layer of 80,000 files peaks within a few MB of one of 2,000 (one object each cost ~0.3 KB: +23 MB)."""
    import subprocess
    import sys

    peaks = {}
    for files in (2_000, 80_000):
        layer = tmp_path / f"{files}.tar.gz"
        it.many_files_layer(layer, files)
        out = subprocess.run([sys.executable, "-c", _PEAK_OF_A_MERGE, str(layer)], capture_output=True, text=True,
                             timeout=300, check=True).stdout
        peaks[files] = int(out.split()[-1]) / 1024
    assert peaks[80_000] - peaks[2_000] < 6, peaks


def test_the_file_index_is_on_disk_and_a_killed_merge_leaves_nothing(tmp_path):
    """The index's temp file is in SQLITE_TMPDIR while the merge runs, already unlinked: a merge
    killed with SIGKILL leaves nothing there."""
    import signal
    import subprocess
    import sys
    import time

    layer = tmp_path / "many.tar.gz"
    it.many_files_layer(layer, 150_000)
    scratch = tmp_path / "sqlite-tmp"
    scratch.mkdir()
    script = ("import sys, time\nfrom shpc_lite.pull.layers import LayerBlob, build_tree\n"
              "tree = build_tree([LayerBlob(sys.argv[1], '', 'sha256:x')])\nprint('built', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(layer)], env={**os.environ, "SQLITE_TMPDIR": str(scratch)},
                            stdout=subprocess.PIPE, text=True)
    try:
        held = []
        deadline = time.monotonic() + 60
        while not held and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # an fd closed while listed: look again
                for fd in Path(f"/proc/{proc.pid}/fd").iterdir():
                    target = os.readlink(fd)
                    if target.startswith(str(scratch)) and target.endswith(" (deleted)"):
                        held.append(target)
            time.sleep(0.05)
        assert held, "the merge never wrote its index to SQLITE_TMPDIR"
        assert list(scratch.iterdir()) == []  # unlinked as soon as it was opened
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert list(scratch.iterdir()) == []


def test_a_full_temp_dir_for_the_file_index_is_one_line(tmp_path):
    """A temp dir too small for the index (here a 1 MiB file size limit) stops the merge with one
    line saying where the index lives, not an SQLite traceback."""
    import subprocess
    import sys

    layer = tmp_path / "many.tar.gz"
    it.many_files_layer(layer, 80_000)
    script = ("import resource, signal, sys\nfrom shpc_lite.errors import PullError\n"
              "from shpc_lite.pull.layers import LayerBlob, build_tree\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
              "try:\n    build_tree([LayerBlob(sys.argv[1], '', 'sha256:x')])\n"
              "except PullError as err:\n    print(err)\n    sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(layer)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SQLITE_TMPDIR": str(tmp_path)})
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message and "file index" in message and "SQLITE_TMPDIR" in message, message


def test_names_that_are_not_utf8_keep_their_bytes(tmp_path):
    """Tar names are bytes: a Latin-1 name (a file, its directory, a hard link to it, a whiteout
    of it) comes out byte for byte, through the index of files as through the directories."""
    def raw_layer(entries):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
            for name, kind, data, link in entries:
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname, ti.size, ti.mtime = kind, link, len(data), MTIME
                tf.addfile(ti, io.BytesIO(data) if data else None)
        return blob_from_tar(tmp_path, out.getvalue(), "gzip")

    l1 = raw_layer([("dé", tarfile.DIRTYPE, b"", ""), ("dé/café.txt", tarfile.REGTYPE, b"latte", ""),
                    ("dé/lien", tarfile.LNKTYPE, b"", "dé/café.txt"), ("dé/thé.txt", tarfile.REGTYPE, b"tea", "")])
    l2 = raw_layer([("dé/.wh.café.txt", tarfile.REGTYPE, b"", "")])
    root = apply_to_dir(tmp_path, [l1, l2])
    inside = root / os.fsdecode(b"d\xe9")
    assert sorted(os.listdir(os.fsencode(inside))) == [b"lien", b"th\xe9.txt"]
    assert (inside / "lien").read_bytes() == b"latte" and (inside / os.fsdecode(b"th\xe9.txt")).read_bytes() == b"tea"


def test_a_python_without_sqlite3_gets_one_line(tmp_path, monkeypatch):
    from shpc_lite.errors import PullError
    from shpc_lite.pull import layers as L

    monkeypatch.setattr(L, "sqlite3", None)
    with pytest.raises(PullError) as ei:
        build_tree([make_layer(tmp_path, [E("a", data=b"a")])])
    assert "no sqlite3 module" in str(ei.value) and "puller apptainer" in str(ei.value) and "\n" not in str(ei.value)


def test_an_image_of_too_many_entries_is_refused(tmp_path, monkeypatch):
    """Empty tar headers compress about 100x: a small layer could fill the temp dir with index rows."""
    from shpc_lite.pull import layers as L

    monkeypatch.setattr(L, "MAX_ENTRIES", 1000)
    layers = [make_layer(tmp_path, [E(f"d{k}/f{i}") for i in range(600)]) for k in range(2)]
    build_tree(layers[:1])
    with pytest.raises(LayerError) as ei:
        build_tree(layers)
    assert "more than 1,000 entries" in str(ei.value) and layers[1].digest in str(ei.value)
