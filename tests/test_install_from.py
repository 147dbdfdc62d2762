"""Issue 10: ``install NAME:VERSION --from oci:DIR | oci-archive:PATH | docker-archive:PATH``.

Images are built by the tests (tests/imagetools.py), pushed to the real local registry and
exported by skopeo (as a site would have them), or written by hand (hostile ones). Each install
goes through the same layer code and store as a registry pull: the SIF is checked with siftool and
unsquashfs, the module with real Lmod, and one image really runs (squashfuse + ch-run).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import imagetools as it
from tests.imagetools import image_recipe, sif_tree
from tests.needs import missing, need_tools
from tests.conftest import read_record
from tests.modsys import have, run_bash
from tests.test_container_runs import busybox_image

REF_NAME = "org.opencontainers.image.ref.name"


@pytest.fixture(autouse=True)
def _tools():
    need_tools("skopeo", "mksquashfs", "unsquashfs", "siftool")


def from_image():
    """A few files, a symlink, a whiteout across two layers, an ENTRYPOINT and ENV."""
    base = it.make_layer([
        it.Dir("usr"), it.Dir("usr/bin"), it.Dir("data"), it.Dir("tmp", 0o1777),
        it.File("usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755),
        it.File("data/old.txt", "old\n"), it.File("data/keep.txt", "keep\n"),
    ], "gzip")
    top = it.make_layer([it.Whiteout("data/old.txt"), it.Symlink("usr/bin/tool-link", "tool"),
                         it.File("data/new.txt", "new\n")], None)
    return it.make_image([base, top], oci=True, env=["PATH=/usr/bin:/bin", "GREETING=hello archive"],
                         entrypoint=["/usr/bin/tool"], labels={"org.example": "from"})


def skopeo_export(registry, repo: str, dest: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{registry.host}/{repo}:1.0", dest], check=True, capture_output=True, timeout=60)


def write_layout(directory: Path, image, tag: str = "1.0") -> Path:
    """An OCI image layout written by hand (what ``skopeo copy ... oci:DIR:TAG`` writes) of an
    image or a multi-platform index."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for child in getattr(image, "children", (image,)):
        for blob in child.blobs:
            (blobs / blob.digest.split(":")[1]).write_bytes(blob.data)
        (blobs / child.digest.split(":")[1]).write_bytes(child.manifest)
    (blobs / image.digest.split(":")[1]).write_bytes(image.manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry = {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest),
             "annotations": {REF_NAME: tag}}
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return directory


def docker_save(path: Path, image: it.Image, repo_tag: str) -> Path:
    """A docker archive as ``docker save`` (before Docker 25) writes it: ``<config hex>.json``,
    ``<n>/layer.tar`` uncompressed, ``manifest.json``."""
    import zstandard

    members = {f"{image.config.digest[7:]}.json": image.config.data}
    for n, blob in enumerate(image.layers):
        data = blob.data
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:4] == b"\x28\xb5\x2f\xfd":
            data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
        members[f"{n}/layer.tar"] = data
    manifest = [{"Config": f"{image.config.digest[7:]}.json", "RepoTags": [repo_tag],
                 "Layers": [f"{n}/layer.tar" for n in range(len(image.layers))]}]
    return _docker_archive(path, members, manifest)


def assert_nothing_stored(site) -> None:
    containers = site.root / "containers"
    assert not list(containers.glob("*.sif")) and not list(containers.glob(".shpc-lite-tmp-*"))
    assert not (site.root / "modules").exists()


