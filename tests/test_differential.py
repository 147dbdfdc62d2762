"""The builtin puller against the OCI reference unpacker: ``skopeo copy`` + ``umoci unpack``.

The same two layers, written by each tar writer found on real systems (GNU tar ``--format=gnu``
and ``--format=posix --sparse``, bsdtar, busybox tar, Python's tarfile in pax and GNU formats), are
pushed to a real registry, then pulled twice: by
shpc-lite into a SIF, and by skopeo + umoci into a rootfs. The two trees must agree on the set of
paths, their types, symlink targets (byte for byte), file contents, hard-link groups, permission
bits (setuid/setgid/sticky included) and the mtimes of files and symlinks. Not compared: the
root directory itself, what Apptainer adds (``/.singularity.d``, ``/etc/hosts`` ...) and owners
(umoci runs ``--rootless``). Known differences are listed in docs/registries.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from shpc_lite import puller
from shpc_lite.config import load_config
from shpc_lite.oci.reference import parse_reference
from shpc_lite.pull.apptainer_files import apptainer_files
from tests import imagetools as it
from tests.imagetools import sif_tree
from tests.needs import need_tools

MTIME = 1_700_000_000
CERT = "NetLock_Arany_=Class_Gold=_Főtanúsítvány"
SYMLINKS = {
    f"etc/ssl/certs/{CERT}.pem": f"/usr/share/ca-certificates/mozilla/{CERT}.crt",
    "links/abs-long": "/" + "a" * 150,
    "links/abs-unicode": "/é",
    "links/dot": "./x",
    "links/dotdot": "../x",
    "links/dot-long": "./" + "b" * 120,
    "links/dotdot-long": "../" + "c" * 120,
    "links/unicode-long": "ü" * 60,
}
# the hidden layer-2 names, written as plain files by every tar writer
WHITEOUTS = ["wh/.wh.gone", "wh/.wh.gone-dir", "opq/.wh..wh..opq"]
# GNU tar's --format=gnu --sparse is left out: umoci 0.4.7 refuses its old GNU "S" entries
# ("unknown typeflag"); test_layers checks those against the original files instead.
WRITERS = ["gnu-nosparse", "posix", "bsdtar", "busybox", "python-pax", "python-gnu"]

Entry = Tuple  # (kind, ...) as made by tree_state


def _fix_times(root: Path) -> None:
    """Whole-second mtimes everywhere (tar writers differ in how they store fractions)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (MTIME, MTIME), follow_symlinks=False)
    os.utime(root, (MTIME, MTIME))


def _lower_layer(src: Path) -> None:
    """Long, unicode, absolute and relative link targets, sparse files, hard links, odd modes."""
    def put(rel: str, data: bytes = b"", mode: int = 0o644) -> Path:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        return path

    put(f"usr/share/ca-certificates/mozilla/{CERT}.crt", b"-----BEGIN CERTIFICATE-----\n")
    for rel, target in SYMLINKS.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, src / rel)
    put("names/" + "n" * 150, b"long name")
    put("names/café ü.txt", b"unicode name")
    put("deep/" + "/".join(["d" * 90] * 3) + "/file", b"a path of more than 255 bytes")
    os.link(put("hard/a", b"linked"), src / "hard/b")
    os.link(put("hard/" + "ő" * 60, b"long unicode link"), src / ("hard/" + "é" * 70))
    (src / "sparse").mkdir()
    it.make_sparse_file(src / "sparse/holes.bin", 3 << 20, {1 << 20: b"hello", 2_000_000: b"tail" * 3000})
    it.make_sparse_file(src / "sparse/lead.bin", 200 << 10, {0: b"x" * 5000})
    it.make_sparse_file(src / "sparse/all-hole.bin", 1 << 20, {})
    put("modes/su", b"#!", 0o4755)
    put("modes/sgid", b"#!", 0o2711)
    put("modes/private", b"p", 0o600)
    put("modes/exec-only", b"x", 0o100)
    for rel, mode in (("modes/sticky", 0o1777), ("modes/private-dir", 0o700)):
        (src / rel).mkdir()
        (src / rel).chmod(mode)
    os.mkfifo(src / "modes/fifo", 0o620)
    put("wh/gone", b"whited out")
    put("wh/keep", b"kept")
    put("wh/gone-dir/inner", b"whited out with its directory")
    put("opq/old", b"hidden by the opaque marker")
    put("opq/sub/old", b"hidden too")
    _fix_times(src)


def _upper_layer(src: Path) -> None:
    """Whiteouts and an opaque directory over the lower layer, and a name of a hard link replaced."""
    for rel in WHITEOUTS + ["opq/new", "hard/b"]:
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"" if ".wh." in rel else b"upper " + rel.encode())
    _fix_times(src)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Tuple[Path, Path]:
    need_tools("truncate", "dd")
    base = tmp_path_factory.mktemp("differential-src")
    lower, upper = base / "lower", base / "upper"
    lower.mkdir()
    upper.mkdir()
    _lower_layer(lower)
    _upper_layer(upper)
    return lower, upper


