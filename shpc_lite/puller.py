"""Pull: an image digest -> a verified SIF in the store, once, even with many processes at once.

Two back ends (config ``puller``): ``apptainer`` runs ``apptainer pull`` by digest; ``builtin``
needs no Apptainer: blobs are downloaded concurrently into a content-addressed cache (each
verified against its digest while streaming), merged into a squashfs (shpc_lite.pull) and wrapped
in a SIF (shpc_lite.sif). ``auto`` prefers apptainer when it is on PATH.

Every pull of a digest happens under that digest's lock, in a scratch directory named after the
digest beside the store; a killed pull leaves only that directory, which the next pull of the same
digest removes first. Finished blobs stay in the cache, so a rerun continues where it stopped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config, Paths
from shpc_lite.errors import PullError, SifError
from shpc_lite.fsutil import TMP_PREFIX
from shpc_lite.progress import Progress, elapsed
from shpc_lite.store import apply_group, blob_lock_path, clean_stale, digest_lock, lease, sif_name


@dataclass(frozen=True)
class StoredImage:
    path: Path
    digest: str
    pulled: bool  # False: it was in a store already
    shared_from: str = ""  # the central root it is used from by reference, if any


class Cancelled(PullError):
    """Raised inside download threads once the pull is being abandoned (Ctrl-C, another error)."""


def find_stored(config: Config, digest: str) -> Optional[StoredImage]:
    """The SIF for ``digest`` in this root, or else in the central root (used by reference)."""
    own = config.paths.containers / sif_name(digest)
    if own.is_file():
        return StoredImage(own, digest, False)
    central = config["central_root"]
    if central:
        shared = Paths(Path(central)).containers / sif_name(digest)
        if shared.is_file() and os.access(shared, os.R_OK):
            return StoredImage(shared, digest, False, shared_from=str(central))
    return None


def choose_backend(config: Config) -> str:
    wanted = config["puller"]
    have = shutil.which("apptainer") or shutil.which("singularity")
    if wanted == "apptainer" and not have:
        raise PullError("config puller is 'apptainer' but neither apptainer nor singularity is on PATH")
    if wanted == "auto":
        return "apptainer" if have else "builtin"
    return wanted


def pull(config: Config, image: str, tag: str, digest: Optional[str] = None, *, quiet: bool = False,
         client=None) -> StoredImage:
    """Make sure the SIF of ``image:tag`` (at ``digest`` when given, e.g. from the lock) is stored."""
    from shpc_lite.oci.reference import parse_reference
    from shpc_lite.resolve import client_from_config

    ref = parse_reference(f"{image}:{tag}")
    client = client or client_from_config(config)
    if digest is None:
        digest = client.head_digest(ref)
    found = find_stored(config, digest)
    if found:
        return found
    paths = config.paths
    paths.containers.mkdir(parents=True, exist_ok=True)
    clean_stale(paths, config["lock_lease"])
    with digest_lock(paths, digest, config["lock_lease"]):
        found = find_stored(config, digest)  # another process may have made it while we waited
        if found:
            return found
        # Unique even per digest: a pull that lost its lease (a frozen node) cannot touch ours.
        scratch = paths.containers / f"{TMP_PREFIX}{digest.replace(':', '-')}.{os.getpid()}-{secrets.token_hex(4)}"
        scratch.mkdir()
        dest = paths.containers / sif_name(digest)
        try:
            tmp_sif = scratch / "image.sif"
            _prepare_striping(tmp_sif, config)
            if choose_backend(config) == "apptainer":
                _pull_apptainer(config, ref, digest, tmp_sif, scratch, quiet)
            else:
                _pull_builtin(config, client, ref, digest, tmp_sif, scratch, quiet)
            _verify_sif(tmp_sif, ref)
            os.chmod(tmp_sif, config.file_mode)
            apply_group(tmp_sif, config)
            os.replace(tmp_sif, dest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return StoredImage(dest, digest, True)


def _verify_sif(path: Path, ref) -> None:
    from shpc_lite.sif import read_sif

    try:
        read_sif(path)
    except SifError as err:
        raise PullError(f"{ref}: the SIF built is not valid: {err}") from None


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


def blob_path(paths: Paths, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return paths.cache / "blobs" / algo / hexpart / "data"


def _fetch_blob(client, ref, desc, paths: Paths, progress: Progress, cancel: threading.Event,
                lease_seconds: float) -> Path:
    """One layer into the blob cache, under a per-blob lock so that no blob is fetched twice.

    A download whose lock was taken over (this process froze past the lease) stops: the new
    holder resumes the partial file."""
    dest = blob_path(paths, desc.digest)
    lost = threading.Event()
    if dest.is_file() and dest.stat().st_size == desc.size:
        progress.advance(desc.size)
        progress.layer_done(desc.digest, cached=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with lease(blob_lock_path(dest.parent), lease_seconds, 6 * 3600, on_lost=lambda _: lost.set()):
        if not (dest.is_file() and dest.stat().st_size == desc.size):
            seen = [0]

            def report(done: int, total: Optional[int]) -> None:
                if lost.is_set():
                    raise PullError(f"{ref}: layer {desc.digest}: another process took over its download "
                                    f"(this one stalled for over {lease_seconds:g} s, config lock_lease)")
                if cancel.is_set():
                    raise Cancelled(f"{ref}: pull cancelled")
                progress.advance(done - seen[0])
                seen[0] = done

            client.fetch_blob(ref, desc.digest, dest, size=desc.size, progress=report)
            progress.layer_done(desc.digest)
            return dest
    progress.advance(desc.size)
    progress.layer_done(desc.digest, cached=True)
    return dest


def _pull_builtin(config: Config, client, ref, digest: str, tmp_sif: Path, scratch: Path, quiet: bool) -> None:
    from shpc_lite.pull import LayerBlob, build_squashfs
    from shpc_lite.sif import build_container_sif

    start = time.monotonic()
    resolved = client.resolve_image(ref.with_digest(digest))
    image_config = client.get_config(resolved)
    progress = Progress(str(ref), resolved.size, len(resolved.layers), quiet=quiet)
    cancel = threading.Event()
    paths = config.paths
    try:
        pool = ThreadPoolExecutor(max_workers=max(1, config["jobs"]))
        futures = [pool.submit(_fetch_blob, client, ref, d, paths, progress, cancel, config["lock_lease"])
                   for d in resolved.layers]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
        except BaseException:
            # Do not wait for stalled downloads (Ctrl-C must be prompt). What they received stays
            # in the blob cache as <digest>/data.partial: the next pull resumes it.
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        layers = [LayerBlob(blob_path(paths, d.digest), d.media_type, d.digest) for d in resolved.layers]
        progress.stage("building squashfs")
        squashfs = scratch / "rootfs.squashfs"
        build_squashfs(
            layers, image_config, squashfs,
            source_ref=str(ref), source_digest=digest,
            compression=config["squashfs_compression"], level=config["squashfs_level"] or None,
            workdir=scratch,
        )
        arch = (resolved.platform.architecture if resolved.platform else "") or image_config.get("architecture", "amd64")
        build_container_sif(
            tmp_sif, squashfs,
            deffile=f"bootstrap: docker\nfrom: {ref.with_digest(digest)}\n".encode(),
            json_objects={"oci-config.json": json.dumps(image_config.get("config") or {}, sort_keys=True).encode()},
            arch=arch,
        )
        squashfs.unlink()
        progress.close(f"{ref}: stored in {elapsed(start)}")
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------- apptainer


def _loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in ("localhost", "127.0.0.1", "[::1]") or name.startswith("127.")


def _pull_apptainer(config: Config, ref, digest: str, tmp_sif: Path, scratch: Path, quiet: bool) -> None:
    exe = shutil.which("apptainer") or shutil.which("singularity")
    mirror = config["mirrors"].get(ref.registry, "")
    host = mirror.split("://", 1)[-1].rstrip("/").rsplit("@", 1)[-1] if mirror else ref.registry
    uri = f"docker://{host}/{ref.repository}@{digest}"
    cache = config.paths.cache / "apptainer"
    cache.mkdir(parents=True, exist_ok=True)
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
    if mirror.startswith("http://") or ref.registry in config["insecure_registries"] or _loopback(ref.registry):
        argv.append("--nohttps")
    argv += [str(tmp_sif), uri]
    proc = subprocess.run(argv, env=env, capture_output=quiet, text=True, timeout=24 * 3600)
    if proc.returncode != 0:
        last = ((proc.stderr or "").strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise PullError(f"{ref}: {os.path.basename(exe)} pull failed: {last}")
    if not tmp_sif.is_file():
        raise PullError(f"{ref}: {exe} pull exited 0 but wrote no image file")
