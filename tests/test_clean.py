"""``shpc-lite clean``: the layer blob cache goes, installed modules keep working, running pulls
are never disturbed. Images come from the real local distribution registry."""

from __future__ import annotations

import shutil


from shpc_lite.layout import Layout
from shpc_lite.store import digest_lock
from tests import imagetools as it
from tests.imagetools import image_recipe
from tests.modsys import have
from tests.proxy import Proxy
from tests.needs import requires

pytestmark = requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")


@requires(have("lmod"), reason="Debian lmod not installed (its spider cache must survive clean)")
def test_clean_frees_the_blob_cache_and_modules_keep_working(site, registry, unique_repo):
    layer = it.make_layer([it.File("usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755)])
    registry.pusher().push_image(unique_repo, it.make_image([layer]), tags=["1.0"])
    newer = it.make_image([layer], env=["PATH=/usr/bin:/bin", "NEWER=1"])  # shares the layer
    registry.pusher().push_image(unique_repo, newer, tags=["1.1"])
    image_recipe(site, "cleanme", f"{registry.host}/{unique_repo}", {"1.0": "1.0", "1.1": "1.1"})
    site.cli("--set", "spider_cache=true", "install", "cleanme:1.0", check=True)
    blobs = site.root / "cache" / "blobs" / "sha256"
    assert [p.name for p in blobs.iterdir() if p.is_dir()] == [layer.digest.split(":")[1]]
    spider = sorted((site.root / "cache" / "lmod").iterdir())

    dry = site.cli("clean", "--dry-run", check=True)
    assert f"would free {layer.size / 1e6:.1f} MB in 1 cache entries" in dry.stdout
    assert (blobs / layer.digest.split(":")[1] / "data").is_file()

    done = site.cli("clean", check=True)
    assert "freed" in done.stdout and not any(blobs.iterdir())
    assert sorted((site.root / "cache" / "lmod").iterdir()) == spider  # Lmod's cache is not ours to drop
    listed = site.cli("list", check=True).stdout
    assert "cleanme" in listed and len(list((site.root / "containers").glob("*.sif"))) == 1
    # the cost: the next image with that layer downloads it again (once)
    with Proxy(registry.url) as proxy:
        site.cli("install", "cleanme:1.1", extra_env={"SHPC_LITE_MIRRORS": f"{registry.host}={proxy.url}"},
                 check=True)
    assert proxy.blob_gets(layer.digest) == 1
    assert site.cli("clean", check=True).stdout.startswith("freed ")
    assert not any(blobs.iterdir())
    assert site.cli("clean", check=True).stdout.startswith("freed 0.0 MB in 0 cache entries")


def test_clean_leaves_everything_while_a_pull_runs(site, registry, unique_repo):
    layer = it.make_layer([it.File("a.txt", "a\n")])
    registry.pusher().push_image(unique_repo, it.make_image([layer]), tags=["1.0"])
    image_recipe(site, "busy", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    site.cli("install", "busy:1.0", check=True)
    before = sorted(p.name for p in (site.root / "cache" / "blobs" / "sha256").iterdir())
    with digest_lock(Layout(site.root), "sha256:" + "ab" * 32, 120):  # another process's pull, as it looks
        proc = site.cli("clean")
    assert proc.returncode == 1
    assert f"a pull is running (sha256:{'ab' * 32}): nothing removed" in proc.stdout
    assert sorted(p.name for p in (site.root / "cache" / "blobs" / "sha256").iterdir()) == before
