"""Images a site already has, without a registry: ``--from oci:DIR[:TAG]``,
``--from oci-archive:PATH[:TAG]`` and ``--from docker-archive:PATH[:NAME:TAG]`` (skopeo's syntax:
the path ends at the first ``:``).

* ``oci:DIR`` is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``);
  ``oci-archive:PATH`` is the same layout as a tar. With several images in ``index.json`` the
  ``org.opencontainers.image.ref.name`` annotation selects one (``:TAG``); an index (or an
  ``index.json`` listing platforms) is narrowed to one platform by the registry client's own
  ``choose_platform`` (config ``platform``, else the host's). The store key is the digest of what
  was selected, as for a registry pull (the index digest of a multi-platform image), so the same
  image from a registry or from an archive is stored once.
* ``docker-archive:PATH`` is what ``docker save`` / ``podman save`` write: ``manifest.json`` lists
  each image's ``Config`` and ``Layers`` paths. Such an archive has no manifest, so no manifest
  digest: the store key is the **config digest** (sha256 of the config file, Docker's image ID).
  Layers are checked against the config's ``rootfs.diff_ids`` (the digest of the uncompressed tar),
  and a path of the form ``blobs/sha256/<hex>`` or a config named ``<hex>.json`` must also hash to
  its name.

Archives are read in place with tarfile's member access (never extracted); blobs are streamed,
hashed on the way, into the scratch dir and moved into the same blob cache registry pulls use, so
memory stays bounded. Hostile input is refused with one line naming the archive: absolute or
``..`` member names, symlinks or hard links leading out of the archive, paths in ``manifest.json``
that leave it, JSON documents too large or too deeply nested, blobs missing or not matching their
digest. Nothing is stored before everything was verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterator, List, Mapping, Optional, Protocol, Tuple

from ..errors import PullError, ReferenceError_, RegistryError
from ..pull.source import LayerRef, SourceImage
from .client import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    MAX_SMALL_BLOB_BYTES,
    OCI_INDEX,
    Descriptor,
    Manifest,
    Platform,
    RegistryClient,
)
from .document import check_image_config, load_json, load_object
from .reference import is_digest

if TYPE_CHECKING:
    from ..config import Config
    from ..progress import Progress
    from ..pull.layers import LayerBlob
    from .reference import ImageReference

TRANSPORTS = ("oci", "oci-archive", "docker-archive")
REF_NAME = "org.opencontainers.image.ref.name"
MAX_MEMBERS = 100_000  # tar members of one archive (an image has a few per layer)
MAX_LINK_HOPS = 8
CHUNK = 1 << 20
_BLOB_PATH = re.compile(r"blobs/(sha256|sha512)/([0-9a-f]+)")
_HEX_JSON = re.compile(r"(?:.*/)?([0-9a-f]{64})\.json")


@dataclass(frozen=True)
class LocalSpec:
    """A parsed ``--from`` value."""

    transport: str  # one of TRANSPORTS
    path: Path
    selector: str = ""  # OCI: a ref name; docker-archive: NAME:TAG or TAG

    @property
    def label(self) -> str:
        return f"{self.transport}:{self.path}" + (f":{self.selector}" if self.selector else "")


def parse_local_spec(text: str) -> LocalSpec:
    """``oci:DIR[:TAG]``, ``oci-archive:PATH[:TAG]``, ``docker-archive:PATH[:REF]``."""
    transport, sep, rest = str(text).partition(":")
    if not sep or transport not in TRANSPORTS or not rest:
        raise PullError(f"--from {text!r}: expected oci:DIR[:TAG], oci-archive:PATH[:TAG] or "
                        "docker-archive:PATH[:NAME:TAG]")
    path, _, selector = rest.partition(":")
    return LocalSpec(transport, Path(os.path.abspath(path)), selector)


# ------------------------------------------------------------------------------------ readers


class _Reader(Protocol):
    """Files of a layout directory or members of an archive, by their relative name."""

    def size(self, name: str) -> int: ...

    def open(self, name: str) -> "contextlib.AbstractContextManager[IO[bytes]]": ...


def _safe_name(where: str, name: str) -> str:
    """A relative, normalised member name; absolute or ``..`` names are refused."""
    clean = posixpath.normpath(name)
    if not name or name.startswith("/") or clean == ".." or clean.startswith("../") or "\0" in name:
        raise PullError(f"{where}: member {name[:200]!r} is an absolute or '..' path: refused")
    return "" if clean == "." else clean


class _DirReader:
    """An OCI layout directory; no symlink below it is followed (openat with O_NOFOLLOW)."""

    def __init__(self, where: str, root: Path):
        self.where, self.root = where, root
        if not root.is_dir():
            raise PullError(f"{where}: no such directory")

    @contextlib.contextmanager
    def _fd(self, name: str) -> Iterator[int]:
        parts = _safe_name(self.where, name).split("/")
        fds: List[int] = []
        try:
            fds.append(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY))
            for part in parts[:-1]:
                fds.append(os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1])
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PullError(f"{self.where}: {name} is not a regular file: refused")
            yield fd
        except FileNotFoundError:
            raise PullError(f"{self.where}: {name} is missing") from None
        except OSError as exc:
            raise PullError(f"{self.where}: {name}: {exc.strerror} (symlinks are not followed)") from None
        finally:
            for fd in reversed(fds):
                os.close(fd)

    def size(self, name: str) -> int:
        with self._fd(name) as fd:
            return os.fstat(fd).st_size

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        with self._fd(name) as fd, os.fdopen(os.dup(fd), "rb") as fh:
            yield fh


class _TarReader:
    """An archive read in place: one pass over the headers, then member access by name."""

    def __init__(self, where: str, path: Path):
        self.where = where
        try:
            self._tar = tarfile.open(path, "r:*")
        except FileNotFoundError:
            raise PullError(f"{where}: no such file") from None
        except (OSError, tarfile.TarError) as exc:
            raise PullError(f"{where}: not a readable tar archive ({exc})") from None
        self._members: dict = {}
        try:
            for count, member in enumerate(self._tar, 1):
                if count > MAX_MEMBERS:
                    raise PullError(f"{where}: more than {MAX_MEMBERS} members: refused")
                self._members[_safe_name(where, member.name)] = member
        except tarfile.TarError as exc:
            self.close()
            raise PullError(f"{where}: damaged tar archive ({exc})") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._tar.close()

    def _member(self, name: str) -> tarfile.TarInfo:
        """The regular file ``name`` stands for, following links only inside the archive."""
        current = _safe_name(self.where, name)
        for _ in range(MAX_LINK_HOPS):
            member = self._members.get(current)
            if member is None:
                raise PullError(f"{self.where}: {name} is missing")
            if member.isreg():
                return member
            if not (member.issym() or member.islnk()):
                raise PullError(f"{self.where}: {name} is not a regular file: refused")
            target = member.linkname
            if member.issym() and not target.startswith("/"):
                target = posixpath.join(posixpath.dirname(current), target)
            if target.startswith("/"):
                raise PullError(f"{self.where}: member {current!r} links outside the archive: refused")
            current = _safe_name(self.where, target)
        raise PullError(f"{self.where}: {name}: too many links: refused")

    def size(self, name: str) -> int:
        return self._member(name).size

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        member = self._member(name)
        fh = self._tar.extractfile(member)
        if fh is None:
            raise PullError(f"{self.where}: {name} is not a regular file: refused")
        with fh:
            yield fh


@contextlib.contextmanager
def _reader(spec: LocalSpec) -> Iterator[_Reader]:
    if spec.transport == "oci":
        yield _DirReader(spec.label, spec.path)
        return
    tar = _TarReader(spec.label, spec.path)
    try:
        yield tar
    finally:
        tar.close()


# ------------------------------------------------------------------------------------ documents


def _read_limited(reader: _Reader, where: str, name: str, limit: int) -> bytes:
    if reader.size(name) > limit:
        raise PullError(f"{where}: {name} is larger than {limit} bytes: refused")
    with reader.open(name) as fh:
        return fh.read(limit + 1)[:limit]


def _hash(digest: str):
    return hashlib.new(digest.split(":", 1)[0])


def _read_blob(reader: _Reader, where: str, desc: Descriptor, limit: int) -> bytes:
    """A small blob (manifest, index, config) checked against its descriptor's digest and size."""
    data = _read_limited(reader, where, blob_member(desc.digest), limit)
    hasher = _hash(desc.digest)
    hasher.update(data)
    got = f"{hasher.name}:{hasher.hexdigest()}"
    if got != desc.digest or len(data) != desc.size:
        raise PullError(f"{where}: blob {desc.digest} has digest {got} and size {len(data)} "
                        f"(expected {desc.size}): the layout lies about it; refused")
    return data