def tree_state(root: Path) -> Dict[bytes, Entry]:
    """``{relative path (bytes): (kind, details...)}`` of a directory: modes, contents, link targets,
    mtimes (directories too), extended attribute names, and hard-link groups (of any non-directory)."""
    base = os.fsencode(root)
    out: Dict[bytes, Entry] = {}
    inodes: Dict[int, List[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full), int(st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), int(st.st_mtime))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    digest = hashlib.file_digest(fh, "sha256").hexdigest()[:16]
                out[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_size, digest, int(st.st_mtime))
            else:
                out[rel] = ("other", oct(st.st_mode))
            if not stat.S_ISLNK(st.st_mode) and os.listxattr(full):
                out[rel] += (tuple(sorted(os.listxattr(full))),)
            if not stat.S_ISDIR(st.st_mode):
                inodes.setdefault(st.st_ino, []).append(rel)
    for names in inodes.values():
        if len(names) > 1:
            for name in names:
                out[name] += (tuple(sorted(names)),)
    return out


def apptainer_paths() -> set:
    """What a pull adds to every image (and the directories these live in), as relative bytes paths."""
    added = set()
    for path in apptainer_files({}, source_ref="x", source_digest="y"):
        parts = path.strip("/").split("/")
        added.update(os.fsencode("/".join(parts[:i])) for i in range(1, len(parts) + 1))
    return added


