"""``clean`` drops image refs that interrupted installs left, then the images no module uses.

A ref (``containers/.refs/<stem>/<name>@<version>``) is written before its module; an install
killed in between leaves a ref that would keep its image forever. Here the kill is real
(SIGKILL at the moment the module would be written, in a separate process), and the refs tree is
tampered with (symlinks to outside): nothing outside the root may be touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shpc_lite.config import load_config
from tests.conftest import Site

KILL_BEFORE_THE_MODULE = """
import os, signal, sys
import shpc_lite.install
from shpc_lite.config import load_config
from shpc_lite.install import install_sif
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
shpc_lite.install.write_modules = killed  # after the ref is added, before any module file
install_sif(load_config(), sys.argv[1], "1.0", sys.argv[2])
"""

RECIPE = "name: {name}\nimage: docker.io/library/busybox\ndescription: {name}\nversions:\n  '1.0': '1.36'\n"


def _killed_install(site: Site, name: str, sif: Path) -> None:
    site.write_recipe(name, RECIPE.format(name=name))
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_THE_MODULE, name, str(sif)], env=site.env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr


def _age(*paths: Path, seconds: float = 7200) -> None:
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then), follow_symlinks=False)


def _refs(site: Site) -> set[str]:
    base = site.root / "containers" / ".refs"
    return {str(p.relative_to(base)) for p in base.glob("*/*")}


def test_clean_drops_what_a_killed_install_left(site: Site, small_sif: Path, tmp_path: Path) -> None:
    site.write_recipe("alpha", RECIPE.format(name="alpha"))
    site.cli("install", "alpha:1.0", "--sif", str(small_sif), check=True)
    kept = {p.name for p in (site.root / "containers").glob("*.sif")}
    other = tmp_path / "other.sif"
    other.write_bytes(small_sif.read_bytes() + b"\0")  # another image, stored only for the killed install
    _killed_install(site, "beta", other)
    leftover = {p for p in (site.root / "containers").glob("*.sif") if p.name not in kept}
    assert len(leftover) == 1 and any(r.endswith("/beta@1.0") for r in _refs(site))
    assert "beta" not in site.cli("list", check=True).stdout

    # right away: the ref may be an install still writing its module, so it stays
    site.cli("clean", check=True)
    assert all(p.is_file() for p in leftover) and any(r.endswith("/beta@1.0") for r in _refs(site))

    stale = [p for p in (site.root / "containers" / ".refs").glob("*/beta@1.0")]
    _age(*stale, *leftover, *(site.root / "containers").glob("*.sif"), *(site.root / "containers/.refs").glob("*/*"))
    doctor = site.cli("doctor", "--offline").stdout
    assert "1 stale image refs" in doctor and "shpc-lite clean" in doctor, doctor
    dry = site.cli("clean", "--dry-run", check=True).stdout
    assert "would drop 1 stale image refs" in dry and "1 images no module uses" in dry, dry
    assert all(p.exists() for p in stale + list(leftover))
    done = site.cli("clean", check=True).stdout
    assert "dropped 1 stale image refs" in done and "1 images no module uses" in done, done
    assert not any(p.exists() for p in stale + list(leftover))
    assert {p.name for p in (site.root / "containers").glob("*.sif")} == kept  # alpha's image stays
    assert [r.split("/")[1] for r in _refs(site)] == ["alpha@1.0"]
    assert "no stale image refs" in site.cli("doctor", "--offline").stdout


def test_a_ref_of_a_reinstall_that_moved_is_stale(site: Site, small_sif: Path, tmp_path: Path) -> None:
    """Killed after a reinstall wrote the module onto a new image but before the old ref went."""
    from shpc_lite import refs

    site.write_recipe("alpha", RECIPE.format(name="alpha"))
    site.cli("install", "alpha:1.0", "--sif", str(small_sif), check=True)
    first = next((site.root / "containers").glob("*.sif"))
    layout = load_config(environ=site.env).layout
    other = tmp_path / "other.sif"
    other.write_bytes(small_sif.read_bytes() + b"\0")
    site.cli("install", "alpha:1.0", "--sif", str(other), check=True)
    assert not first.exists()
    first.write_bytes(small_sif.read_bytes())  # the old image and its ref, as the kill left them
    refs.add(layout, first, "alpha", "1.0")
    _age(first, *(site.root / "containers/.refs").glob("*/*"), *(site.root / "containers").glob("*.sif"))
    site.cli("clean", check=True)
    assert not first.exists() and len(list((site.root / "containers").glob("*.sif"))) == 1
    assert [r.split("/")[1] for r in _refs(site)] == ["alpha@1.0"]


def test_clean_never_follows_a_symlinked_refs_dir_or_ref(site: Site, small_sif: Path, tmp_path: Path) -> None:
    site.write_recipe("alpha", RECIPE.format(name="alpha"))
    site.cli("install", "alpha:1.0", "--sif", str(small_sif), check=True)
    refs_root = site.root / "containers" / ".refs"
    stem_dir = next(p for p in refs_root.iterdir() if p.is_dir())
    outside = tmp_path / "outside"
    outside.mkdir()
    ghost = outside / "ghost@1.0"  # named like a stale ref, old enough to be swept
    ghost.write_text("keep me")
    _age(ghost, outside)
    # 1. a ref that is a link to an outside file: the link goes, the file stays
    link = stem_dir / "beta@1.0"
    link.symlink_to(ghost)
    _age(link, *(site.root / "containers").glob("*.sif"))
    site.cli("clean", check=True)
    assert not os.path.lexists(link) and ghost.read_text() == "keep me"
    # 2. an image's refs dir replaced by a link to outside: refused in one line, nothing touched
    for entry in stem_dir.iterdir():
        entry.unlink()
    stem_dir.rmdir()
    stem_dir.symlink_to(outside)
    proc = site.cli("clean")
    assert proc.returncode == 1 and "symlink" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and ghost.read_text() == "keep me"
    assert len(list((site.root / "containers").glob("*.sif"))) == 1  # its users are unknown: kept
