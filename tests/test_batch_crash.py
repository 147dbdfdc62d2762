"""Issue 13: batch installs write many modules with one flush barrier per chunk; a ``kill -9`` of
the real ``shpc-lite batch install`` at any moment must leave no half-written module, and a
rerun of the same batch must finish the tree with nothing left over.

Each run is killed at a different point: after the first k modules became visible (k varying
per seed, polled while the process runs), or after a random delay. Then, with real Lmod:
every module Lmod lists loads and puts complete wrappers on PATH (byte for byte what an
uninterrupted run writes), and no temp file is visible to it. The SIF is a real small one;
the runtime behind the wrappers is never started here. The batches install from a SIF file
named in the manifest (``sif:``), whose dry run and errors are checked last.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.modsys import have, run_bash
from tests.needs import need_system, requires

pytestmark = requires(have("lmod"), reason="Lmod is not installed")
SUFFIX = {"lmod": ".lua", "tcl": ""}  # a modulefile's name: <version><suffix>

COUNT = 24  # modules: 12 names, two versions each (so defaults are written per name)
NAMES = [f"crash{i:02d}" for i in range(COUNT // 2)]
TMP_PREFIX = ".shpc-lite-tmp-"


def _write_recipes(site) -> None:
    for name in NAMES:
        site.write_recipe(name, f"name: {name}\nimage: docker.io/library/busybox\n"
                                f"description: crash test {name}\nversions:\n  '1.0': '1.36'\n  '2.0': '1.37'\n"
                                f"aliases:\n  {name}-sh: /bin/sh\n  {name}-ls: [/bin/ls, -l]\n")


def _manifest(site, sif: Path) -> Path:
    path = site.tmp / "site.yaml"
    path.write_text("modules:\n" + "".join(f"  - name: {n}\n    sif: {sif}\n" for n in NAMES))
    return path


def _batch(site, root: Path, manifest: Path, workers: int = 1, system: str = "lmod") -> list[str]:
    """The batch; ``workers`` 2: split over two worker processes (12 names, 6 each)."""
    return [sys.executable, "-m", "shpc_lite", "--root", str(root), "--set", "batch_chunk=5", "--set", "lock_lease=1",
            "--set", f"batch_workers={workers}", "--set", f"module_system={system}",
            "batch", "install", str(manifest), "--jobs", "2"]


def _modulefiles(root: Path) -> list[Path]:
    """Modulefiles a module system would see (no hidden names)."""
    found = []
    for directory in sorted((root / "modules").glob("*")):
        found += [p for p in sorted(directory.iterdir()) if not p.name.startswith(".")]
    return found


def _tree(root: Path) -> dict[str, bytes]:
    """The generated files below modules/ and wrappers/, with the root's path made neutral."""
    out = {}
    for top in ("modules", "wrappers"):
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = path.read_bytes().replace(str(root).encode(), b"<root>")
    return out


def _temps(root: Path) -> list[str]:
    return [str(p) for top in ("modules", "wrappers") for p in (root / top).rglob(TMP_PREFIX + "*")]


