"""Install-time image preparation for kinds that do not run the stored SIF.

Podman (and podman-hpc) run images from their own storage, Shifter from its image gateway: a
wrapper must find the image there on its first call, so ``install`` puts it there by digest,
after the SIF is stored (``inspect`` and the other kinds still use the SIF) and before the module
is written (a module whose image is not runnable is never published). Kinds that run the SIF
need nothing here.

Plain podman gets the image from shpc-lite's blob cache where the builtin puller left every
layer there: the manifest (and index) bytes the pinned digest names and the config are fetched
again (small), the layers are not; an OCI archive of them is given to ``podman load``, which
names the image from the archive (``registry/repo:tag``) and records its digest, so the
wrappers' ``registry/repo@digest`` finds it. Otherwise (layers not cached, e.g. the SIF came
from apptainer or a central store; podman-hpc, whose pull also squashes the image for its
shared storage; a configured platform) the runtime pulls from the registry itself: config
``mirrors`` and ``insecure_registries`` reach it through a private registries.conf (the image
keeps its own name), credentials through a private auth file named by ``REGISTRY_AUTH_FILE``,
never argv.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from shpc_lite.config import Config
from shpc_lite.errors import PullError

if TYPE_CHECKING:
    from shpc_lite.modules import ModuleSpec

@dataclass(frozen=True)
class PullCommand:
    """One runtime pull, decided before anything runs: what to call and which files it reads."""

    argv: tuple[str, ...]
    registries_conf: str = ""  # TOML for CONTAINERS_REGISTRIES_CONF ("" : podman's own)
    auth: str = ""  # JSON for REGISTRY_AUTH_FILE ("" : the user's own auth files)


def prepare(config: Config, spec: "ModuleSpec", *, quiet: bool = False) -> None:
    """Make the module's image runnable by its kind (nothing for kinds that run the SIF)."""
    form = spec.runtime_kind.image_form
    if form == "podman":
        if not _load_from_cache(config, spec, quiet):
            _run(podman_pull(config, spec), spec.pinned_image, quiet)
    elif form == "shifter":
        _run(shifter_pull(config, spec), spec.pinned_image, quiet)


@dataclass(frozen=True)
class CachedImage:
    """An image whose every layer is in the blob cache, with the exact documents its digest names."""

    name: str  # registry/repo:tag, what ``podman load`` names it
    digest: str  # the pinned digest (of ``index`` when there is one, else of ``manifest``)
    index: Optional[tuple[str, bytes]]  # (media type, bytes) of a multi-platform index
    manifest: tuple[str, str, bytes]  # (media type, digest, bytes) of the platform's manifest
    config: tuple[str, bytes]  # (digest, bytes)
    layers: tuple[tuple[str, Path], ...]  # (digest, cached data file)


def cached_image(config: Config, spec: "ModuleSpec") -> Optional[CachedImage]:
    """The module's image from the blob cache, or None when a layer is not there."""
    from shpc_lite.oci.reference import parse_reference
    from shpc_lite.resolve import client_from_config

    ref = parse_reference(spec.image).with_digest(spec.digest)
    with client_from_config(config) as client:
        resolved = client.resolve_image(ref)
        layers = tuple((d.digest, config.layout.blob_data(d.digest)) for d in resolved.layers)
        if not all(path.is_file() for _, path in layers):
            return None
        config_bytes = client.get_blob_bytes(ref, resolved.config.digest)
    index = (resolved.index.media_type, resolved.index.data) if resolved.index is not None else None
    manifest = resolved.manifest
    return CachedImage(f"{ref.name}:{spec.tag or 'latest'}", resolved.digest, index,
                       (manifest.media_type, manifest.digest, manifest.data),
                       (resolved.config.digest, config_bytes), layers)


def write_oci_archive(image: CachedImage, dest: Path) -> None:
    """An OCI image layout as a tar (``podman load`` names the image from its ref annotation)."""
    import io
    import tarfile

    def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    def blob(digest: str) -> str:
        return "blobs/" + digest.replace(":", "/", 1)

    media_type, manifest_digest, manifest = image.manifest
    top_type, top = image.index if image.index is not None else (media_type, manifest)
    entry = {"mediaType": top_type, "digest": image.digest, "size": len(top),
             "annotations": {"org.opencontainers.image.ref.name": image.name}}
    with tarfile.open(dest, "w") as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode())
        if image.index is not None:
            add_bytes(tar, blob(image.digest), top)
        add_bytes(tar, blob(manifest_digest), manifest)
        add_bytes(tar, blob(image.config[0]), image.config[1])
        for digest, path in dict(image.layers).items():  # a layer may repeat: once is enough
            tar.add(str(path), blob(digest), recursive=False)


