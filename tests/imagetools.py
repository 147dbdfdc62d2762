"""Build container images in memory and push them to a registry with plain ``requests``.

Small API for tests and benchmarks::

    layer = make_layer([File("bin/hello", b"#!/bin/sh\\necho hi\\n", mode=0o755), Dir("tmp", 0o1777),
                        Symlink("bin/hi", "hello"), Whiteout("etc/old")], compression="gzip")
    image = make_image([layer], entrypoint=["/bin/hello"], oci=True)
    index = make_index({"linux/amd64": image, "linux/arm64": make_image([layer], architecture="arm64")})
    pusher = registry.pusher()              # from the registry fixtures (handles auth)
    digest = pusher.push_image("test/hello", image, tags=["1.0", "latest"])
    digest = pusher.push_index("test/hello", index, tags=["multi"])

Everything is deterministic (fixed mtimes, uid/gid 0, gzip mtime 0), so the same inputs give the
same digests. Paths are written exactly as given, so hostile layers (``../x``, ``/abs``) can be made.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import requests

from shpc_lite.sif import read_sif
from tests.needs import need_tools

from shpc_lite.oci.client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_www_authenticate,
)

MTIME = 1_700_000_000
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    # (oci, compression) -> media type
    (True, None): "application/vnd.oci.image.layer.v1.tar",
    (True, "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    (True, "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    (False, None): "application/vnd.docker.image.rootfs.diff.tar",
    (False, "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    (False, "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",  # Docker uses the OCI type
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- layer entries

@dataclass(frozen=True)
class File:
    path: str
    data: Union[bytes, str] = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str  # a path in this or a lower layer, as stored in the tar


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` of lower layers (``dir/.wh.name``)."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides every lower entry of directory ``path`` (``path/.wh..wh..opq``)."""

    path: str


@dataclass(frozen=True)
class Raw:
    """Any tar member, for hostile or unusual layers (devices, odd types, odd names)."""

    info: tarfile.TarInfo
    data: bytes = b""


Entry = Union[File, Dir, Symlink, Hardlink, Whiteout, Opaque, Raw]
Entries = Union[Mapping[str, Union[bytes, str]], Iterable[Entry]]


def _entries(entries: Entries) -> List[Entry]:
    if isinstance(entries, Mapping):
        return [File(path, data) for path, data in entries.items()]
    return list(entries)


def _info(path: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0,
          mtime: int = MTIME) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    info.uname = info.gname = ""
    return info