def parse_json_object(where: str, what: str, data: bytes) -> dict:
    return load_object(data, f"{where}: {what}", PullError)


def _image_config(where: str, what: str, data: bytes) -> dict:
    """An image config, checked as a registry's is (the same types for the same fields)."""
    what = f"{where}: {what}"
    return check_image_config(load_json(data, what, PullError), what, PullError)


def blob_member(digest: str) -> str:
    """Where an OCI layout keeps a blob."""
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


def _descriptors(where: str, doc: Mapping, key: str) -> List[Descriptor]:
    items = doc.get(key)
    if not isinstance(items, list):
        raise PullError(f"{where}: no {key!r} list")
    try:
        return [Descriptor.from_json(item, where) for item in items]
    except RegistryError as err:
        raise PullError(str(err)) from None


def wanted_platform(config: "Config") -> Platform:
    """The platform a multi-platform image is narrowed to, as the registry client chooses it."""
    from ..errors import ConfigError

    try:
        return Platform.parse(config["platform"]) if config["platform"] else Platform.host()
    except ValueError as err:
        raise ConfigError(f"config platform: {err}") from None


# ------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class _Selected:
    """What an OCI layout's selection gives: the store digest, its ref name, the platform manifest."""

    digest: str
    ref_name: str
    manifest: dict
    arch: str


