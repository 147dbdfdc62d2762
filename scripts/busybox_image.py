#!/usr/bin/env python3
"""Write a tiny image made of Debian's busybox-static as an OCI archive (or a docker archive), with
no network and nothing but the standard library: what ``scripts/offline-demo.sh`` installs with
``shpc-lite install NAME:VERSION --from oci-archive:PATH``.

    python3 scripts/busybox_image.py OUT.tar [--format oci-archive|docker-archive] [--busybox PATH]

The image: /bin/busybox plus the usual applet links, /etc/os-release, /etc/motd, /etc/passwd,
/etc/group, and the top-level directories a wrapper binds into (/home, /root, /tmp, ...). The
output is the same bytes for the same busybox (mtimes 0, sorted, fixed owners), so installing
it twice stores one image.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
from pathlib import Path

APPLETS = ("sh", "cat", "echo", "printf", "ls", "uname", "pwd", "id", "env", "head", "sed", "true",
           "false", "sleep", "grep", "wc", "date", "hostname", "whoami")
DIRS = ("bin", "dev", "etc", "home", "proc", "root", "run", "sys", "usr", "var")
OS_RELEASE = """\
PRETTY_NAME="shpc-lite busybox demo"
NAME="busybox demo"
ID=busybox-demo
VERSION_ID=1.0
HOME_URL="https://busybox.net/"
"""
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def _member(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def layer_tar(busybox: bytes) -> bytes:
    """The root filesystem as one uncompressed tar (its sha256 is the config's diff_id)."""
    members = [_member(d, tarfile.DIRTYPE, 0o755) for d in DIRS]
    members.append(_member("tmp", tarfile.DIRTYPE, 0o1777))
    members.append(_member("bin/busybox", tarfile.REGTYPE, 0o755, busybox))
    members += [_member(f"bin/{tool}", tarfile.SYMTYPE, 0o777, link="busybox") for tool in APPLETS]
    files = {
        "etc/os-release": OS_RELEASE,
        "etc/motd": "hello from inside the busybox demo image\n",
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    }
    members += [_member(name, tarfile.REGTYPE, 0o644, text.encode()) for name, text in files.items()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in sorted(members, key=lambda m: m[0].name):
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_parts(busybox: bytes, arch: str) -> tuple[bytes, bytes, bytes]:
    """(uncompressed layer, gzip layer, config JSON)."""
    raw = layer_tar(busybox)
    gz = gzip.compress(raw, mtime=0)
    config = _json({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/bin", "DEMO_GREETING=set by the image"], "Cmd": ["/bin/sh"],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(raw)]},
        "history": [{"created_by": "scripts/busybox_image.py (Debian busybox-static)"}],
    })
    return raw, gz, config


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info, _ = _member(name, tarfile.REGTYPE, mode, data)
    tar.addfile(info, io.BytesIO(data))


def write_oci_archive(out: Path, busybox: bytes, arch: str, tag: str) -> str:
    _raw, gz, config = image_parts(busybox, arch)
    manifest = _json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _digest(gz),
                    "size": len(gz)}],
    })
    index = _json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _digest(manifest),
                       "size": len(manifest), "platform": {"architecture": arch, "os": "linux"},
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    })
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add(tar, "index.json", index)
        for blob in (config, gz, manifest):
            _add(tar, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    return _digest(manifest)


def write_docker_archive(out: Path, busybox: bytes, arch: str, tag: str) -> str:
    raw, _gz, config = image_parts(busybox, arch)
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = hashlib.sha256(raw).hexdigest() + "/layer.tar"
    manifest = _json([{"Config": config_name, "RepoTags": [f"busybox-demo:{tag}"], "Layers": [layer_name]}])
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, config_name, config)
        _add(tar, layer_name, raw)
        _add(tar, "manifest.json", manifest)
    return _digest(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the archive to write")
    parser.add_argument("--format", choices=("oci-archive", "docker-archive"), default="oci-archive")
    parser.add_argument("--busybox", type=Path, default=Path("/bin/busybox"),
                        help="a statically linked busybox (Debian busybox-static: /bin/busybox)")
    parser.add_argument("--tag", default="1.0")
    args = parser.parse_args(argv)
    try:
        busybox = args.busybox.read_bytes()
    except OSError as exc:
        print(f"busybox_image: cannot read {args.busybox}: {exc.strerror} (apt-get install busybox-static)",
              file=sys.stderr)
        return 1
    if b"/lib64/ld-linux" in busybox[:4096] or b"/lib/ld-linux" in busybox[:4096]:
        print(f"busybox_image: {args.busybox} is dynamically linked: the image needs busybox-static",
              file=sys.stderr)
        return 1
    arch = ARCHES.get(platform.machine(), platform.machine())
    tmp = args.out.with_name(args.out.name + ".part")
    write = write_oci_archive if args.format == "oci-archive" else write_docker_archive
    digest = write(tmp, busybox, arch, args.tag)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.format}, {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