def make_tar(entries: Entries) -> bytes:
    """An uncompressed tar of ``entries`` (a list of entry objects or ``{path: data}``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in _entries(entries):
            if isinstance(entry, File):
                data = entry.data.encode() if isinstance(entry.data, str) else entry.data
                info = _info(entry.path, tarfile.REGTYPE, entry.mode, entry.uid, entry.gid,
                             entry.mtime)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif isinstance(entry, Dir):
                tar.addfile(_info(entry.path, tarfile.DIRTYPE, entry.mode, entry.uid, entry.gid,
                                  entry.mtime))
            elif isinstance(entry, Symlink):
                info = _info(entry.path, tarfile.SYMTYPE, 0o777)
                info.linkname = entry.target
                tar.addfile(info)
            elif isinstance(entry, Hardlink):
                info = _info(entry.path, tarfile.LNKTYPE, 0o644)
                info.linkname = entry.target
                tar.addfile(info)
            elif isinstance(entry, Whiteout):
                head, _, name = entry.path.rstrip("/").rpartition("/")
                path = f"{head}/.wh.{name}" if head else f".wh.{name}"
                tar.addfile(_info(path, tarfile.REGTYPE, 0o644))
            elif isinstance(entry, Opaque):
                path = entry.path.rstrip("/")
                tar.addfile(_info(f"{path}/.wh..wh..opq" if path else ".wh..wh..opq",
                                  tarfile.REGTYPE, 0o644))
            elif isinstance(entry, Raw):
                tar.addfile(entry.info, io.BytesIO(entry.data) if entry.data else None)
            else:
                raise TypeError(f"unknown layer entry {entry!r}")
    return buf.getvalue()


# ------------------------------------------------------------------- layers written by real tar tools

def make_sparse_file(path: Path, size: int, chunks: Mapping[int, bytes]) -> Path:
    """A file with holes, made as users make them: ``truncate -s SIZE`` then ``dd conv=notrunc``."""
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    for offset, data in chunks.items():
        subprocess.run(["dd", f"of={path}", "bs=65536", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc",
                        "status=none"], input=data, check=True)
    return path


# writer name -> argv that writes a tar of the current directory's "." to stdout (None: Python's tarfile)
TAR_WRITERS: Dict[str, Optional[List[str]]] = {
    "gnu": ["tar", "--format=gnu", "--sparse"],  # old GNU "S" entries for files with holes
    "gnu-nosparse": ["tar", "--format=gnu"],  # holes written out as zeros
    "posix": ["tar", "--format=posix", "--sparse"],
    "posix-0.0": ["tar", "--format=posix", "--sparse", "--sparse-version=0.0"],
    "posix-0.1": ["tar", "--format=posix", "--sparse", "--sparse-version=0.1"],
    "posix-1.0": ["tar", "--format=posix", "--sparse", "--sparse-version=1.0"],
    "bsdtar": ["bsdtar"],  # restricted pax, GNU sparse 1.0 for files with holes, by default
    "busybox": ["busybox", "tar"],
    "python-pax": None,
    "python-gnu": None,
}


def tar_directory(writer: str, src: Path) -> bytes:
    """An uncompressed tar of everything below ``src`` (as ``./...``), written by ``writer`` (see TAR_WRITERS)."""
    argv = TAR_WRITERS[writer]
    if argv is None:
        buf = io.BytesIO()
        fmt = tarfile.GNU_FORMAT if writer == "python-gnu" else tarfile.PAX_FORMAT
        with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tar:
            tar.add(str(src), arcname=".")
        return buf.getvalue()
    need_tools(argv[0])
    proc = subprocess.run([*argv, "-cf", "-", "."], cwd=src, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{writer} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def layer_from_tar(tar: bytes, compression: Optional[str] = "gzip") -> Layer:
    """A layer from an already written tar (e.g. :func:`tar_directory`)."""
    return Layer(compress(tar, compression), compression, sha256(tar))


# ---------------------------------------------------------------------------------- blobs, images

@dataclass(frozen=True)
class Blob:
    data: bytes = field(repr=False)
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Layer:
    data: bytes = field(repr=False)  # the blob as pushed (compressed or not)
    compression: Optional[str]  # None, "gzip" or "zstd"
    diff_id: str  # sha256 of the uncompressed tar

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def blob(self, oci: bool) -> Blob:
        return Blob(self.data, LAYER_TYPES[(oci, self.compression)])


def compress(data: bytes, compression: Optional[str]) -> bytes:
    if compression is None or compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    raise ValueError(f"unknown compression {compression!r}")


def make_layer(entries: Entries, compression: Optional[str] = "gzip") -> Layer:
    """A layer from entries; ``compression`` is ``"gzip"``, ``"zstd"`` or None."""
    return layer_from_tar(make_tar(entries), None if compression == "none" else compression)


def make_config(
    layers: Sequence[Layer] = (),
    *,
    architecture: str = "amd64",
    os: str = "linux",
    variant: Optional[str] = None,
    env: Optional[Sequence[str]] = None,
    entrypoint: Optional[Sequence[str]] = None,
    cmd: Optional[Sequence[str]] = None,
    working_dir: Optional[str] = None,
    labels: Optional[Mapping[str, str]] = None,
    user: Optional[str] = None,
    extra_config: Optional[Mapping] = None,
) -> bytes:
    """Image config JSON. ``env`` defaults to a standard PATH; None fields are left out."""
    config: Dict[str, object] = {"Env": list(env) if env is not None else [DEFAULT_PATH]}
    for key, value in (("Entrypoint", entrypoint), ("Cmd", cmd), ("WorkingDir", working_dir),
                       ("Labels", labels), ("User", user)):
        if value is not None:
            config[key] = list(value) if isinstance(value, (list, tuple)) else value
    config.update(extra_config or {})
    doc: Dict[str, object] = {
        "architecture": architecture,
        "os": os,
        "created": "2024-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "tests/imagetools"}
                    for _ in layers],
    }
    if variant:
        doc["variant"] = variant
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Image:
    """A single-platform image: its manifest bytes and every blob it needs."""

    manifest: bytes = field(repr=False)
    media_type: str
    config: Blob
    layers: Tuple[Blob, ...]
    platform: dict  # {"os", "architecture"[, "variant"]}

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def blobs(self) -> Tuple[Blob, ...]:
        return (self.config,) + self.layers

    @property
    def platform_string(self) -> str:
        p = self.platform
        return "/".join(x for x in (p["os"], p["architecture"], p.get("variant")) if x)


def make_image(
    layers: Sequence[Layer] = (),
    *,
    oci: bool = False,
    config: Optional[bytes] = None,
    annotations: Optional[Mapping[str, str]] = None,
    **config_fields,
) -> Image:
    """An image manifest (Docker v2 by default, OCI with ``oci=True``) over ``layers``.

    ``config`` is raw config JSON; otherwise ``make_config(layers, **config_fields)`` is used.
    """
    if config is None:
        config = make_config(layers, **config_fields)
    elif config_fields:
        raise TypeError("pass either config or config fields, not both")
    parsed = json.loads(config)
    platform = {"os": parsed.get("os", "linux"), "architecture": parsed.get("architecture", "amd64")}
    if parsed.get("variant"):
        platform["variant"] = parsed["variant"]
    config_blob = Blob(config, OCI_CONFIG if oci else DOCKER_CONFIG)
    layer_blobs = tuple(layer.blob(oci) for layer in layers)
    media_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    doc: Dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config_blob.descriptor(),
        "layers": [blob.descriptor() for blob in layer_blobs],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    manifest = json.dumps(doc, indent=3).encode()
    return Image(manifest, media_type, config_blob, layer_blobs, platform)


@dataclass(frozen=True)
class Index:
    """A multi-platform index (Docker manifest list or OCI index) and its children."""

    manifest: bytes = field(repr=False)
    media_type: str
    children: Tuple[Image, ...]  # every manifest it lists, attestations included

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_attestation(subject: Image) -> Image:
    """A buildx-style attestation manifest for ``subject`` (listed as ``unknown/unknown``)."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1",
                            "subject": [{"digest": {"sha256": subject.digest[7:]}}]}).encode()
    layer = Layer(statement, None, sha256(statement))
    config = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}).encode()
    image = make_image([], oci=True, config=config)
    doc = json.loads(image.manifest)
    intoto = Blob(statement, "application/vnd.in-toto+json")
    doc["layers"] = [intoto.descriptor(annotations={
        "in-toto.io/predicate-type": "https://spdx.dev/Document"})]
    return Image(json.dumps(doc, indent=3).encode(), OCI_MANIFEST, image.config, (intoto,),
                 {"os": "unknown", "architecture": "unknown"})