def _pick_entry(where: str, entries: List[Descriptor], selector: str) -> Tuple[List[Descriptor], str]:
    """The index.json entries a ``:TAG`` (or its absence) leaves, and the ref name chosen."""
    if selector:
        named = [d for d in entries if d.annotations.get(REF_NAME) == selector]
        if not named:
            names = sorted({d.annotations.get(REF_NAME, "") for d in entries} - {""}) or ["none"]
            raise PullError(f"{where}: no image named {selector!r} (names: {', '.join(names)})")
        return named, selector
    if len(entries) > 1 and not all(d.platform is not None for d in entries):
        names = sorted({d.annotations.get(REF_NAME, "") for d in entries} - {""}) or ["unnamed"]
        raise PullError(f"{where}: holds {len(entries)} images; add :TAG to choose one "
                        f"({', '.join(names)})")
    if not entries:
        raise PullError(f"{where}: index.json lists no image")
    return entries, entries[0].annotations.get(REF_NAME, "") if len(entries) == 1 else ""


def _choose(where: str, index: Manifest, want: Platform) -> Descriptor:
    """The registry client's platform choice; its message names the archive, not a reference."""
    try:
        return RegistryClient.choose_platform(index, want)
    except RegistryError as err:
        raise PullError(f"{where}: {str(err).removeprefix(f'{index.reference}: ')}") from None


def _select_oci(reader: _Reader, spec: LocalSpec, ref: "ImageReference", want: Platform) -> _Selected:
    where = spec.label
    layout = parse_json_object(where, "oci-layout", _read_limited(reader, where, "oci-layout", 1 << 16))
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise PullError(f"{where}: oci-layout has no imageLayoutVersion: not an OCI image layout")
    top = parse_json_object(where, "index.json", _read_limited(reader, where, "index.json", MAX_MANIFEST_BYTES))
    entries, ref_name = _pick_entry(where, _descriptors(f"{where}: index.json", top, "manifests"), spec.selector)
    if len(entries) > 1:  # index.json itself lists the platforms: no digest names them all
        listing = json.dumps({"manifests": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size,
                                             "platform": _platform_json(d.platform)} for d in entries]}).encode()
        chosen = _choose(where, Manifest(ref, OCI_INDEX, "", listing), want)
    else:
        chosen = entries[0]
    store_digest = chosen.digest  # what the selection names, as a registry tag names its digest
    data = _read_blob(reader, where, chosen, MAX_MANIFEST_BYTES)
    doc = parse_json_object(where, f"manifest {chosen.digest}", data)
    arch = chosen.platform.architecture if chosen.platform else ""
    if chosen.media_type in INDEX_MEDIA_TYPES or (not chosen.media_type and "manifests" in doc):
        child = _choose(where, Manifest(ref, chosen.media_type or OCI_INDEX, chosen.digest, data), want)
        doc = parse_json_object(where, f"manifest {child.digest}",
                                _read_blob(reader, where, child, MAX_MANIFEST_BYTES))
        arch = child.platform.architecture if child.platform else ""
        chosen = child
    media_type = doc.get("mediaType") or chosen.media_type
    if "manifests" in doc or (media_type and media_type not in MANIFEST_MEDIA_TYPES):
        raise PullError(f"{where}: {chosen.digest}: unsupported manifest (needs a Docker v2 or OCI image manifest)")
    return _Selected(store_digest, ref_name, doc, arch)


def _platform_json(platform: Optional[Platform]) -> dict:
    if platform is None:
        return {}
    return {k: v for k, v in (("os", platform.os), ("architecture", platform.architecture),
                              ("variant", platform.variant)) if v}


