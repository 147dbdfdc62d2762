"""Pull: an image digest -> a verified SIF in the store, once, even with many processes at once.

Images come from an ``ImageSource`` (shpc_lite.pull.source): a registry (``RegistrySource``) or
a layout/archive a site already has (shpc_lite.oci.layout_source); both go through
``store_image``, so the lock, the build and the store are the same. Two back ends for registry
images (config ``puller``): ``apptainer`` runs ``apptainer pull`` by digest; ``builtin``
needs no Apptainer: blobs are downloaded concurrently into a content-addressed cache (each
verified against its digest while streaming; config ``keep_blobs`` false: into the scratch dir),
merged as they arrive into a squashfs (shpc_lite.pull) that mksquashfs writes straight into its
place in the SIF (shpc_lite.sif). ``auto`` prefers apptainer when it is on PATH.

Every pull of a digest happens under that digest's lock, in a scratch directory named after the
digest beside the store; a killed pull leaves only that directory, which the next pull of the same
digest removes first. Finished blobs stay in the cache, so a rerun continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from shpc_lite.config import Config
from shpc_lite.errors import PullError, SifError
from shpc_lite.layout import Layout
from shpc_lite.pool import request_pool
from shpc_lite.progress import Progress, elapsed
from shpc_lite.pull.source import ImageSource, LayerRef, SourceImage
from shpc_lite.store import clean_stale, digest_lock, group_id, lease, stored_image_ok

if TYPE_CHECKING:
    from shpc_lite.oci.reference import ImageReference
    from shpc_lite.pull import LayerBlob


@dataclass(frozen=True)
class StoredImage:
    path: Path
    digest: str
    pulled: bool  # False: it was in a store already
    shared_from: str = ""  # the central root it is used from by reference, if any
    layers: tuple[str, ...] = ()  # layer digests, lowest first, when this pull built it from them


class Cancelled(PullError):
    """Raised inside download threads once the pull is being abandoned (Ctrl-C, another error)."""


def find_stored(config: Config, digest: str) -> Optional[StoredImage]:
    """The SIF for ``digest`` in this root, or else in the central root (used by reference)."""
    own = config.layout.image(digest)
    if stored_image_ok(own, digest, imported=False):
        return StoredImage(own, digest, False)
    central = config.central_layout
    if central is not None:
        shared = central.image(digest)
        if os.access(shared, os.R_OK) and stored_image_ok(shared, digest, imported=False):
            return StoredImage(shared, digest, False, shared_from=str(central.root))
    return None


def choose_backend(config: Config) -> str:
    wanted = config["puller"]
    have = shutil.which("apptainer") or shutil.which("singularity")
    if wanted == "apptainer" and not have:
        raise PullError("config puller is 'apptainer' but neither apptainer nor singularity is on PATH")
    if wanted == "auto":
        return "apptainer" if have else "builtin"
    return wanted


def pull(config: Config, ref: "ImageReference", digest: Optional[str] = None, *, quiet: bool = False,
         client=None) -> StoredImage:
    """Make sure the SIF of ``ref`` (an image with its tag; at ``digest`` when given, e.g. from the
    lock) is stored."""
    from shpc_lite.resolve import client_from_config

    client = client or client_from_config(config)
    if digest is None:
        digest = client.head_digest(ref)
    return store_image(config, RegistrySource(client, ref, digest), quiet=quiet)


def store_image(config: Config, source: "ImageSource", *, quiet: bool = False) -> StoredImage:
    """Make sure the SIF of ``source`` (a registry image or a local layout/archive) is stored under
    its digest: built once, under the digest's lock, published by rename."""
    digest = source.digest
    found = find_stored(config, digest)
    if found:
        return found
    layout = config.layout
    gid = group_id(config)  # a wrong group fails before the download, not after it
    layout.make_dir(layout.containers)
    clean_stale(layout, config["lock_lease"])
    with digest_lock(layout, digest, config["lock_lease"]):
        found = find_stored(config, digest)  # another process may have made it while we waited
        if found:
            return found
        # Unique even per digest: a pull that lost its lease (a frozen node) cannot touch ours.
        scratch = layout.new_scratch(digest)
        scratch.mkdir()
        dest = layout.inside(layout.image(digest))
        layers: tuple[str, ...] = ()
        try:
            tmp_sif = scratch / "image.sif"
            _prepare_striping(tmp_sif, config)
            if isinstance(source, RegistrySource) and choose_backend(config) == "apptainer":
                _pull_apptainer(config, source.ref, digest, tmp_sif, scratch, quiet)
            else:
                layers = _build_builtin(config, source, tmp_sif, scratch, quiet)
            _verify_sif(tmp_sif, source.label)
            os.chmod(tmp_sif, config.file_mode)
            if gid is not None:
                os.chown(tmp_sif, -1, gid)
            os.replace(tmp_sif, dest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return StoredImage(dest, digest, True, layers=layers)


def _verify_sif(path: Path, label: str) -> None:
    from shpc_lite.sif import primary_partition, read_sif

    try:
        primary_partition(read_sif(path))
    except SifError as err:
        raise PullError(f"{label}: the SIF built is not valid: {err}") from None


def _prepare_striping(path: Path, config: Config) -> None:
    """On Lustre, create the file with ``lfs setstripe`` so a large image spreads over OSTs."""
    count = config["lustre_stripe_count"]
    if not count or not shutil.which("lfs") or not _on_lustre(path.parent):
        return
    subprocess.run(["lfs", "setstripe", "-c", str(count), str(path)], check=False, capture_output=True, timeout=60)


def _on_lustre(directory: Path) -> bool:
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return False
    return mount_type(os.path.realpath(directory), mounts) == "lustre"


def mount_type(path: str, mounts: str) -> str:
    """The file system type of the mount holding ``path`` in a mount table (longest prefix wins)."""
    best, fstype = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, fields[2]
    return fstype


# ------------------------------------------------------------------------------------------ builtin


def _fetch_blob(client, ref, desc, layout: Layout, progress: Progress, cancel: threading.Event,
                lease_seconds: float, scratch: Optional[Path] = None) -> Path:
    """One layer, verified against its digest while it streams, into the blob cache, under a
    per-blob lock so that no blob is fetched twice; with ``scratch`` (config ``keep_blobs``
    false) into the pull's scratch dir instead, which goes when the pull ends. A blob already in
    the cache is used from there either way.

    A download whose lock was taken over (this process froze past the lease) stops: the new
    holder resumes the partial file."""
    cached = layout.blob_data(desc.digest)
    lost = threading.Event()
    if cached.is_file() and cached.stat().st_size == desc.size:
        progress.advance(desc.size)
        progress.layer_done(desc.digest, cached=True)
        return cached
    seen = [0]

    def report(done: int, total: Optional[int]) -> None:
        if lost.is_set():
            raise PullError(f"{ref}: layer {desc.digest}: another process took over its download "
                            f"(this one stalled for over {lease_seconds:g} s, config lock_lease)")
        if cancel.is_set():
            raise Cancelled(f"{ref}: pull cancelled")
        progress.advance(done - seen[0])
        seen[0] = done

    if scratch is not None:
        dest = layout.scratch_blob(scratch, desc.digest)
        client.fetch_blob(ref, desc.digest, dest, size=desc.size, progress=report)
        progress.layer_done(desc.digest)
        return dest
    layout.make_dir(cached.parent)
    with lease(layout.blob_lock(desc.digest), lease_seconds, 6 * 3600, on_lost=lambda _: lost.set()):
        if not (cached.is_file() and cached.stat().st_size == desc.size):
            client.fetch_blob(ref, desc.digest, cached, size=desc.size, progress=report)
            progress.layer_done(desc.digest)
            return cached
    progress.advance(desc.size)
    progress.layer_done(desc.digest, cached=True)
    return cached


@dataclass(frozen=True)
class RegistrySource:
    """An image in a registry at a known digest (what the tag named): the ``ImageSource`` pulls use."""

    client: object  # a RegistryClient (or a test double with its methods)
    ref: "ImageReference"
    digest: str

    @property
    def label(self) -> str:
        return str(self.ref)

    def open(self) -> SourceImage:
        resolved = self.client.resolve_image(self.ref.with_digest(self.digest))
        image_config = self.client.get_config(resolved)
        arch = (resolved.platform.architecture if resolved.platform else "") or image_config.get("architecture", "amd64")
        layers = tuple(LayerRef(d.digest, d.size, d.media_type) for d in resolved.layers)
        return SourceImage(self.label, self.digest, f"bootstrap: docker\nfrom: {self.ref.with_digest(self.digest)}\n",
                           image_config, layers, arch)

    def fetch_layers(self, image: SourceImage, config: Config, progress: Progress,
                     scratch: Optional[Path]) -> Iterator["LayerBlob"]:
        """Download the layers concurrently (config ``jobs``); yield each, lowest first, as soon as
        it and those below it are verified, so the merge starts while later layers download.
        Layers go to the blob cache, or, with config ``keep_blobs`` false and a ``scratch`` dir,
        there (see ``_fetch_blob``). The first failed download ends the iteration with its error."""
        from shpc_lite.pull import LayerBlob

        cancel = threading.Event()
        layout = config.layout
        into = None if config["keep_blobs"] or scratch is None else scratch
        try:
            with request_pool(config["jobs"], "layer") as pool:
                futures = [pool.submit(_fetch_blob, self.client, self.ref, d, layout, progress, cancel,
                                       config["lock_lease"], into) for d in image.layers]
                pending = set(futures)
                for desc, future in zip(image.layers, futures):
                    while not future.done():
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for finished in done:
                            finished.result()  # a failure anywhere stops the pull now
                    yield LayerBlob(future.result(), desc.media_type, desc.digest)
        except BaseException:
            # Stalled downloads are not waited for (Ctrl-C must be prompt; the merge failed). What
            # they received stays as <digest>/data.partial in the cache: the next pull resumes it.
            cancel.set()
            raise


def _build_builtin(config: Config, source: "ImageSource", tmp_sif: Path, scratch: Path,
                   quiet: bool) -> tuple[str, ...]:
    """Any source's image -> squashfs -> SIF at ``tmp_sif``: the one build every install uses.
    Returns the layer digests (the install record keeps them: discover's base by shared layers)."""
    from shpc_lite.pull import build_squashfs, writes_in_place
    from shpc_lite.sif import InPlace, build_container_sif, container_partition_offset

    start = time.monotonic()
    image = source.open()
    progress = Progress(image.label, image.size, len(image.layers), quiet=quiet)
    digests: list[str] = []

    def layers() -> Iterator["LayerBlob"]:
        """The source's layers as they arrive (the merge reads each while later ones download)."""
        blobs = iter(source.fetch_layers(image, config, progress, scratch))
        try:
            for blob in blobs:
                digests.append(blob.digest)
                yield blob
        finally:
            getattr(blobs, "close", lambda: None)()  # a generator's downloads stop here
        progress.stage("building squashfs")

    arriving = layers()
    try:
        deffile = image.deffile.encode()
        json_objects = {"oci-config.json": json.dumps(image.config.get("config") or {}, sort_keys=True).encode()}
        # the squashfs is written straight to its place in the SIF (no copy of a multi-GB partition)
        # by the native writer, or by mksquashfs where its -offset option exists (squashfs-tools >= 4.4)
        in_place = writes_in_place(config["squashfs_compression"], config["squashfs_writer"])
        offset = container_partition_offset(deffile=deffile, json_objects=json_objects, arch=image.arch)
        squashfs = tmp_sif if in_place else scratch / "rootfs.squashfs"
        build_squashfs(
            arriving, image.config, squashfs,
            source_ref=image.label, source_digest=image.digest,
            compression=config["squashfs_compression"], level=config["squashfs_level"] or None,
            workdir=scratch, offset=offset if in_place else 0, method=config["squashfs_writer"],
        )
        payload = InPlace(tmp_sif.stat().st_size - offset) if in_place else squashfs
        build_container_sif(tmp_sif, payload, deffile=deffile, json_objects=json_objects, arch=image.arch)
        if not in_place:
            squashfs.unlink()
        progress.close(f"{image.label}: stored in {elapsed(start)}")
    finally:
        arriving.close()  # a failed merge stops the downloads still running
        progress.close()
    return tuple(digests)


# ---------------------------------------------------------------------------------------- apptainer


def _pull_apptainer(config: Config, ref, digest: str, tmp_sif: Path, scratch: Path, quiet: bool) -> None:
    from shpc_lite.oci.client import plain_http_allowed

    exe = shutil.which("apptainer") or shutil.which("singularity")
    mirror = config["mirrors"].get(ref.registry, "")
    host = mirror.split("://", 1)[-1].rstrip("/").rsplit("@", 1)[-1] if mirror else ref.registry
    uri = f"docker://{host}/{ref.repository}@{digest}"
    cache = config.layout.make_dir(config.layout.apptainer_cache)
    env = dict(os.environ)
    for prefix in ("APPTAINER_", "SINGULARITY_"):
        env[prefix + "CACHEDIR"] = str(cache)
        env[prefix + "TMPDIR"] = str(scratch)
    from shpc_lite.resolve import credentials_from_config

    cred = credentials_from_config(config).get(ref.registry)
    if cred is not None:  # passed by environment, never on the command line
        for prefix in ("APPTAINER_", "SINGULARITY_"):
            env[prefix + "DOCKER_USERNAME"] = cred.username
            env[prefix + "DOCKER_PASSWORD"] = cred.password
    argv = [exe, "pull"]
    if mirror.startswith("http://") or plain_http_allowed(ref.registry, config["insecure_registries"]):
        argv.append("--nohttps")
    argv += [str(tmp_sif), uri]
    proc = subprocess.run(argv, env=env, capture_output=quiet, text=True, timeout=24 * 3600)
    if proc.returncode != 0:
        last = ((proc.stderr or "").strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise PullError(f"{ref}: {os.path.basename(exe)} pull failed: {last}")
    if not tmp_sif.is_file():
        raise PullError(f"{ref}: {exe} pull exited 0 but wrote no image file")
