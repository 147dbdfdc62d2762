"""Squashfs builds (merged tar stream, rootfs directory, native writer) checked with unsquashfs; Apptainer's files.

The native writer is compared with ``mksquashfs -tar`` at length in tests/test_squashfs_native.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest

from shpc_lite.errors import LayerError, PullError
from shpc_lite.pull import apptainer_files, build_squashfs, compression_args
from shpc_lite.pull.apptainer_files import env_script, runscript
from tests import imagetools as it
from tests.needs import missing, need_tools
from tests.test_layers import E, blob_from_tar, disk_tree, make_layer, snapshot, sparse_sources



@pytest.fixture(autouse=True)
def _squashfs_tools():
    need_tools("mksquashfs", "unsquashfs")  # squashfs-tools: a failure under CI=true, a skip elsewhere

CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "created": "2024-05-01T10:00:00.123456789Z",
    "config": {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "TRICKY=a\\b\"c`d$e 'f'", "1BAD=x",
                "BAD-NAME=y", "NOEQUALS"],
        "Entrypoint": ["/usr/bin/env", "x y"],
        "Cmd": ["--flag", "it's"],
        "WorkingDir": "/srv/app",
        "Labels": {"maintainer": "someone", "org.opencontainers.image.version": "1.2"},
    },
}


def listing(sqfs: Path) -> Dict[str, Tuple[str, str, str]]:
    """``{path: (mode string, uid/gid, symlink target, time)}`` from ``unsquashfs -lln``."""
    out = subprocess.run(["unsquashfs", "-lln", "-UTC", str(sqfs)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        m = re.match(r"^(\S{10}) (\d+/\d+)\s+\d+ (\S+ \S+) squashfs-root/?(.*?)(?: -> (.*))?$", line)
        if m:
            when = m.group(3) if m.group(4) else None  # the root's time is "now" with -tar (4.5.1)
            result[m.group(4)] = (m.group(1), m.group(2), m.group(5), when)
    return result


def extract(sqfs: Path, dest: Path) -> Dict[str, Tuple]:
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(dest), str(sqfs)], check=True, capture_output=True)
    return disk_tree(dest)


@pytest.fixture
def image(tmp_path):
    d = tmp_path / "blobs"
    d.mkdir()
    layers = [
        make_layer(d, [
            E("etc", "dir"), E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"), E("etc/group", data=b"g\n"),
            E("tmp", "dir", mode=0o1777), E("usr/bin/su", data=b"#su", mode=0o4755, uid=0, gid=0),
            E("usr/bin/wall", data=b"#wall", mode=0o2755, gid=5), E("opt/app/old", data=b"old"),
            E("opt/app/sub/deep", data=b"deep"), E("bin", "symlink", link="usr/bin"),
            E("home/user", "dir", mode=0o700, uid=1000, gid=1000), E("home/user/.profile", data=b"p", uid=1000, gid=1000),
            E("data/a", data=b"A" * 5000), E("data/b", "hardlink", link="data/a"), E("srv/app", "dir"),
        ], "gzip"),
        make_layer(d, [
            E("opt/app", "dir", mode=0o750), E("opt/app/.wh..wh..opq"), E("opt/app/new", data=b"new"),
            E("etc/.wh.group"), E("bin/hl", "hardlink", link="/usr/bin/su"), E("data/c", "hardlink", link="data/a"),
            E("data/b", data=b"B2"), E("secret", data=b"s", mode=0o000), E("locked", "dir", mode=0o555),
            E("locked/f", data=b"f", mode=0o400), E("usr/share/café ü.txt", data=b"u"),
            E("usr/share/we ird'\"$\\name", data=b"w", mode=0o000), E("usr/share/sub dir", "dir", mode=0o311),
        ], "zstd"),
        make_layer(d, [E("usr/bin/.wh.wall"), E("dev/console", "chr"), E("run/pipe", "fifo", mode=0o620)], "none"),
    ]
    return layers


def _build(layers, tmp_path, method, **kw) -> Path:
    dest = tmp_path / f"{method}.sqfs"
    used = build_squashfs(layers, CONFIG, dest, source_ref="docker.io/library/demo:1", source_digest="sha256:feed",
                          workdir=tmp_path / "work", method=method, **kw)
    assert used == method and dest.is_file()
    return dest


def test_all_paths_build_the_same_expected_tree(image, tmp_path):
    trees, lists = {}, {}
    as_root = os.geteuid() == 0  # only root can keep the image's owners in a rootfs directory
    for method in ("tar", "dir", "native"):
        sqfs = _build(image, tmp_path, method, preserve_owners=as_root)
        lists[method] = listing(sqfs)
        trees[method] = extract(sqfs, tmp_path / f"x-{method}")
    assert lists["tar"] == lists["dir"] == lists["native"]
    assert trees["tar"] == trees["dir"] == trees["native"]
    ls, t = lists["tar"], trees["tar"]
    assert ls[""][0] == "drwxr-xr-x"
    assert ls["tmp"][0] == "drwxrwxrwt" and ls["var/tmp"][0] == "drwxrwxrwt"
    assert ls["usr/bin/su"][0] == "-rwsr-xr-x" and ls["usr/bin/hl"][0] == "-rwsr-xr-x"
    assert "usr/bin/wall" not in ls and "etc/group" not in ls and "dev/console" not in ls
    assert ls["run/pipe"][0] == "prw--w----" and t["run/pipe"][0] == "fifo"
    assert ls["home/user"][:3] == ("drwx------", "1000/1000" if as_root else "0/0", None)
    assert ls["home/user"][3] == "2023-11-14 22:13" and ls["singularity"][3] == "2024-05-01 10:00"
    assert ls["secret"][0] == "----------" and ls["locked"][0] == "dr-xr-xr-x" and ls["locked/f"][0] == "-r--------"
    assert ls["opt/app"][0] == "drwxr-x---"
    assert ls["usr/share/café ü.txt"][0] == "-rw-r--r--"
    assert ls["usr/share/we ird'\"$\\name"][0] == "----------" and ls["usr/share/sub dir"][0] == "d-wx--x--x"
    assert sorted(k for k in ls if k.startswith("opt/app/")) == ["opt/app/new"]
    assert ls["bin"][2] == "usr/bin"
    assert not any(".wh." in k for k in ls)
    assert t["usr/bin/hl"][5] == ("usr/bin/hl", "usr/bin/su")
    assert t["data/a"][5] == ("data/a", "data/c") and t["data/b"][4] == b"B2" and t["data/a"][4] == b"A" * 5000
    # what Apptainer expects
    for d in (".singularity.d/libs", ".singularity.d/actions", ".singularity.d/env", "dev", "proc", "root", "sys",
              "home", "etc", "var/tmp"):
        assert ls[d][0].startswith("d"), d
    assert t["etc/hosts"][4] == b"" and t["etc/resolv.conf"][4] == b""
    assert ls["singularity"][2] == ".singularity.d/runscript"
    assert ls["environment"][2] == ".singularity.d/env/90-environment.sh"
    assert ls[".singularity.d/runscript"][0] == "-rwxr-xr-x"
    labels = json.loads(t[".singularity.d/labels.json"][4])
    assert labels == {"maintainer": "someone", "org.opencontainers.image.version": "1.2",
                      "org.opencontainers.image.base.name": "docker.io/library/demo:1",
                      "org.opencontainers.image.base.digest": "sha256:feed"}
    files = apptainer_files(CONFIG, source_ref="docker.io/library/demo:1", source_digest="sha256:feed")
    for path in (".singularity.d/env/10-docker2singularity.sh", ".singularity.d/env/90-environment.sh",
                 ".singularity.d/runscript"):
        assert t[path][4] == files[path].data


@pytest.mark.parametrize("method", ["tar", "native"])
def test_existing_paths_are_kept(tmp_path, method):
    layers = [make_layer(tmp_path, [E("tmp", "symlink", link="var/tmp"), E("var/tmp", "dir", mode=0o1777),
                                    E("etc/hosts", data=b"127.0.0.1 localhost\n"), E("home", "dir", mode=0o711),
                                    E("run/resolv.conf", data=b"nameserver 1.1.1.1\n"),
                                    E("etc/resolv.conf", "symlink", link="../run/resolv.conf"),
                                    E("proc", "symlink", link="/nowhere")])]
    ls = listing(_build(layers, tmp_path, method))
    assert ls["tmp"][2] == "var/tmp" and ls["home"][0] == "drwx--x--x"
    assert ls["etc/resolv.conf"][2] == "../run/resolv.conf"
    assert ls["proc"][0] == "drwxr-xr-x"  # a dangling symlink is no mount point: replaced
    t = extract(tmp_path / f"{method}.sqfs", tmp_path / "x")
    assert t["etc/hosts"][4] == b"127.0.0.1 localhost\n"


@pytest.mark.parametrize("method", ["tar", "dir", "native"])
def test_owners_can_be_dropped(image, tmp_path, method):
    ls = listing(_build(image, tmp_path, method, preserve_owners=False))
    assert {v[1] for v in ls.values()} == {"0/0"}
    if method != "dir":  # the stream methods keep owners without root
        assert listing(_build(image, tmp_path, method, preserve_owners=True))["home/user"][1] == "1000/1000"
    assert ls["usr/bin/su"][0] == "-rwsr-xr-x" and ls["secret"][0] == "----------"


@pytest.mark.parametrize("compression,level", [("gzip", 1), ("xz", None), ("lz4", None), ("zstd", 1)])
def test_other_compressors(tmp_path, compression, level):
    layers = [make_layer(tmp_path, [E("f", data=b"hello" * 100)])]
    sqfs = _build(layers, tmp_path, "tar", compression=compression, level=level, processors=1)
    out = subprocess.run(["unsquashfs", "-s", str(sqfs)], capture_output=True, text=True).stdout
    assert f"Compression {compression}" in out


@pytest.mark.parametrize("compression,level", [("gzip", 1), ("gzip", None), ("zstd", 1), ("zstd", None),
                                               ("zstd", 19)])
def test_native_compressors(tmp_path, compression, level):
    """The native writer compresses with what was asked (``unsquashfs -s`` says so) at any level."""
    data = b"hello" * 30_000 + os.urandom(1000)
    layers = [make_layer(tmp_path, [E("f", data=data), E("small", data=b"tiny")])]
    sqfs = _build(layers, tmp_path, "native", compression=compression, level=level)
    out = subprocess.run(["unsquashfs", "-s", str(sqfs)], capture_output=True, text=True).stdout
    assert f"Compression {compression}" in out
    t = extract(sqfs, tmp_path / "x")
    assert t["f"][4] == data and t["small"][4] == b"tiny"
    assert sqfs.stat().st_size < 20_000  # compressed, not stored


@pytest.mark.parametrize("compression", ["xz", "lz4", "lzo"])
def test_native_refuses_other_compressors(tmp_path, compression):
    """Only zstd and gzip are written natively: another compressor is one line, before any layer is
    read; ``auto`` takes mksquashfs for them."""
    layers = [make_layer(tmp_path, [E("f", data=b"x")])]
    dest = tmp_path / "o.sqfs"
    taken = []

    def downloads():  # as the puller passes them: each layer once it has arrived
        for layer in layers:
            taken.append(layer)
            yield layer

    with pytest.raises(PullError) as ei:
        build_squashfs(downloads(), CONFIG, dest, source_ref="r", source_digest="d", workdir=tmp_path / "w",
                       method="native", compression=compression)
    assert compression in str(ei.value) and "\n" not in str(ei.value) and not dest.exists()
    assert taken == []  # refused before waiting for a download
    assert build_squashfs(layers, CONFIG, dest, source_ref="r", source_digest="d", workdir=tmp_path / "w",
                          method="auto", compression=compression) == "tar"
    assert f"Compression {compression}" in subprocess.run(["unsquashfs", "-s", str(dest)], capture_output=True,
                                                           text=True).stdout


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_auto_is_native_and_needs_no_mksquashfs(tmp_path, compression):
    """``auto`` writes zstd and gzip images itself: a host without squashfs-tools can still pull."""
    layers = [make_layer(tmp_path, [E("f", data=b"x" * 1000)])]
    dest = tmp_path / "o.sqfs"
    used = build_squashfs(layers, CONFIG, dest, source_ref="r", source_digest="d", workdir=tmp_path / "w",
                          method="auto", compression=compression, mksquashfs=str(tmp_path / "no-mksquashfs"))
    assert used == "native"
    assert extract(dest, tmp_path / "x")["f"][4] == b"x" * 1000


def test_compression_args():
    assert compression_args("zstd", None) == ["-comp", "zstd", "-Xcompression-level", "3"]
    assert compression_args("gzip", None) == ["-comp", "gzip", "-Xcompression-level", "9"]
    assert compression_args("lz4", 9) == ["-comp", "lz4", "-Xhc"]
    assert compression_args("xz", None) == ["-comp", "xz"]
    for bad in (("zstd", 23), ("gzip", 0), ("brotli", None)):
        with pytest.raises(PullError):
            compression_args(*bad)


@pytest.mark.parametrize("method", ["tar", "dir", "native"])
def test_hostile_layer_fails_the_build_cleanly(tmp_path, method):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_text("keep")
    before = snapshot(sentinel)
    ok = make_layer(tmp_path, [E("evil", "symlink", link=str(sentinel)), E("evil/x", data=b"x"),
                               E("../sentinel/y", data=b"y")])
    sqfs = _build([ok], tmp_path, method)
    t = extract(sqfs, tmp_path / "x")
    assert t[str(sentinel).lstrip("/") + "/x"][4] == b"x" and t["sentinel/y"][4] == b"y"
    bad = make_layer(tmp_path, [E("x", "hardlink", link="../sentinel/secret")])
    dest = tmp_path / "bad.sqfs"
    with pytest.raises(LayerError) as ei:
        build_squashfs([ok, bad], CONFIG, dest, source_ref="r", source_digest="d", workdir=tmp_path / "w",
                       method=method)
    assert bad.digest in str(ei.value) and "'x'" in str(ei.value) and "\n" not in str(ei.value)
    assert not dest.exists()
    assert snapshot(sentinel) == before


def test_truncated_layer_during_streaming_kills_mksquashfs(tmp_path, monkeypatch):
    layer = make_layer(tmp_path, [E("f", data=b"x" * 100_000)], "none")
    from shpc_lite.pull import layers as layers_mod

    real = layers_mod._copy_exact

    def short(reader, size, write, label, name):  # the blob changes between the two passes
        real(reader, size // 2, write, label, name)
        raise LayerError(f"layer {label}: entry {name!r}: data truncated")

    monkeypatch.setattr(layers_mod, "_copy_exact", short)
    dest = tmp_path / "t.sqfs"
    with pytest.raises(LayerError):
        build_squashfs([layer], CONFIG, dest, source_ref="r", source_digest="d", workdir=tmp_path / "w", method="tar")
    assert not dest.exists()


def test_truncated_layer_during_native_write_names_the_layer(tmp_path, monkeypatch):
    """The blob changes between the merge (headers) and the data pass: the native writer stops with
    the layer's one-line LayerError and leaves neither the image nor scratch files behind."""
    layer = make_layer(tmp_path, [E("f", data=os.urandom(300_000)), E("g", data=b"after")], "none")
    from shpc_lite.pull import squashfs as squashfs_mod

    real = squashfs_mod.build_tree

    def merge_then_cut(*args, **kwargs):
        tree = real(*args, **kwargs)
        cut = layer.path.with_suffix(".cut")
        cut.write_bytes(layer.path.read_bytes()[:512 + 150_000])  # f's header and half its data
        os.replace(cut, layer.path)
        return tree

    monkeypatch.setattr(squashfs_mod, "build_tree", merge_then_cut)
    whole = layer.path.read_bytes()
    dest = tmp_path / "t.sqfs"
    for offset in (0, 4096):  # a plain image, and one in place in a SIF
        layer.path.write_bytes(whole)
        with pytest.raises(LayerError) as ei:
            build_squashfs([layer], CONFIG, dest, source_ref="r", source_digest="d", workdir=tmp_path / "w",
                           method="native", offset=offset)
        msg = str(ei.value)
        assert layer.digest in msg and "'f'" in msg and "\n" not in msg, msg
        assert not dest.exists() and list((tmp_path / "w").iterdir()) == []


