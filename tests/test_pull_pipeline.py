"""Issue 13, the builtin pull for big images: layers merged while later ones download, gzip read
with python-isal (stdlib fallback), and config ``keep_blobs`` (false: no blob cache is written).

Images are built by the tests and pushed to the real CNCF registry fixture; the SIFs are read back
with the real unsquashfs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shpc_lite.sif import read_sif
from tests import imagetools as it
from tests.imagetools import image_recipe, sif_tree
from tests.needs import requires
from tests.proxy import Proxy

pytestmark = requires(shutil.which("mksquashfs") and shutil.which("unsquashfs"), reason="squashfs-tools not installed")


def mixed_image(oci: bool = False):
    """Three layers, gzip and zstd, with a whiteout, an opaque dir, a hard link and a 2 MB file."""
    base = it.make_layer([
        it.Dir("usr"), it.Dir("usr/bin"), it.Dir("data"), it.Dir("opaque"),
        it.File("usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755),
        it.File("data/old.txt", "old\n"), it.File("data/keep.txt", "keep\n"), it.File("opaque/a.txt", "a\n"),
        *[it.File(f"data/many/f{i}.txt", f"file {i}\n" * (i + 1)) for i in range(60)],
    ], "gzip")
    middle = it.make_layer([it.File("data/big.bin", os.urandom(2 << 20), 0o600)], "gzip")
    top = it.make_layer([
        it.Whiteout("data/old.txt"), it.Opaque("opaque"), it.File("opaque/b.txt", "b\n"),
        it.Symlink("usr/bin/tool-link", "tool"), it.Hardlink("data/keep-hard", "data/keep.txt"),
    ], "zstd")
    return it.make_image([base, middle, top], oci=oci, env=["PATH=/usr/bin:/bin"], entrypoint=["/usr/bin/tool"])


def squashfs_listing(sif: Path, tmp: Path) -> tuple[str, dict[str, str]]:
    """The squashfs partition as ``unsquashfs -lln`` lists it (names, modes, owners, sizes, times)
    and the sha256 of every regular file's content."""
    part = next(d for d in read_sif(sif).descriptors if d.data_type == 0x4004)
    listing = subprocess.run(["unsquashfs", "-o", str(part.offset), "-lln", str(sif)], capture_output=True,
                             text=True, check=True, timeout=120).stdout
    tmp.mkdir(parents=True, exist_ok=True)
    tree, out = sif_tree(sif, tmp)
    hashes = {path: hashlib.sha256((out / path.lstrip("/")).read_bytes()).hexdigest()
              for path, kind in tree.items() if kind.startswith("file")}
    subprocess.run(["chmod", "-R", "u+rwX", str(out)], check=False)
    shutil.rmtree(out)
    return listing, hashes


def no_blobs_left(root: Path) -> bool:
    blobs = root / "cache" / "blobs"
    return not blobs.exists() or not [p for p in blobs.rglob("*") if p.is_file()]