def reference_unpack(registry, ref: str, work: Path) -> Path:
    """``skopeo copy`` the image into an OCI layout, ``umoci unpack --rootless`` it; the rootfs."""
    need_tools("skopeo", "umoci")
    work.mkdir(parents=True, exist_ok=True)
    policy = work / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    layout = work / "oci"
    for argv in (["skopeo", "--policy", str(policy), "copy", "--quiet", "--src-tls-verify=false",
                  f"docker://{ref}", f"oci:{layout}:ref"],
                 ["umoci", "unpack", "--rootless", "--image", f"{layout}:ref", str(work / "bundle")]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{argv[0]} failed: {proc.stderr}"
    return work / "bundle" / "rootfs"


def builtin_pull(registry, repo: str, work: Path) -> Path:
    """Pull with shpc-lite's builtin puller; the SIF's squashfs partition, extracted."""
    need_tools("mksquashfs", "unsquashfs")
    config = load_config({"root": str(work / "shpc"), "puller": "builtin"}, environ={})
    stored = puller.pull(config, parse_reference(f"{registry.host}/{repo}:1"), quiet=True, client=registry.client())
    _, out = sif_tree(stored.path, work)
    return out


def differing(ours: Dict[bytes, Entry], reference: Dict[bytes, Entry]) -> Dict[bytes, Tuple[Optional[Entry], ...]]:
    """``{path: (builtin's entry, umoci's entry)}`` for every path that differs, Apptainer's additions aside."""
    extra = apptainer_paths()
    return {path: (ours.get(path), reference.get(path)) for path in sorted(set(ours) | set(reference))
            if ours.get(path) != reference.get(path) and not (path not in reference and path in extra)}


def differences(ours: Dict[bytes, Entry], reference: Dict[bytes, Entry]) -> List[str]:
    """Readable lines for every path that differs (Apptainer's own additions aside)."""
    return [f"{path!r}: builtin {mine} / umoci {theirs}" for path, (mine, theirs) in differing(ours, reference).items()]


def pull_both(registry, repo: str, layers: List[it.Layer], work: Path) -> Tuple[Dict[bytes, Entry], Dict[bytes, Entry]]:
    """Push an image of ``layers``; the trees the builtin puller and skopeo + umoci make of it."""
    registry.pusher().push_image(repo, it.make_image(layers, oci=True), tags=["1"])
    ours = tree_state(builtin_pull(registry, repo, work / "builtin"))
    return ours, tree_state(reference_unpack(registry, f"{registry.host}/{repo}:1", work / "umoci"))


@pytest.mark.parametrize("writer", WRITERS)
def test_builtin_pull_matches_umoci(registry, unique_repo, sources, tmp_path, writer):
    lower, upper = sources
    layers = [it.layer_from_tar(it.tar_directory(writer, src), "gzip") for src in (lower, upper)]
    ours, reference = pull_both(registry, unique_repo, layers, tmp_path)
    assert differences(ours, reference) == []
    # the comparison saw what it is about (an empty or failed unpack on both sides would also agree)
    assert reference[os.fsencode(f"etc/ssl/certs/{CERT}.pem")][1] == os.fsencode(SYMLINKS[f"etc/ssl/certs/{CERT}.pem"])
    assert reference[b"sparse/holes.bin"][2] == 3 << 20 and reference[b"modes/su"][1] == oct(0o4755)
    assert b"wh/gone" not in reference and b"opq/old" not in reference and b"opq/new" in reference
    assert not any(b".wh." in p for p in ours)


def _raw(path: str, kind: bytes, data: bytes = b"", pax: Optional[Dict[str, str]] = None) -> it.Raw:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.mtime, info.size = kind, 0o644, MTIME, len(data)
    info.devmajor, info.devminor = 1, 3
    info.pax_headers = dict(pax or {})
    return it.Raw(info, data)


def test_documented_differences_from_umoci(registry, unique_repo, tmp_path):
    """Exactly the differences docs/registries.md lists ("Differences from umoci"), no more."""
    caps = "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12  # cap_net_raw+p, as on ping
    layer = it.make_layer([
        it.Dir("dev", mtime=MTIME), _raw("dev/null", tarfile.CHRTYPE), _raw("dev/sda", tarfile.BLKTYPE),
        it.Dir("run", mtime=MTIME), _raw("run/fifo", tarfile.FIFOTYPE), it.Hardlink("run/fifo2", "run/fifo"),
        it.Dir("d", mtime=MTIME), it.File("d/f", b"f"), it.Symlink("d/s", "f"), it.Hardlink("d/s-hard", "d/s"),
        it.Dir("bin", mtime=MTIME),
        _raw("bin/ping", tarfile.REGTYPE, b"elf", {"SCHILY.xattr.security.capability": caps,
                                                    "SCHILY.xattr.user.note": "kept by umoci"}),
    ], "gzip")
    ours, reference = pull_both(registry, unique_repo, [layer], tmp_path)
    diff = differing(ours, reference)
    empty = hashlib.sha256(b"").hexdigest()[:16]
    assert set(diff) == {b"dev/null", b"dev/sda", b"d/s", b"d/s-hard", b"run/fifo", b"run/fifo2", b"bin/ping"}, diff
    # FIFOs: kept, as umoci does, but a hard link to one is a second FIFO here
    assert stat.S_ISFIFO(int(ours[b"run/fifo"][1], 8)) and ours[b"run/fifo2"] == ours[b"run/fifo"]
    assert reference[b"run/fifo2"] == ours[b"run/fifo2"] + ((b"run/fifo", b"run/fifo2"),)
    # device nodes: not created here; umoci --rootless cannot mknod and leaves empty files
    assert diff[b"dev/null"] == diff[b"dev/sda"] == (None, ("file", "0o644", 0, empty, MTIME))
    # a hard link to a symlink: a second symlink here, the same inode in umoci
    assert diff[b"d/s-hard"] == (("symlink", b"f", MTIME), ("symlink", b"f", MTIME, (b"d/s", b"d/s-hard")))
    # extended attributes (file capabilities included): not kept here
    assert diff[b"bin/ping"][0] == ("file", "0o644", 3, hashlib.sha256(b"elf").hexdigest()[:16], MTIME)
    assert diff[b"bin/ping"][1] == diff[b"bin/ping"][0] + (("security.capability", "user.note"),)


def test_layer_semantics_match_umoci(registry, unique_repo, tmp_path):
    """Whiteout, opaque-directory, type-change and link cases across three layers, as umoci applies them."""
    layers = [
        it.make_layer([
            it.Dir("a"), it.File("a/old", "a"), it.Dir("keep"), it.File("keep/x", "x"), it.File("keep/y", "y"),
            it.Dir("usr"), it.Dir("usr/lib"), it.File("usr/lib/libc", "c"), it.Symlink("lib", "usr/lib"),
            it.Dir("etc"), it.Dir("usr/etc"), it.Symlink("etc/alt", "/usr/etc"), it.File("shared", "s"),
            it.Dir("o"), it.File("o/lower", "l"), it.Dir("o/sub"), it.File("o/sub/deep", "d"),
            it.Dir("modes", 0o755), it.File("redo", "first"),
        ]),
        it.make_layer([
            it.File("a", "a is a file now"),  # a directory replaced by a file
            it.File("lib/x", "through the symlink"), it.File("etc/alt/conf", "through an absolute symlink"),
            it.Hardlink("keep/hard", "shared"), it.Whiteout("keep/y"),
            it.Dir("o"), it.File("o/before", "b"), it.Opaque("o"), it.File("o/after", "a"),
            it.Dir("modes", 0o700, mtime=1_600_000_000),
            it.Whiteout("redo"), it.File("redo", "second"),  # whited out and made again in one layer
        ]),  # (not zstd: umoci 0.4.7 cannot read zstd layers)
        it.make_layer([
            it.Dir("a"), it.File("a/new", "a is a directory again"), it.Whiteout("shared"),
            it.Symlink("o/sub", "../keep"),
        ], None),
    ]
    ours, reference = pull_both(registry, unique_repo, layers, tmp_path)
    assert differences(ours, reference) == []
    assert reference[b"usr/lib/x"][0] == "file" and reference[b"usr/etc/conf"][0] == "file"
    assert b"shared" not in reference and reference[b"keep/hard"][0] == "file"
    assert {p for p in reference if p.startswith(b"o/")} == {b"o/before", b"o/after", b"o/sub"}