def make_index(
    images: Union[Mapping[str, Image], Sequence[Image]],
    *,
    oci: bool = False,
    attestation: bool = True,
) -> Index:
    """An index over ``images`` (a list, or ``{"linux/arm64": image}`` to override platforms).

    With ``attestation`` an ``unknown/unknown`` attestation entry follows the first image, as
    ``docker buildx`` writes them.
    """
    pairs = list(images.items()) if isinstance(images, Mapping) else [(None, i) for i in images]
    entries, children = [], []
    for number, (plat, image) in enumerate(pairs):
        if plat is None:
            platform = dict(image.platform)
        else:
            parts = plat.split("/")
            platform = {"os": parts[0], "architecture": parts[1]}
            if len(parts) > 2:
                platform["variant"] = parts[2]
        entries.append({"mediaType": image.media_type, "digest": image.digest,
                        "size": len(image.manifest), "platform": platform})
        children.append(image)
        if attestation and number == 0:
            att = make_attestation(image)
            entries.append({
                "mediaType": att.media_type, "digest": att.digest, "size": len(att.manifest),
                "platform": {"os": "unknown", "architecture": "unknown"},
                "annotations": {"vnd.docker.reference.digest": image.digest,
                                "vnd.docker.reference.type": "attestation-manifest"},
            })
            children.append(att)
    media_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    return Index(json.dumps(doc, indent=3).encode(), media_type, tuple(children))


# ----------------------------------------------------------------------------------------- pushing

class PushError(AssertionError):
    pass