def one_error(proc) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("shpc-lite: error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr  # progress lines aside
    return lines[0]


def test_oci_layout_archive_and_docker_archive_install_the_same_tree(site, registry, unique_repo, tmp_path):
    image = from_image()
    registry.pusher().push_image(unique_repo, image, tags=["1.0"])
    layout_dir, oci_tar, docker_tar = tmp_path / "layout", tmp_path / "img.oci.tar", tmp_path / "img.docker.tar"
    skopeo_export(registry, unique_repo, f"oci:{layout_dir}:1.0")
    skopeo_export(registry, unique_repo, f"oci-archive:{oci_tar}:1.0")
    skopeo_export(registry, unique_repo, f"docker-archive:{docker_tar}:example/from:1.0")
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    manifest_digest = json.loads((layout_dir / "index.json").read_text())["manifests"][0]["digest"]

    trees = {}
    for version, source in (("1.0", f"oci:{layout_dir}:1.0"), ("1.1", f"oci-archive:{oci_tar}"),
                            ("1.2", f"docker-archive:{docker_tar}")):
        proc = site.cli("install", f"demo:{version}", "--from", source)
        assert proc.returncode == 0, proc.stderr
        record = json.loads((site.root / "wrappers/demo" / version / "install.json").read_text())
        sif = Path(record["sif"])
        assert record["image"] == "example.org/demo" and record["tag"] == "1.0"
        # the layer digests, for discover's base by shared layers (skopeo may recompress them)
        layers = [layer.digest for layer in image.layers]
        assert len(record["layers"]) == len(layers) and all(d.startswith("sha256:") for d in record["layers"]), record
        listing = subprocess.run(["siftool", "list", str(sif)], capture_output=True, text=True, check=True).stdout
        assert "FS (Squashfs/*System/amd64)" in listing and "JSON.Generic" in listing and "Def.FILE" in listing
        (tmp_path / version).mkdir()
        tree, out = sif_tree(sif, tmp_path / version)
        env = (out / ".singularity.d/env/10-docker2singularity.sh").read_text()
        assert 'export PATH="/usr/bin:/bin"' in env and "hello archive" in env
        assert "/usr/bin/tool" in (out / ".singularity.d/runscript").read_text()
        labels = json.loads((out / ".singularity.d/labels.json").read_text())
        assert labels["org.example"] == "from" and labels["org.opencontainers.image.base.digest"] == record["digest"]
        trees[version] = {k: v for k, v in tree.items() if not k.startswith("/.singularity.d/labels")}
        # OCI sources are stored under the manifest digest (as a pull stores them); docker
        # archives have no manifest: under the config digest (Docker's image ID)
        want = manifest_digest if version != "1.2" else image.config.digest
        assert record["digest"] == want and sif == site.root / "containers" / f"sha256-{want[7:]}.sif"
    tree = trees["1.0"]
    assert "/data/old.txt" not in tree and tree["/data/new.txt"].startswith("file 644")
    assert tree["/usr/bin/tool-link"] == "link->tool" and tree["/tmp"] == "dir 1777"
    assert not any(".wh." in p for p in tree)
    assert trees["1.0"] == trees["1.1"] == trees["1.2"]
    # the same archive again: the stored SIF is reused; the layout and the archive share it
    before = {p: p.stat().st_mtime_ns for p in (site.root / "containers").glob("*.sif")}
    assert len(before) == 2
    site.cli("install", "demo:1.3", "--from", f"oci-archive:{oci_tar}:1.0", check=True)
    assert {p: p.stat().st_mtime_ns for p in (site.root / "containers").glob("*.sif")} == before
    # the module loads and the alias reaches the runtime with that SIF
    if have("lmod") or os.environ.get("CI", "").lower() == "true":
        res = run_bash("lmod", f"module use {site.root}/modules\nmodule load demo/1.2\ntool 'a b'", site.env)
        assert res.returncode == 0, res.stderr.decode()
        argv, _ = read_record(site)
        assert argv == [b"exec", str(site.root / "containers" / f"sha256-{image.config.digest[7:]}.sif").encode(),
                        b"/usr/bin/tool", b"a b"]


def test_from_a_docker_archive_and_an_oci_archive_made_by_the_tests_install_and_run(site, tmp_path):
    need_tools("ch-run", "squashfuse")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not have("lmod"):
        missing("squashfuse needs root and /dev/fuse, and the test needs Lmod")
    image = busybox_image()  # a zstd layer in a Docker manifest: skopeo refuses it, so written by hand
    docker_tar, oci_tar = tmp_path / "bb.docker.tar", tmp_path / "bb.oci.tar"
    docker_save(docker_tar, image, "example/tiny:1.0")
    with tarfile.open(oci_tar, "w") as tar:
        tar.add(write_layout(tmp_path / "layout", image), arcname=".")
    image_recipe(site, "tiny", "example.org/tiny", {"1.0": "1.0"})
    site.write_recipe("tiny", (site.recipes / "tiny.yaml").read_text().replace(
        "aliases:\n", "aliases:\n  motd: cat /etc/motd\n"))
    for name in ("singularity", "apptainer"):
        shutil.copy(Path(__file__).parent / "runtime_chrun.sh", site.bin / name)
    site.cli("install", "tiny:1.0", "--from", f"docker-archive:{docker_tar}:example/tiny:1.0", check=True)
    site.cli("install", "tiny:2.0", "--from", f"oci-archive:{oci_tar}", check=True)
    for version in ("1.0", "2.0"):
        proc = run_bash("lmod", f"module use {site.root / 'modules'}\nmodule load tiny/{version}\nmotd\n",
                        site.env, timeout=120)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
        assert proc.stdout.decode().splitlines() == ["hello from inside the image"]


def test_a_multi_platform_layout_is_narrowed_like_a_registry_pull(site, tmp_path):
    amd = from_image()
    arm = it.make_image([it.make_layer([it.File("arch", "arm64\n")])], oci=True, architecture="arm64")
    index = it.make_index({"linux/amd64": amd, "linux/arm64": arm}, oci=True)
    layout = write_layout(tmp_path / "layout", index)
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    site.cli("--set", "platform=linux/arm64", "install", "demo:1.0", "--from", f"oci:{layout}:1.0", check=True)
    record = json.loads((site.root / "wrappers/demo/1.0/install.json").read_text())
    assert record["digest"] == index.digest  # stored under what the tag names, as a pull stores it
    listing = subprocess.run(["siftool", "list", record["sif"]], capture_output=True, text=True, check=True).stdout
    assert "FS (Squashfs/*System/arm64)" in listing
    line = one_error(site.cli("--set", "platform=linux/s390x", "install", "demo:1.1", "--from", f"oci:{layout}"))
    assert str(layout) in line and "no image for platform linux/s390x" in line and "linux/arm64" in line


def test_a_layout_that_lies_about_a_digest_is_refused(site, tmp_path):
    image = from_image()
    layout = write_layout(tmp_path / "layout", image)
    victim = layout / "blobs/sha256" / image.layers[1].digest[7:]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    line = one_error(site.cli("install", "demo:1.0", "--from", f"oci:{layout}"))
    assert str(layout) in line and image.layers[1].digest in line and "lies" in line
    assert_nothing_stored(site)
    assert not (site.root / "cache/blobs/sha256" / image.layers[1].digest[7:] / "data").exists()


def test_a_missing_blob_is_one_line(site, tmp_path):
    image = from_image()
    layout = write_layout(tmp_path / "layout", image)
    (layout / "blobs/sha256" / image.layers[0].digest[7:]).unlink()
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    line = one_error(site.cli("install", "demo:1.0", "--from", f"oci:{layout}:1.0"))
    assert str(layout) in line and image.layers[0].digest[7:] in line and "missing" in line
    assert_nothing_stored(site)


def _docker_archive(path: Path, members: dict, manifest: list) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in {**members, "manifest.json": json.dumps(manifest).encode()}.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tarfile.TarInfo):
                tar.addfile(data)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_hostile_docker_archives_are_refused(site, tmp_path):
    image = from_image()
    layer = image.layers[0].data
    config = image.config.data
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    outside = tmp_path / "secret.json"
    outside.write_bytes(config)
    link = tarfile.TarInfo("cfg.json")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    cases = {
        "traversal": ({"../evil/layer.tar": layer, "c.json": config},
                      [{"Config": "c.json", "Layers": ["../evil/layer.tar"]}], "'..' path"),
        "points outside": ({"c.json": config}, [{"Config": "../secret.json", "Layers": []}], "'..' path"),
        "symlink out": ({"cfg.json": link}, [{"Config": "cfg.json", "Layers": []}], "links outside"),
        "missing layer": ({"c.json": config}, [{"Config": "c.json", "Layers": ["nope/layer.tar"]}], "rootfs.diff_ids"),
        "deep json": ({}, b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "huge json": ({}, b" " * (5 << 20) + b"[]", "larger than"),
        "layer lies": ({"c.json": config, "0/layer.tar": it.make_tar({"x": "y"}), "1/layer.tar": b""},
                       [{"Config": "c.json", "Layers": ["0/layer.tar", "1/layer.tar"]}], "but the config says"),
    }
    for what, (members, manifest, expected) in cases.items():
        archive = tmp_path / f"{what.replace(' ', '-')}.tar"
        if isinstance(manifest, bytes):
            with tarfile.open(archive, "w") as tar:
                info = tarfile.TarInfo("manifest.json")
                info.size = len(manifest)
                tar.addfile(info, io.BytesIO(manifest))
        else:
            _docker_archive(archive, members, manifest)
        line = one_error(site.cli("install", "demo:1.0", "--from", f"docker-archive:{archive}"))
        assert str(archive) in line and expected in line, (what, line)
        assert_nothing_stored(site)


def test_a_docker_archive_with_a_layer_linked_inside_it_installs(site, tmp_path):
    """Old ``docker save`` links a layer.tar an image repeats to its first copy."""
    layer = it.make_layer([it.File("hello.txt", "hi\n")], None)
    image = it.make_image([layer, layer])
    link = tarfile.TarInfo("1/layer.tar")
    link.type, link.linkname = tarfile.SYMTYPE, "../0/layer.tar"
    archive = _docker_archive(tmp_path / "linked.tar", {"c.json": image.config.data, "0/layer.tar": layer.data,
                                                        "1/layer.tar": link},
                              [{"Config": "c.json", "RepoTags": None, "Layers": ["0/layer.tar", "1/layer.tar"]}])
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    site.cli("install", "demo:2.0", "--from", f"docker-archive:{archive}", check=True)
    record = json.loads((site.root / "wrappers/demo/2.0/install.json").read_text())
    assert record["tag"] == "2.0" and record["digest"] == image.config.digest  # no RepoTags: the version


def test_from_needs_a_known_recipe_and_a_version_and_excludes_sif(site, tmp_path):
    image_recipe(site, "demo", "example.org/demo", {"1.0": "1.0"})
    layout = write_layout(tmp_path / "layout", from_image())
    assert "unknown recipe" in one_error(site.cli("install", "nosuch:1.0", "--from", f"oci:{layout}"))
    assert "needs a version" in one_error(site.cli("install", "demo", "--from", f"oci:{layout}"))
    assert "expected oci:DIR" in one_error(site.cli("install", "demo:1.0", "--from", f"tarball:{layout}"))
    proc = site.cli("install", "demo:1.0", "--from", f"oci:{layout}", "--sif", str(tmp_path / "x.sif"))
    assert proc.returncode != 0 and "not allowed with" in proc.stderr
    assert_nothing_stored(site)