def _oci_image(reader: _Reader, spec: LocalSpec, ref: "ImageReference", want: Platform) -> Tuple[SourceImage, str]:
    where = spec.label
    selected = _select_oci(reader, spec, ref, want)
    config_desc = _descriptors(where, {"config": [selected.manifest.get("config")]}, "config")[0]
    layers = _descriptors(f"{where}: manifest", selected.manifest, "layers")
    image_config = _image_config(where, f"config {config_desc.digest}",
                                 _read_blob(reader, where, config_desc, MAX_SMALL_BLOB_BYTES))
    refs = tuple(LayerRef(d.digest, d.size, d.media_type, blob_member(d.digest)) for d in layers)
    arch = selected.arch or str(image_config.get("architecture") or "amd64")
    image = SourceImage(where, selected.digest, _deffile(spec), image_config, refs, arch)
    return image, selected.ref_name


def _docker_entry(where: str, entries: list, selector: str) -> Tuple[dict, str]:
    """The ``manifest.json`` entry a ``:NAME:TAG`` (or ``:TAG``) selects, and its tag."""
    def tags(entry: dict) -> List[str]:
        found = entry.get("RepoTags") or []
        return [t for t in found if isinstance(t, str)] if isinstance(found, list) else []

    good = [e for e in entries if isinstance(e, dict)]
    if len(good) != len(entries) or not good:
        raise PullError(f"{where}: manifest.json lists no images (or entries that are not objects)")
    if selector:
        hits = [(e, t) for e in good for t in tags(e) if t == selector or t.rpartition(":")[2] == selector]
        if not hits:
            names = sorted({t for e in good for t in tags(e)}) or ["none"]
            raise PullError(f"{where}: no image named {selector!r} (names: {', '.join(names)})")
        entry, tag = hits[0]
        return entry, tag.rpartition(":")[2]
    if len(good) > 1:
        names = sorted({t for e in good for t in tags(e)}) or ["untagged"]
        raise PullError(f"{where}: holds {len(good)} images; add :NAME:TAG to choose one ({', '.join(names)})")
    found = tags(good[0])
    return good[0], found[0].rpartition(":")[2] if len(found) == 1 else ""


def _docker_image(reader: _Reader, spec: LocalSpec) -> Tuple[SourceImage, str]:
    where = spec.label
    data = _read_limited(reader, where, "manifest.json", MAX_MANIFEST_BYTES)
    entries = load_json(data, f"{where}: manifest.json", PullError)
    if not isinstance(entries, list):
        raise PullError(f"{where}: manifest.json is not a list (not a docker archive)")
    entry, tag = _docker_entry(where, entries, spec.selector)
    config_name, layer_names = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list) \
            or not all(isinstance(n, str) for n in layer_names):
        raise PullError(f"{where}: manifest.json entry needs Config and a Layers list of paths")
    config_name = _safe_name(where, config_name)
    config_data = _read_limited(reader, where, config_name, MAX_SMALL_BLOB_BYTES)
    digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
    claimed = _claimed_digest(config_name)
    if claimed and claimed != digest:
        raise PullError(f"{where}: config {config_name} has digest {digest}: the archive lies about it; refused")
    image_config = _image_config(where, f"config {config_name}", config_data)
    rootfs = image_config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_names) \
            or not all(isinstance(d, str) and is_digest(d) for d in diff_ids):
        raise PullError(f"{where}: config {config_name}: rootfs.diff_ids does not list one digest per layer")
    refs = []
    for name, diff_id in zip(layer_names, diff_ids):
        name = _safe_name(where, name)
        refs.append(LayerRef(_claimed_digest(name), reader.size(name), "", name, diff_id))
    arch = str(image_config.get("architecture") or "amd64")
    image = SourceImage(where, digest, _deffile(spec), image_config, tuple(refs), arch)
    return image, tag


def _deffile(spec: LocalSpec) -> str:
    """The SIF's definition record, as Apptainer writes it for these bootstrap agents."""
    return f"bootstrap: {spec.transport}\nfrom: {spec.path}" + (f":{spec.selector}" if spec.selector else "") + "\n"


def _claimed_digest(name: str) -> str:
    """The digest a member's name states (``blobs/sha256/<hex>``, ``<hex>.json``), else ""."""
    match = _BLOB_PATH.fullmatch(name)
    if match and is_digest(f"{match.group(1)}:{match.group(2)}"):
        return f"{match.group(1)}:{match.group(2)}"
    match = _HEX_JSON.fullmatch(name)
    return f"sha256:{match.group(1)}" if match else ""