class Pusher:
    """Pushes blobs and manifests over the distribution API (anonymous, Basic or Bearer)."""

    def __init__(self, url: str, username: Optional[str] = None, password: Optional[str] = None,
                 timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.username, self.password = username, password
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        self._auth: Dict[str, str] = {}  # repository -> Authorization value

    def __repr__(self) -> str:
        return f"Pusher({self.url!r}, username={self.username!r})"

    def close(self) -> None:
        self.session.close()

    def _authorize(self, repo: str, resp: requests.Response) -> bool:
        challenges = {c.scheme: c for c in parse_www_authenticate(
            resp.headers.get("WWW-Authenticate", ""))}
        basic = (self.username, self.password) if self.username is not None else None
        if "bearer" in challenges:
            params = challenges["bearer"].params
            query = {"scope": f"repository:{repo}:pull,push"}
            if params.get("service"):
                query["service"] = params["service"]
            answer = self.session.get(params["realm"], params=query, auth=basic,
                                      timeout=self.timeout)
            if answer.status_code != 200:
                raise PushError(f"token request failed: HTTP {answer.status_code}")
            doc = answer.json()
            self._auth[repo] = "Bearer " + (doc.get("token") or doc["access_token"])
            return True
        if "basic" in challenges and basic:
            prepared = requests.Request("GET", self.url, auth=basic).prepare()
            self._auth[repo] = prepared.headers["Authorization"]
            return True
        return False

    def request(self, method: str, repo: str, url: str, **kwargs) -> requests.Response:
        """One request with the repository's auth (acquired on the first 401)."""
        url = url if url.startswith(("http://", "https://")) else self.url + url
        for _ in range(2):
            headers = dict(kwargs.pop("headers", None) or {})
            if repo in self._auth:
                headers["Authorization"] = self._auth[repo]
            resp = self.session.request(method, url, headers=headers, timeout=self.timeout,
                                        allow_redirects=False, **kwargs)
            kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
            if resp.status_code != 401 or not self._authorize(repo, resp):
                return resp
        return resp

    def blob_exists(self, repo: str, digest: str) -> bool:
        return self.request("HEAD", repo, f"/v2/{repo}/blobs/{digest}").status_code == 200

    def push_blob(self, repo: str, data: bytes) -> str:
        """POST an upload, then PUT the data with ``?digest=``; returns the digest."""
        digest = sha256(data)
        if self.blob_exists(repo, digest):
            return digest
        start = self.request("POST", repo, f"/v2/{repo}/blobs/uploads/")
        if start.status_code != 202 or "Location" not in start.headers:
            raise PushError(f"upload start for {repo}: HTTP {start.status_code} {start.text[:200]}")
        location = requests.compat.urljoin(self.url + "/", start.headers["Location"])
        location += ("&" if "?" in location else "?") + f"digest={digest}"
        done = self.request("PUT", repo, location, data=data,
                            headers={"Content-Type": "application/octet-stream"})
        if done.status_code != 201:
            raise PushError(f"blob {digest} to {repo}: HTTP {done.status_code} {done.text[:200]}")
        return digest

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest with its exact Content-Type; returns its digest."""
        resp = self.request("PUT", repo, f"/v2/{repo}/manifests/{reference}", data=data,
                            headers={"Content-Type": media_type})
        if resp.status_code != 201:
            raise PushError(f"manifest {repo}:{reference}: HTTP {resp.status_code} "
                            f"{resp.text[:300]}")
        return sha256(data)

    def push_image(self, repo: str, image: Image, tags: Sequence[str] = ("latest",)) -> str:
        """Blobs, then the manifest by digest and under every tag; returns the manifest digest."""
        for blob in image.blobs:
            self.push_blob(repo, blob.data)
        self.push_manifest(repo, image.digest, image.manifest, image.media_type)
        self.tag(repo, image, tags)
        return image.digest

    def push_index(self, repo: str, index: Index, tags: Sequence[str] = ("latest",)) -> str:
        """Every child by digest first, then the index under every tag; returns its digest."""
        for child in index.children:
            self.push_image(repo, child, tags=())
        self.push_manifest(repo, index.digest, index.manifest, index.media_type)
        self.tag(repo, index, tags)
        return index.digest

    def tag(self, repo: str, manifest: Union[Image, Index], tags: Iterable[str]) -> None:
        """Put the same manifest bytes under each of ``tags`` (already pushed blobs)."""
        for tag in tags:
            self.push_manifest(repo, tag, manifest.manifest, manifest.media_type)


def image_recipe(site, name: str, image: str, versions: dict, gpu: str = "none") -> None:
    """A recipe for a test image in the site's registry dir, with one alias (``tool``)."""
    lines = [f"name: {name}", f"image: {image}", "description: test image", "versions:"]
    lines += [f"  '{v}': '{t}'" for v, t in versions.items()]
    lines += ["aliases:", "  tool: /usr/bin/tool", "features:", f"  gpu: {gpu}"]
    site.write_recipe(name, "\n".join(lines) + "\n")


def sif_tree(sif: Path, tmp: Path) -> tuple[dict[str, str], Path]:
    """Extract the squashfs partition at its offset and list it (path -> kind/mode/target)."""
    image = read_sif(sif)
    part = next(d for d in image.descriptors if d.data_type == 0x4004)
    out = tmp / "x"
    subprocess.run(["unsquashfs", "-o", str(part.offset), "-d", str(out), "-no-xattrs", str(sif)],
                   check=True, capture_output=True, timeout=120)
    tree = {}
    for p in sorted(out.rglob("*")):
        rel = "/" + str(p.relative_to(out))
        st = p.lstat()
        if p.is_symlink():
            tree[rel] = "link->" + os.readlink(p)
        elif p.is_dir():
            tree[rel] = f"dir {st.st_mode & 0o7777:o}"
        else:
            tree[rel] = f"file {st.st_mode & 0o7777:o} nlink={st.st_nlink}"
    return tree, out


def many_files_layer(path: Path, count: int, first: int = 0) -> None:
    """A gzip layer of ``count`` 8-byte files (numbered from ``first``), 200 to a directory as in a
    Python image's site-packages, written as a stream (memory holds one entry)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(first, first + count):
                ti = tarfile.TarInfo(f"usr/lib/python3/site-packages/pkg{i // 200}/module_{i}.py")
                ti.size, ti.mtime = 8, 1_700_000_000
                tf.addfile(ti, io.BytesIO(b"%08d" % i))