def test_keep_blobs_false_stores_a_verified_image_and_no_blob(site, registry, unique_repo, tmp_path):
    image = mixed_image()
    registry.pusher().push_image(unique_repo, image, tags=["1.0"])
    image_recipe(site, "noblobs", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    image_recipe(site, "withblobs", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    proc = site.cli("--set", "puller=builtin", "install", "noblobs:1.0", extra_env={"SHPC_LITE_KEEP_BLOBS": "false"})
    assert proc.returncode == 0, proc.stderr
    sif = site.root / "containers" / f"sha256-{image.digest.split(':')[1]}.sif"
    assert sif.is_file()
    assert no_blobs_left(site.root)
    assert not list((site.root / "containers").glob(".shpc-lite-tmp-*"))
    (tmp_path / "a").mkdir()
    tree, _ = sif_tree(sif, tmp_path / "a")
    assert "/data/old.txt" not in tree and "/opaque/a.txt" not in tree and tree["/opaque/b.txt"].startswith("file")
    assert tree["/data/keep-hard"].endswith("nlink=2") and tree["/data/big.bin"].startswith("file 600")
    without = squashfs_listing(sif, tmp_path / "b")

    # the default (keep_blobs true) caches every layer and builds the same tree
    sif.unlink()
    proc = site.cli("--set", "puller=builtin", "--set", "keep_blobs=true", "install", "withblobs:1.0")
    assert proc.returncode == 0, proc.stderr
    for layer in image.layers:
        assert (site.root / "cache" / "blobs" / "sha256" / layer.digest.split(":")[1] / "data").is_file()
    assert squashfs_listing(sif, tmp_path / "c") == without


@pytest.mark.parametrize("which", [0, 2], ids=["lowest-layer", "top-layer"])
def test_lying_registry_with_keep_blobs_false_stores_nothing(site, registry, unique_repo, which):
    """A layer whose bytes do not match its digest: one line naming the image and the layer, and
    nothing stored (no SIF, no module, no blob, no scratch), whether the merge had started on the
    layers below it (top layer) or not (lowest)."""
    image = mixed_image()
    registry.pusher().push_image(unique_repo, image, tags=["1.0"])
    layer = image.layers[which].digest

    def corrupt(path: str, body: bytes) -> bytes:
        return body[:-1] + bytes([body[-1] ^ 0xFF]) if path.endswith(layer) else body

    image_recipe(site, "liar", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    with Proxy(registry.url, mutate=corrupt) as proxy:
        proc = site.cli("--set", "puller=builtin", "--set", "retries=0", "--set", "keep_blobs=false",
                        "--set", f"mirrors={registry.host}={proxy.url}", "install", "liar:1.0", timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shpc-lite: error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert layer in errors[0] and unique_repo in errors[0], errors[0]
    assert not list((site.root / "containers").glob("*.sif"))
    assert not list((site.root / "containers").glob(".shpc-lite-tmp-*"))
    assert not (site.root / "modules").exists()
    assert no_blobs_left(site.root)


def test_stdlib_gzip_fallback_builds_the_same_squashfs(site, registry, unique_repo, tmp_path):
    """With python-isal not importable, gzip layers are read with the stdlib and the SIF holds the
    same tree (names, modes, owners, sizes, times, contents) as with isal."""
    image = mixed_image()
    registry.pusher().push_image(unique_repo, image, tags=["1.0"])
    image_recipe(site, "gz", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    image_recipe(site, "gz2", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    sif = site.root / "containers" / f"sha256-{image.digest.split(':')[1]}.sif"
    proc = site.cli("--set", "puller=builtin", "install", "gz:1.0")
    assert proc.returncode == 0, proc.stderr
    fast = squashfs_listing(sif, tmp_path / "fast")
    sif.unlink()

    # a package named isal first on the path, whose import fails (and says it was tried)
    shim = tmp_path / "shim"
    (shim / "isal").mkdir(parents=True)
    marker = tmp_path / "isal-import-tried"
    (shim / "isal" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('isal hidden by the test')\n")
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{site.env['PYTHONPATH']}"}
    proc = site.cli("--set", "puller=builtin", "--set", "keep_blobs=false", "install", "gz2:1.0", extra_env=env)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and sif.is_file()
    assert squashfs_listing(sif, tmp_path / "slow") == fast


def test_keep_blobs_false_from_an_oci_layout_writes_no_blob(site, tmp_path):
    """``--from`` sources honour keep_blobs too: the layers are verified and used from the scratch
    dir; with the default they land in the blob cache."""
    from tests.test_install_from import write_layout

    image = mixed_image(oci=True)
    layout = write_layout(tmp_path / "layout", image)
    image_recipe(site, "local", "example.org/local", {"1.0": "1.0", "1.1": "1.1"})
    proc = site.cli("--set", "keep_blobs=false", "install", "local:1.0", "--from", f"oci:{layout}:1.0")
    assert proc.returncode == 0, proc.stderr
    sif = site.root / "containers" / f"sha256-{image.digest.split(':')[1]}.sif"
    assert sif.is_file() and no_blobs_left(site.root)
    assert not list((site.root / "containers").glob(".shpc-lite-tmp-*"))
    (tmp_path / "t").mkdir()
    tree, _ = sif_tree(sif, tmp_path / "t")
    assert tree["/data/big.bin"].startswith("file 600") and "/data/old.txt" not in tree


def test_squashfs_writer_config_chooses_who_writes_the_squashfs(site, registry, unique_repo, tmp_path):
    """The default (``auto`` with zstd) writes the squashfs natively and never runs mksquashfs (a
    recording wrapper first on PATH); ``squashfs_writer=mksquashfs`` runs it. Both SIFs hold the same
    tree with the same contents (directory sizes aside: the writers lay out listings differently)."""
    image = mixed_image()
    registry.pusher().push_image(unique_repo, image, tags=["1.0"])
    bindir, calls = tmp_path / "wrap", tmp_path / "mksquashfs-calls"
    bindir.mkdir()
    (bindir / "mksquashfs").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {shutil.which("mksquashfs")} "$@"\n')
    (bindir / "mksquashfs").chmod(0o755)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    sif = site.root / "containers" / f"sha256-{image.digest.split(':')[1]}.sif"
    trees = {}
    for n, writer in enumerate(("auto", "mksquashfs")):
        image_recipe(site, f"w{n}", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
        proc = site.cli("--set", "puller=builtin", "--set", f"squashfs_writer={writer}", "install", f"w{n}:1.0",
                        extra_env=env)
        assert proc.returncode == 0, proc.stderr
        assert calls.exists() == (writer == "mksquashfs"), writer
        listing, hashes = squashfs_listing(sif, tmp_path / writer)
        lines = sorted(" ".join(f for i, f in enumerate(line.split()) if not (line.startswith("d") and i == 2))
                       for line in listing.splitlines() if "squashfs-root/" in line)
        trees[writer] = lines, hashes
        sif.unlink()
    assert trees["auto"] == trees["mksquashfs"]
    assert len(trees["auto"][1]) > 60
