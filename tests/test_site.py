"""Issue 5: batch installs of a whole stack from a manifest, against the real local registry.

Images are built and pushed by the test; the runtime at the end is the recording stand-in.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests import imagetools as it
from tests.modsys import have, run_bash
from tests.proxy import Proxy
from tests.needs import requires

pytestmark = requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")

NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def _image(seed: str):
    layer = it.make_layer([it.Dir("opt"), it.File(f"opt/{seed}.txt", f"{seed}\n" * 50)], "gzip")
    return it.make_image([layer], entrypoint=["/bin/sh"], env=["PATH=/bin", f"SEED={seed}"])


def _recipe(site, name, image, versions):
    body = [f"name: {name}", f"image: {image}", f"description: {name} for the batch test", "versions:"]
    body += [f"  '{v}': '{t}'" for v, t in versions.items()]
    body += ["aliases:", f"  {name}-tool: /bin/sh"]
    site.write_recipe(name, "\n".join(body) + "\n")


@pytest.fixture
def stack(site, registry, unique_repo):
    """Six images (two versions of alpha) plus two recipes that share one image digest."""
    pusher = registry.pusher()
    digests = {}
    for name in NAMES:
        image = _image(name)
        repo = f"{unique_repo}/{name}"
        tags = ["1.0", "2.0"] if name == "alpha" else ["1.0"]
        pusher.push_image(repo, image, tags=tags)
        digests[name] = image.digest
        _recipe(site, name, f"{registry.host}/{repo}", {t: t for t in tags})
    shared = _image("shared")
    for name in ("share-one", "share-two"):
        pusher.push_image(f"{unique_repo}/{name}", shared, tags=["1.0"])
        _recipe(site, name, f"{registry.host}/{unique_repo}/{name}", {"1.0": "1.0"})
    digests["shared"] = shared.digest
    return digests


def _manifest(site, entries, name="site.yaml"):
    path = site.tmp / name
    path.write_text("modules:\n" + "".join(f"  - {e}\n" for e in entries))
    return path


def _sifs(site):
    return sorted(p.name for p in (site.root / "containers").glob("*.sif"))


def test_batch_install_dry_run_idempotent_and_failures(site, stack):
    entries = ["alpha", "bravo:1.0", "charlie", "delta", "echo", "foxtrot", "share-one", "share-two"]
    manifest = _manifest(site, entries + ["nosuchrecipe:1.0"])

    dry = site.cli("batch", "install", str(manifest), "--dry-run", "--json")
    assert site.files() == set()  # a dry run changes nothing
    plan = {row["module"]: row for row in json.loads(dry.stdout)}
    assert plan["alpha/2.0"]["status"] == "would-install" and plan["alpha/2.0"]["bytes"] > 0
    assert plan["nosuchrecipe:1.0"]["status"] == "failed"

    proc = site.cli("batch", "install", str(manifest), "--jobs", "4", "--json")
    assert proc.returncode == 1  # one entry failed
    rows = {row["module"]: row for row in json.loads(proc.stdout)}
    assert "unknown recipe 'nosuchrecipe'" in rows["nosuchrecipe:1.0"]["detail"]
    installed = [m for m, r in rows.items() if r["status"] == "installed"]
    assert len(installed) == 9  # alpha twice, five others, the two sharing recipes
    assert len(_sifs(site)) == 7  # alpha 1.0 and 2.0 share a digest; share-one/two share one

    good = _manifest(site, entries, "good.yaml")
    before = {p: p.stat().st_mtime_ns for p in (site.root / "modules").rglob("*")}
    again = site.cli("batch", "install", str(good))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())

    # the summary table names the failure, human-readably too
    table = site.cli("batch", "install", str(manifest))
    assert table.returncode == 1 and "nosuchrecipe" in table.stdout and "failed" in table.stdout


def test_sync_removes_unlisted_and_keeps_shared_images(site, stack):
    full = _manifest(site, ["alpha:1.0", "bravo", "share-one", "share-two"])
    assert site.cli("batch", "install", str(full)).returncode == 0
    shared_sif = f"sha256-{stack['shared'].split(':')[1]}.sif"
    assert shared_sif in _sifs(site)

    smaller = _manifest(site, ["alpha:1.0", "share-two"], "smaller.yaml")
    preview = site.cli("batch", "sync", str(smaller), "--dry-run", "--json")
    statuses = {r["module"]: r["status"] for r in json.loads(preview.stdout)}
    assert statuses["bravo/1.0"] == "would-remove" and statuses["share-one/1.0"] == "would-remove"
    refused = site.cli("batch", "sync", str(smaller))  # no terminal, no --yes: asks, so refuses
    assert refused.returncode != 0 and "--yes" in refused.stderr
    assert (site.root / "modules" / "bravo").exists()

    proc = site.cli("batch", "sync", str(smaller), "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not (site.root / "modules" / "bravo").exists()
    assert not (site.root / "modules" / "share-one").exists()
    assert f"sha256-{stack['bravo'].split(':')[1]}.sif" not in _sifs(site)  # nobody uses it
    assert shared_sif in _sifs(site)  # share-two still does

    only_alpha = _manifest(site, ["alpha:1.0"], "alpha.yaml")
    assert site.cli("batch", "sync", str(only_alpha), "--yes").returncode == 0
    assert shared_sif not in _sifs(site)


def test_batch_pulls_each_image_once_through_a_mirror(site, stack, registry):
    manifest = _manifest(site, ["alpha", "share-one", "share-two"])
    with Proxy(registry.url) as proxy:
        proc = site.cli("--set", f"mirrors={registry.host}={proxy.url}", "batch", "install", str(manifest),
                        "--jobs", "4")
        assert proc.returncode == 0, proc.stderr
    layer_gets = {k: n for k, n in proxy.requests.items() if k[0] == "GET" and "/blobs/sha256:" in k[1]}
    assert layer_gets and all(n == 1 for n in layer_gets.values()), layer_gets


@requires(have("lmod"), reason="Debian lmod not installed")
def test_spider_cache_after_batch(site, stack):
    manifest = _manifest(site, ["alpha", "bravo"])
    proc = site.cli("--set", "spider_cache=true", "batch", "install", str(manifest))
    assert proc.returncode == 0, proc.stderr
    rc = site.root / "lmodrc.lua"
    assert f"LMOD_RC={rc}" in proc.stdout
    cache = site.root / "cache" / "lmod"
    assert list(cache.glob("spiderT*"))
    # Lmod answers spider from the cache: prove it by hiding a module from the tree only
    (site.root / "modules" / "bravo" / "1.0.lua").rename(site.tmp / "hidden.lua")
    script = f"export LMOD_RC={rc}\nmodule use {site.root}/modules\nmodule spider bravo 2>&1"
    out = run_bash("lmod", script, site.env).stdout.decode()
    assert "bravo: bravo/1.0" in out or "bravo/1.0" in out, out
    without = run_bash("lmod", f"module use {site.root}/modules\nmodule spider bravo 2>&1", site.env)
    assert "bravo/1.0" not in without.stdout.decode()
