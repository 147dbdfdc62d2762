"""Issue 12, ``discover IMAGE_REF``: an image read from its layers' tar headers in the registry,
and its base found by shared layers (or given by reference)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

from shpc_lite.discover import as_reference, config_path, layer_base
from tests import imagetools as it
from tests.needs import requires
from tests.proxy import Proxy

ENV = ["PATH=/usr/local/bin:/usr/bin:/bin"]
BASE = [it.Dir("bin"), it.Dir("usr"), it.Dir("usr/bin"), it.File("bin/ls", "#!\n", 0o755),
        it.File("bin/cat", "#!\n", 0o755), it.File("usr/bin/env", "#!\n", 0o755)]
TOP = [it.Dir("usr/local"), it.Dir("usr/local/bin"), it.File("usr/local/bin/mytool", "#!\n", 0o755),
       it.File("usr/bin/python3.11", "#!\n", 0o755), it.Symlink("usr/bin/python", "python3.11"),
       it.Symlink("usr/local/bin/loop-a", "loop-b"), it.Symlink("usr/local/bin/loop-b", "loop-a"),
       it.Symlink("usr/local/bin/dangling", "/nowhere/x"), it.Whiteout("bin/cat"), it.Opaque("usr/bin")]
NEW = ["mytool", "python", "python3.11"]  # python3.11 is on PATH too: a command of its own


def _push(registry, repo):
    """A base image and one derived from it (the same base layer, then a top layer)."""
    base_layer, top_layer = it.make_layer(BASE), it.make_layer(TOP)
    pusher = registry.pusher()
    pusher.push_image(repo, it.make_image([base_layer], env=ENV), tags=["base"])
    pusher.push_image(repo, it.make_image([base_layer, top_layer], env=ENV), tags=["top"])
    return f"{registry.host}/{repo}", top_layer


def installed_record(site) -> dict:
    """The one install record of the site."""
    from shpc_lite.config import load_config
    from shpc_lite.modules import installed

    (record,) = installed(load_config({"root": str(site.root)}, environ={}).layout)
    return {"layers": list(record.layers)}


def _names(proc):
    return [c["name"] for c in json.loads(proc.stdout)["commands"]]


def test_argument_forms_and_base_rule():
    assert as_reference("python") is None and as_reference("top") is None  # a bare name: never a registry
    assert str(as_reference("python:3.12")) == "docker.io/library/python:3.12"
    assert as_reference("127.0.0.1:5000/team/tool:1.0").registry == "127.0.0.1:5000"
    assert as_reference("127.0.0.1:5000/team/tool") is None  # the port is not a tag
    assert config_path({"config": {"Env": ["A=1", "PATH=/x:/y"]}}) == "/x:/y"
    assert config_path({}).startswith("/usr/local/sbin")
    def rec(name: str, layers: str) -> SimpleNamespace:
        return SimpleNamespace(name=name, version="1", sif=f"/{name}.sif", layers=tuple(layers))

    records = [rec("a", "1"), rec("ab", "12"), rec("ab2", "12"), rec("other", "9"), rec("same", "123"), rec("none", "")]
    found = layer_base(tuple("123"), records)
    assert (found.name, found.shared) == ("ab", 2)  # longest prefix, first of equal length; not the image itself
    assert layer_base(tuple("9"), records) is None and layer_base((), records) is None


def test_discover_image_ref_with_base_ref(site, registry, unique_repo):
    image, _ = _push(registry, unique_repo)
    # no base: the whiteout removed cat, the opaque /usr/bin env (not python, of the same layer);
    # the loop and the dangling link are no commands
    proc = site.cli("discover", f"{image}:top", "--json", check=True)
    data = json.loads(proc.stdout)
    assert data["image"] == f"{image}:top" and data["base"] is None
    assert _names(proc) == ["mytool", "ls", "python", "python3.11"], proc.stdout
    proc = site.cli("discover", f"{image}:top", "--base", f"{image}:base", "--json", check=True)
    assert _names(proc) == NEW
    assert json.loads(proc.stdout)["base"] == {"label": f"{image}:base", "how": "--base", "shared_layers": 0}
    assert not (site.root / "modules").exists()  # read, not installed
    blobs = sorted((site.root / "cache" / "blobs").rglob("data"))
    assert len(blobs) == 2  # the shared layer once


@requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")
def test_installed_base_is_found_by_shared_layers(site, registry, unique_repo):
    image, _ = _push(registry, unique_repo)
    it.image_recipe(site, "base", image, {"1": "base"})
    site.cli("--set", "puller=builtin", "install", "base:1", check=True)
    record = installed_record(site)
    assert len(record["layers"]) == 1 and record["layers"][0].startswith("sha256:")
    proc = site.cli("discover", f"{image}:top", check=True)
    assert [line.split()[0] for line in proc.stdout.splitlines()] == NEW, proc.stdout
    assert "base/1" in proc.stderr and "1 layer" in proc.stderr, proc.stderr
    data = json.loads(site.cli("discover", f"{image}:top", "--json", check=True).stdout)
    assert data["base"] == {"label": "base/1", "how": "shared layers", "shared_layers": 1}
    # the base image itself has no base but itself: nothing subtracted
    assert _names(site.cli("discover", f"{image}:base", "--json", check=True)) == ["cat", "env", "ls"]


def test_registry_that_lies_about_a_layer(site, registry, unique_repo):
    image, top_layer = _push(registry, unique_repo)

    def corrupt(path: str, body: bytes) -> bytes:
        return body[:-1] + bytes([body[-1] ^ 0xFF]) if path.endswith(top_layer.digest) else body

    with Proxy(registry.url, mutate=corrupt) as proxy:
        proc = site.cli("--set", "retries=0", "--set", f"mirrors={registry.host}={proxy.url}",
                        "discover", f"{image}:top", timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and top_layer.digest in errors[0] and unique_repo in errors[0], proc.stderr


def test_a_layer_that_is_not_a_tar_is_one_line(site, registry, unique_repo):
    bad = it.layer_from_tar(b"not a tar archive\n" * 64)
    registry.pusher().push_image(unique_repo, it.make_image([it.make_layer(BASE), bad], env=ENV), tags=["bad"])
    image = f"{registry.host}/{unique_repo}:bad"
    proc = site.cli("discover", image)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert image in errors[0] and bad.digest in errors[0] and "tar" in errors[0], errors


def test_a_name_with_a_tag_not_installed_says_both_what_was_tried(site):
    proc = site.cli("--set", "retries=0", "--set", "mirrors=docker.io=http://127.0.0.1:9",
                    "discover", "nosuchmod:1", timeout=60)
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "nosuchmod:1 is not installed" in errors[0] and "docker.io/library/nosuchmod:1" in errors[0], errors
    bare = site.cli("discover", "nosuchmod")  # a bare name is never looked up in a registry
    assert bare.returncode == 1 and "registry" not in bare.stderr and "not installed" in bare.stderr, bare.stderr