# ------------------------------------------------------------------------------------ the source


@dataclass(frozen=True)
class LocalSource:
    """An image in a layout directory or an archive: an ``ImageSource`` for ``store_image``.

    Made by :func:`open_local_source`, which has already read and verified its small documents.
    ``ref_name`` is the tag the layout or archive gives the image ("" when it gives none)."""

    spec: LocalSpec
    image: SourceImage
    ref_name: str

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def digest(self) -> str:
        return self.image.digest

    def open(self) -> SourceImage:
        return self.image

    def record_tag(self, version: str) -> str:
        """The tag an install record names: the image's own name here when it is a valid tag
        (so ``check`` can compare it with a registry later), else the module version."""
        from .reference import ImageReference

        for tag in (self.ref_name, version):
            try:
                return ImageReference("localhost", "x").with_tag(tag).tag or version
            except ReferenceError_:
                continue
        return version

    def fetch_layers(self, image: SourceImage, config: "Config", progress: "Progress",
                     scratch: Path) -> List["LayerBlob"]:
        """Each layer, verified while it is copied, into the blob cache (one at a time: member
        access to one archive is sequential)."""
        blobs = []
        with _reader(self.spec) as reader:
            for layer in image.layers:
                blob = _cache_layer(reader, self.spec.label, layer, config, scratch)
                progress.advance(layer.size)
                progress.layer_done(blob.digest)
                blobs.append(blob)
        return blobs


def open_local_source(text: str, config: "Config", ref: "ImageReference") -> LocalSource:
    """Parse ``--from`` and read the image's small documents, verified (nothing is written)."""
    spec = parse_local_spec(text)
    with _reader(spec) as reader:
        if spec.transport == "docker-archive":
            image, ref_name = _docker_image(reader, spec)
        else:
            image, ref_name = _oci_image(reader, spec, ref, wanted_platform(config))
    return LocalSource(spec, image, ref_name)


def _cache_layer(reader: _Reader, where: str, layer: LayerRef, config: "Config", scratch: Path) -> "LayerBlob":
    """The blob cache file of ``layer``: reused when cached, else copied from the archive, hashed on
    the way, checked against its digest (and diff_id), and moved into the cache under its lock
    (config ``keep_blobs`` false: left in the scratch dir, which the pull removes)."""
    from ..pull import LayerBlob
    from ..store import lease

    layout = config.layout
    if layer.digest:
        cached = layout.blob_data(layer.digest)
        if cached.is_file() and cached.stat().st_size == layer.size:
            return LayerBlob(cached, layer.media_type, layer.digest)
    fd, name = tempfile.mkstemp(prefix="layer-", dir=scratch)
    os.close(fd)
    tmp = Path(name)
    hasher = _hash(layer.digest or "sha256:")
    size = 0
    with reader.open(layer.member) as src, open(tmp, "wb") as out:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            hasher.update(chunk)
            size += len(chunk)
            out.write(chunk)
    digest = f"{hasher.name}:{hasher.hexdigest()}"
    if (layer.digest and digest != layer.digest) or size != layer.size:
        tmp.unlink()
        raise PullError(f"{where}: blob {layer.digest or layer.member} has digest {digest} and size {size} "
                        f"(expected {layer.size}): the archive lies about it; refused")
    if layer.diff_id and layer.diff_id != digest:
        got = _uncompressed_digest(tmp, layer.diff_id)
        if got != layer.diff_id:
            tmp.unlink()
            raise PullError(f"{where}: layer {layer.member} uncompresses to {got}, but the config "
                            f"says {layer.diff_id}; refused")
    if not config["keep_blobs"]:  # verified, used from the scratch dir, gone with it
        return LayerBlob(tmp, layer.media_type, digest)
    dest = layout.blob_data(digest)
    layout.make_dir(dest.parent)
    with lease(layout.blob_lock(digest), config["lock_lease"], 6 * 3600):
        if not (dest.is_file() and dest.stat().st_size == size):
            os.chmod(tmp, 0o644)
            try:
                os.replace(tmp, dest)
            except OSError:  # the cache on another file system than the scratch dir
                from ..fsutil import atomic_copy

                atomic_copy(tmp, dest)
    return LayerBlob(dest, layer.media_type, digest)


def _uncompressed_digest(path: Path, diff_id: str) -> str:
    from ..pull.layers import LayerBlob, open_layer

    hasher = _hash(diff_id)
    with open_layer(LayerBlob(path)) as stream:
        for chunk in iter(lambda: stream.read(CHUNK), b""):
            hasher.update(chunk)
    return f"{hasher.name}:{hasher.hexdigest()}"