def _load_from_cache(config: Config, spec: "ModuleSpec", quiet: bool) -> bool:
    """``podman load`` the image from the blob cache; False when it cannot be (pull instead)."""
    from shpc_lite.fsutil import TMP_PREFIX

    if spec.runtime_kind.name != "podman" or config["platform"] or not spec.digest:
        return False
    image = cached_image(config, spec)
    if image is None:
        return False
    layout = config.layout
    scratch = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "podman-", dir=layout.make_dir(layout.cache)))
    try:
        archive = scratch / "image.tar"
        write_oci_archive(image, archive)
        _run(PullCommand((config["runtime"], "load", "-i", str(archive))), spec.pinned_image, quiet, "load")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return True


def podman_pull(config: Config, spec: "ModuleSpec") -> PullCommand:
    """``<runtime> pull <registry/repo@digest>``; mirrors as podman mirrors of the registry
    (so the stored name stays the one wrappers run), plain http and loopback hosts without TLS."""
    from shpc_lite.oci.client import plain_http_allowed, split_userinfo
    from shpc_lite.oci.reference import parse_reference
    from shpc_lite.resolve import credentials_from_config

    if not spec.digest:
        raise PullError(f"{spec.module}: {spec.runtime_kind.name} needs the image's digest (install it from a registry)")
    ref = parse_reference(spec.image)
    argv = [config["runtime"], "pull"]
    insecure = plain_http_allowed(ref.registry, config["insecure_registries"])
    mirror = config["mirrors"].get(ref.registry, "")
    conf = ""
    host = ref.registry
    if mirror:
        parts = urlsplit(split_userinfo(mirror)[0])
        host = parts.netloc
        location = parts.netloc + parts.path.rstrip("/")
        conf = (f"[[registry]]\nprefix = {json.dumps(ref.registry)}\nlocation = {json.dumps(ref.registry)}\n"
                f"insecure = {json.dumps(insecure)}\n"
                f"[[registry.mirror]]\nlocation = {json.dumps(location)}\n"
                f"insecure = {json.dumps(parts.scheme == 'http' or host in config['insecure_registries'])}\n")
    elif insecure:
        argv.append("--tls-verify=false")
    if config["platform"]:  # the platform the SIF was made for, not the host's
        argv.append(f"--platform={config['platform']}")
    argv.append(spec.pinned_image)
    cred = credentials_from_config(config).get(ref.registry)
    auth = ""
    if cred is not None:
        token = base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()
        auth = json.dumps({"auths": {host: {"auth": token}}})
    return PullCommand(tuple(argv), conf, auth)


def shifter_pull(config: Config, spec: "ModuleSpec") -> PullCommand:
    """``shifterimg pull docker:<[registry/]repo@digest>``: the gateway fetches it (its own
    credentials: ``shifterimg login``), the same name the wrappers give ``--image``."""
    runtime = config["runtime"]
    beside = Path(runtime).parent / "shifterimg" if os.sep in runtime else None
    exe = str(beside) if beside is not None and os.access(beside, os.X_OK) else shutil.which("shifterimg")
    if exe is None:
        raise PullError(f"{spec.module}: shifterimg is not on PATH: the shifter kind pulls images with it")
    return PullCommand((exe, "pull", spec.runtime_kind.shifter_image(spec.pinned_image)))


def _run(command: PullCommand, label: str, quiet: bool, verb: str = "pull") -> None:
    """Run one pull with its private files (in a 0700 directory, removed after)."""
    env = dict(os.environ)
    scratch: Optional[str] = None
    try:
        if command.registries_conf or command.auth:
            scratch = tempfile.mkdtemp(prefix="shpc-lite-pull-")
            if command.registries_conf:
                env["CONTAINERS_REGISTRIES_CONF"] = _private_file(scratch, "registries.conf", command.registries_conf)
            if command.auth:
                env["REGISTRY_AUTH_FILE"] = _private_file(scratch, "auth.json", command.auth)
        try:
            last = _stream(command.argv, env, quiet)
        except OSError as err:
            raise PullError(f"{label}: cannot run {command.argv[0]}: {err.strerror}") from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if last is not None:
        from shpc_lite.scrub import scrub

        raise PullError(scrub(f"{label}: {os.path.basename(command.argv[0])} {verb} failed: {last}"))


def _stream(argv: tuple[str, ...], env: dict[str, str], quiet: bool) -> Optional[str]:
    """Run ``argv``, its progress (stderr) shown unless ``quiet``; None on success, else the last
    line it wrote (the reason), so that the one-line error says what the runtime said."""
    with subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          errors="replace", stdout=subprocess.DEVNULL if quiet else sys.stderr) as proc:
        last = ""
        assert proc.stderr is not None
        for line in proc.stderr:
            if not quiet:
                sys.stderr.write(line)
            last = line.strip() or last
    return None if proc.returncode == 0 else (last or f"exit code {proc.returncode}")


def _private_file(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path