def _kill_at(site, root: Path, manifest: Path, rng: random.Random, visible: int | None, deadline: float,
             marker: bytes = b"", workers: int = 1, system: str = "lmod") -> None:
    """Start the batch and SIGKILL it once ``visible`` modulefiles exist (holding ``marker``,
    when given), or after a random delay. With workers, only the CLI's process is killed: its
    workers must stop with it (they would otherwise go on writing)."""
    proc = subprocess.Popen(_batch(site, root, manifest, workers, system), env=site.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if visible is None:
            time.sleep(rng.uniform(0.0, deadline))
        else:
            end = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < end:
                if (root / "modules").is_dir() and _count(root, marker) >= visible:
                    break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    end = time.monotonic() + 10
    while _writers(root) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _writers(root), f"worker processes outlived the killed batch: {_writers(root)}"


def _writers(root: Path) -> list[int]:
    """Live processes (not zombies) whose command line names ``root``: the batch and its workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(root).encode() + b"\0" in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _count(root: Path, marker: bytes) -> int:
    found = 0
    for path in _modulefiles(root):
        try:
            found += not marker or marker in path.read_bytes()
        except FileNotFoundError:
            continue
    return found


def _check_visible_modules_complete(site, root: Path, reference: dict[str, bytes], system: str = "lmod") -> int:
    tree = _tree(root)
    visible = _modulefiles(root)
    for modulefile in visible:
        name, version = modulefile.parent.name, modulefile.name[: len(modulefile.name) - len(SUFFIX[system])]
        key = str(modulefile.relative_to(root))
        assert tree[key] == reference[key], f"{key} differs from an uninterrupted run's"
        wrappers = f"wrappers/{name}/{version}/bin/"
        expected = {k for k in reference if k.startswith(wrappers)}
        assert {k for k in tree if k.startswith(wrappers)} == expected, f"{name}/{version}: wrappers missing"
        for k in expected:
            assert tree[k] == reference[k], f"{k} is not complete"
        assert (root / "containers" / ".refs").is_dir()
        refs = [p.name for p in (root / "containers" / ".refs").glob("*/*")]
        assert f"{name}@{version}" in refs, f"{name}/{version} is visible without its image ref"
    for record in (root / "wrappers").glob("*/*/install.json"):  # a record means a whole module
        name, version = record.parent.parent.name, record.parent.name
        assert (root / "modules" / name / f"{version}{SUFFIX[system]}").is_file(), f"{record} without its modulefile"
    if not visible:
        return 0
    # Real Lmod / Environment Modules: what it lists is exactly what is complete, and every
    # listed module loads.
    modules = [f"{p.parent.name}/{p.name[: len(p.name) - len(SUFFIX[system])]}" for p in visible]
    aliases = " ".join(f"{m.split('/')[0]}-sh {m.split('/')[0]}-ls" for m in modules)
    script = (f"module use {root}/modules\nmodule -t avail 2>&1 | grep -v ':$' | sort\necho ---\n"
              + "".join(f"module load {m} || exit 3\nfor c in {m.split('/')[0]}-sh {m.split('/')[0]}-ls; do "
                        f"p=$(command -v $c) || exit 4; [ -x \"$p\" ] || exit 5; done\nmodule purge\n"
                        for m in modules))
    proc = run_bash(system, script, {**site.env, "HOME": str(site.tmp / "home")}, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode() + aliases
    listed = [line.replace("(default)", "") for line in out.split("---")[0].split()
              if "/" in line and not line.endswith("/")]
    assert sorted(listed) == sorted(modules), out
    return len(visible)


# Lmod trees at ten points; Tcl (Environment Modules) trees, written by the same steps, at four.
KILL_POINTS = {"lmod": [1, 6, 11, 17, 23, None, None, 4, 15, None], "tcl": [3, 12, 20, None]}


@pytest.mark.parametrize("system", ["lmod", "tcl"])
def test_kill_9_mid_batch_leaves_no_half_written_module_and_a_rerun_completes(site, small_sif, system):
    need_system(system)
    _write_recipes(site)
    manifest = _manifest(site, small_sif)
    reference_root = site.tmp / "reference"
    start = time.monotonic()
    subprocess.run(_batch(site, reference_root, manifest, system=system), env=site.env, check=True,
                   capture_output=True)
    whole = time.monotonic() - start
    reference = _tree(reference_root)
    assert len(_modulefiles(reference_root)) == COUNT and not _temps(reference_root)

    rng = random.Random(13)
    partial = []
    # kill once k modules are visible (k spread over the batch), and at random moments; every
    # other run split over two worker processes (the tree must be the same either way)
    for seed, visible in enumerate(KILL_POINTS[system]):
        root = site.tmp / f"root-{seed}"
        _kill_at(site, root, manifest, rng, visible, whole, workers=1 + seed % 2, system=system)
        partial.append(_check_visible_modules_complete(site, root, reference, system))

        rerun = subprocess.run(_batch(site, root, manifest, workers=2 - seed % 2, system=system), env=site.env,
                               capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert _tree(root) == reference, f"seed {seed}: the rerun's tree differs from an uninterrupted run's"
        assert not _temps(root), f"seed {seed}: temp files left: {_temps(root)}"
        assert len(list((root / "containers").glob("*.sif"))) == 1
        refs = sorted(p.name for p in (root / "containers" / ".refs").glob("*/*"))
        assert refs == sorted(f"{n}@{v}" for n in NAMES for v in ("1.0", "2.0"))
        flags = ("--root", str(root), "--set", f"module_system={system}")
        listed = site.cli(*flags, "list", check=True).stdout
        assert all(f"{n}" in listed for n in NAMES)
        again = site.cli(*flags, "batch", "install", str(manifest), check=True).stdout
        assert "nothing to do" in again
    # the kills landed mid-batch, not only before or after it
    assert any(0 < n < COUNT for n in partial), partial


def test_kill_9_mid_reinstall_onto_a_new_image_keeps_every_module_whole(site, small_sif, tmp_path):
    """A batch that moves every module onto another image (the old wrapper directories are
    swapped with the new ones), killed at random moments: each visible module's wrappers are all
    complete (each one the old run's or the new run's, byte for byte), its image is there, and a
    rerun leaves exactly the new tree."""
    from tests.conftest import make_small_sif

    _write_recipes(site)
    other = make_small_sif(tmp_path / "other", "another image\n")
    old_manifest = _manifest(site, small_sif)
    new_manifest = site.tmp / "new.yaml"
    new_manifest.write_text("modules:\n" + "".join(f"  - name: {n}\n    sif: {other}\n" for n in NAMES))
    references = []
    for manifest, where in ((old_manifest, "ref-old"), (new_manifest, "ref-new")):
        start = time.monotonic()
        subprocess.run(_batch(site, site.tmp / where, manifest), env=site.env, check=True, capture_output=True)
        references.append((_tree(site.tmp / where), time.monotonic() - start))
    (old_tree, _), (new_tree, whole) = references

    rng = random.Random(1313)
    new_image = next(v for k, v in new_tree.items() if k.endswith(".lua") and "/." not in k)
    new_image = new_image.split(b"<root>/containers/")[1].split(b".sif")[0]
    mixed = []
    # killed once 3, 12 or 20 modules were moved onto the new image, and once at a random moment
    for seed, moved in enumerate([3, 12, 20, None]):
        root = site.tmp / f"root-{seed}"
        subprocess.run(_batch(site, root, old_manifest), env=site.env, check=True, capture_output=True)
        _kill_at(site, root, new_manifest, rng, moved, whole, marker=new_image, workers=1 + seed % 2)
        mixed.append(_count(root, new_image))
        tree = _tree(root)
        for modulefile in _modulefiles(root):
            name, version = modulefile.parent.name, modulefile.name[: -len(".lua")]
            prefix = f"wrappers/{name}/{version}/bin/"
            wrappers = {k: v for k, v in tree.items() if k.startswith(prefix)}
            assert set(wrappers) == {k for k in new_tree if k.startswith(prefix)}, f"{name}/{version}: wrappers missing"
            for key, text in wrappers.items():
                assert text in (old_tree[key], new_tree[key]), f"{key} is not complete"
                sif = text.split(b"'<root>/containers/")[1].split(b"'")[0].decode()
                assert (root / "containers" / sif).is_file(), f"{key} runs an image that is gone"
        rerun = subprocess.run(_batch(site, root, new_manifest), env=site.env, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert _tree(root) == new_tree, f"seed {seed}: the rerun's tree differs from an uninterrupted run's"
        assert not _temps(root), f"seed {seed}: temp files left: {_temps(root)}"
    assert any(0 < n < COUNT for n in mixed), mixed  # killed mid-batch: some moved, some not



def test_manifest_sif_entries_dry_run_and_errors(site, small_sif):
    """``sif:`` in a manifest: the dry run says what would be installed from which file and
    writes nothing; a value that is not a .sif path is one line naming the manifest entry."""
    _write_recipes(site)
    manifest = _manifest(site, small_sif)
    dry = site.cli("batch", "install", str(manifest), "--dry-run", check=True).stdout
    assert f"{COUNT} would-install" in dry and dry.count(f"from {small_sif}") == COUNT
    assert not site.root.exists() or not list((site.root / "modules").glob("*"))
    bad = site.tmp / "bad.yaml"
    bad.write_text(f"modules:\n  - name: {NAMES[0]}\n    sif: {site.tmp}/image.tar\n")
    proc = site.cli("batch", "install", str(bad))
    assert proc.returncode != 0
    assert proc.stderr.strip() == f"shpc-lite: error: {bad}: modules[0]: sif must be the path of a .sif file"
    missing = site.tmp / "missing.yaml"
    missing.write_text(f"modules:\n  - name: {NAMES[0]}\n    versions: ['1.0']\n    sif: nowhere.sif\n")
    proc = site.cli("batch", "install", str(missing))
    assert proc.returncode == 1 and "nowhere.sif: no such file" in proc.stdout
    assert not list((site.root / "modules").glob(f"{NAMES[0]}/*.lua"))