def test_native_write_failures_are_one_line(tmp_path):
    """A destination that cannot be written and a work dir that is a file: one PullError line each."""
    layer = make_layer(tmp_path, [E("f", data=b"x")])
    with pytest.raises(PullError) as ei:
        build_squashfs([layer], CONFIG, tmp_path / "missing-dir" / "o.sqfs", source_ref="r", source_digest="d",
                       workdir=tmp_path / "w", method="native")
    assert "\n" not in str(ei.value) and "o.sqfs" in str(ei.value)
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(PullError) as ei:
        build_squashfs([layer], CONFIG, tmp_path / "o.sqfs", source_ref="r", source_digest="d",
                       workdir=tmp_path / "not-a-dir", method="native")
    assert "\n" not in str(ei.value) and not (tmp_path / "o.sqfs").exists()


def test_a_full_disk_during_a_native_write_is_one_line_and_leaves_nothing(tmp_path):
    """The image's data blocks are written by a thread of their own: a write that fails there (here
    a 2 MiB file size limit standing for a full disk, with 6 MB of random data to write) still
    stops the build with one line, and the half-written image is removed."""
    import sys

    layer = make_layer(tmp_path, [E("big", data=os.urandom(6 << 20)), E("small", data=b"s")])
    dest = tmp_path / "o.sqfs"
    script = ("import resource, signal, sys\nfrom pathlib import Path\nfrom shpc_lite.errors import PullError\n"
              "from shpc_lite.pull import LayerBlob, build_squashfs\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))\n"
              "try:\n    build_squashfs([LayerBlob(Path(sys.argv[1]), '', 'sha256:x')], {}, Path(sys.argv[2]),\n"
              "                   source_ref='site/img:1', source_digest='d', workdir=Path(sys.argv[3]), method='native')\n"
              "except PullError as err:\n    print(err)\n    sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(layer.path), str(dest), str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message and "o.sqfs" in message and "File too large" in message, message
    assert not dest.exists()
    assert not (tmp_path / "w").exists() or list((tmp_path / "w").iterdir()) == []


def test_mksquashfs_failure_is_a_pull_error(tmp_path):
    layer = make_layer(tmp_path, [E("f", data=b"x")])
    with pytest.raises(PullError) as ei:
        build_squashfs([layer], CONFIG, tmp_path / "missing-dir" / "o.sqfs", source_ref="r", source_digest="d",
                       workdir=tmp_path / "w", method="tar")
    assert "mksquashfs failed" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(PullError):
        build_squashfs([layer], CONFIG, tmp_path / "o.sqfs", source_ref="r", source_digest="d",
                       workdir=tmp_path / "w", method="bogus")
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(PullError) as ei:
        build_squashfs([layer], CONFIG, tmp_path / "o.sqfs", source_ref="r", source_digest="d",
                       workdir=tmp_path / "not-a-dir", method="dir")
    assert "\n" not in str(ei.value)


# ---- the generated files


def test_apptainer_files_are_pure_and_complete():
    files = apptainer_files(CONFIG, source_ref="docker.io/library/demo:1", source_digest="sha256:feed")
    assert files == apptainer_files(CONFIG, source_ref="docker.io/library/demo:1", source_digest="sha256:feed")
    assert files["tmp"].mode == 0o1777 and files["tmp"].only_if_absent
    assert files["singularity"].kind == "symlink" and files["singularity"].data == b".singularity.d/runscript"
    env = files[".singularity.d/env/10-docker2singularity.sh"].data.decode()
    assert 'export PATH="/usr/local/bin:/usr/bin:/bin"\n' in env
    assert 'export LANG="${LANG:-"C.UTF-8"}"\n' in env
    assert 'export TRICKY="${TRICKY:-"a\\\\b\\"c\\`d\\$e \'f\'"}"\n' in env
    assert "1BAD" not in env and "BAD-NAME" not in env and "NOEQUALS" not in env
    assert files[".singularity.d/runscript"].data.decode().startswith("#!/bin/sh\n")
    # the inner config alone works too
    assert apptainer_files(CONFIG["config"], source_ref="a", source_digest="b")[".singularity.d/runscript"] == \
        files[".singularity.d/runscript"]


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_env_script_round_trips_in_shells(tmp_path, shell):
    if shutil.which(shell) is None:
        missing(f"no {shell}")
    values = {"A": "plain", "B": 'q"uo\\te', "C": "`date` $(id) $HOME ${X}", "D": "it's\nmultiline", "E": ""}
    script = tmp_path / "env.sh"
    script.write_text(env_script([f"{k}={v}" for k, v in values.items()] + ["PATH=/x:/y", "A=last wins"]))
    probe = "; ".join(f'printf "%s\\0" "${k}"' for k in list(values) + ["PATH"])
    out = subprocess.run(["env", "-i", shell, "-c", f". {script}; {probe}"], capture_output=True, check=True).stdout
    got = out.decode().split("\0")[:-1]
    assert got == ["last wins"] + list(values.values())[1:] + ["/x:/y"]
    # set variables win over the image's defaults, except PATH
    out = subprocess.run(["env", "-i", "A=mine", "PATH=/bin:/usr/bin", shell, "-c", f". {script}; {probe}"],
                         capture_output=True, check=True).stdout
    assert out.decode().split("\0")[0] == "mine" and out.decode().split("\0")[-2] == "/x:/y"


def test_runscript_runs_entrypoint_cmd_and_args(tmp_path):
    work = tmp_path / "w d"
    work.mkdir()
    script = tmp_path / "runscript"
    script.write_text(runscript(["printf", "[%s]"], ["a b", "$HOME", "it's"], str(work)))
    script.chmod(0o755)
    assert subprocess.run([str(script)], capture_output=True, text=True).stdout == "[a b][$HOME][it's]"
    assert subprocess.run([str(script), "x", "y z"], capture_output=True, text=True).stdout == "[x][y z]"
    script.write_text(runscript(None, ["pwd"], str(work)))
    assert subprocess.run([str(script)], capture_output=True, text=True).stdout.strip() == str(work)
    assert subprocess.run([str(script), "echo", "hi"], capture_output=True, text=True).stdout == "hi\n"
    script.write_text(runscript(["echo", "ep"], None))
    assert subprocess.run([str(script)], capture_output=True, text=True).stdout == "ep\n"
    assert subprocess.run([str(script), "1"], capture_output=True, text=True).stdout == "ep 1\n"


# ---- what mksquashfs -tar would mangle (squashfs-tools 4.5.1 strips "/", "./", "../" from pax link paths)

CERT = "NetLock_Arany_=Class_Gold=_Főtanúsítvány"
LINKS = {  # symlink -> target, each to be stored byte for byte
    f"etc/ssl/certs/{CERT}.pem": f"/usr/share/ca-certificates/mozilla/{CERT}.crt",  # Debian's ca-certificates
    "l/abs-long": "/" + "a" * 150,
    "l/abs-unicode": "/é",
    "l/dot-long": "./" + "b" * 120,
    "l/dotdot-long": "../" + "c" * 120,
    "l/dotdot-unicode": "../ü",
    "l/abs-99": "/" + "d" * 98,
    "l/abs-100": "/" + "e" * 99,
    "l/abs-101": "/" + "f" * 100,
    "l/dots-inside": "/usr/./lib/../" + "g" * 100,
    "l/not-utf8": "/bad\udcffname/" + "h" * 100,  # a raw 0xff byte (surrogateescape)
    "l/short": "../x",
}
LONG_NAME = "hard/" + "ő" * 60  # 120 bytes of UTF-8: a pax path, and a pax link path for its hard links
DEEP = "deep/" + "/".join(["ü" * 60] * 5) + "/f"  # a path of more than 600 bytes


@pytest.mark.parametrize("method", ["tar", "dir", "native"])
def test_link_targets_and_long_names_are_stored_verbatim(tmp_path, method):
    layers = [make_layer(tmp_path, [
        E(f"usr/share/ca-certificates/mozilla/{CERT}.crt", data=b"cert"),
        *[E(path, "symlink", link=target) for path, target in LINKS.items()],
        E(LONG_NAME, data=b"H"), E("hard/short", "hardlink", link=LONG_NAME),
        E("hard/" + "é" * 70, "hardlink", link="hard/short"), E(DEEP, data=b"deep"),
    ])]
    t = extract(_build(layers, tmp_path, method), tmp_path / "x")
    assert {path: t[path][4] for path in LINKS} == LINKS
    assert t[LONG_NAME][5] == tuple(sorted([LONG_NAME, "hard/short", "hard/" + "é" * 70]))
    assert t[DEEP][4] == b"deep"


@pytest.mark.parametrize("writer,method", [("gnu", "tar"), ("bsdtar", "tar"), ("bsdtar", "dir"), ("gnu", "native"),
                                           ("bsdtar", "native")])
def test_sparse_files_in_the_squashfs(tmp_path, writer, method):
    expected = sparse_sources(tmp_path / "src")
    layer = blob_from_tar(tmp_path, it.tar_directory(writer, tmp_path / "src"), "zstd")
    t = extract(_build([layer], tmp_path, method), tmp_path / "x")
    assert {name: t[name][4] for name in expected} == expected


def test_a_malformed_sparse_map_names_the_image_and_entry(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    it.make_sparse_file(src / "disk.img", 1 << 20, {4096: b"data"})
    raw = bytearray(it.tar_directory("posix-0.1", src))
    at = raw.index(b"GNU.sparse.map=4096,4096,")
    raw[at + 20:at + 24] = b"9999"  # the map now says more data than the entry stores
    layer = blob_from_tar(tmp_path, bytes(raw), "gzip")
    dest = tmp_path / "o.sqfs"
    with pytest.raises(LayerError) as ei:
        build_squashfs([layer], CONFIG, dest, source_ref="registry.example/demo:1", source_digest="sha256:feed",
                       workdir=tmp_path / "w")
    msg = str(ei.value)
    assert msg.startswith("registry.example/demo:1: layer " + layer.digest) and "'./disk.img'" in msg
    assert "sparse map" in msg and "\n" not in msg and not dest.exists()
