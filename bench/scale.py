#!/usr/bin/env python3
"""How shpc-lite and Lmod grow with the tree: 500, 5,000 and 20,000 modules (issue 13).

Run by hand, never in CI: python bench/scale.py [--sizes 500,5000,20000] [--samples 3].

One tree grows through the sizes. Its modules are made from generated recipes (one file each,
one alias) and all use one small SIF stored once, as a site's tree of one base image would. The
tree is grown by writing modules in process (``write_module`` plus the image ref, what an
install writes); what is timed at each size is what a user or admin waits for:

* install: ``install_sif`` of one more module, in process (median of --samples), and
  uninstall of it: both must stay flat (O(1) in the tree);
* ``shpc-lite list`` (the CLI, start-up included): O(n), with a small constant;
* Lmod ``module -t avail``, ``module spider X`` and ``module load X`` walking the tree, then the
  spider cache made by a full walk (``config spider_cache``, shpc_lite.index) and the same three
  commands reading the cache (``LMOD_RC``), avail and load also with ``LMOD_CACHED_LOADS=yes``
  (without it this Lmod walks the tree for them cache or not). Lmod's per-user cache is kept out
  (``LMOD_SHORT_TIME``);
* the cache refresh after a batch of --batch installs (in process, then one refresh: only those
  names are walked), after uninstalling them again, and after one install, against the full
  walk (``refresh(full=True)``) of the same tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shpc_lite import refs  # noqa: E402
from shpc_lite.config import Config, load_config  # noqa: E402
from shpc_lite.install import install_sif, uninstall  # noqa: E402
from shpc_lite.modules import make_spec, write_module  # noqa: E402
from shpc_lite.recipe import recipe_index  # noqa: E402

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
PROBE = "app00007"  # the module spider and load look for (present at every size)


@dataclass(frozen=True)
class Row:
    size: int
    what: str
    seconds: float


def small_sif(tmp: Path) -> Path:
    """A real SIF of a few KB: mksquashfs of a tiny tree, wrapped by shpc-lite's SIF writer."""
    from shpc_lite.sif import build_container_sif

    rootfs = tmp / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "hello.txt").write_text("hello\n")
    squash = tmp / "fs.squashfs"
    subprocess.run(["mksquashfs", str(rootfs), str(squash), "-noappend", "-quiet", "-all-root"],
                   check=True, capture_output=True)
    sif = tmp / "small.sif"
    build_container_sif(sif, squash, deffile=b"bootstrap: localimage\nfrom: bench\n", json_objects={}, arch="amd64")
    return sif


def module_name(i: int) -> str:
    return f"app{i:05d}"


def batch_name(i: int) -> str:
    return f"batch{i:03d}"


def write_recipes(directory: Path, start: int, stop: int, batch: int = 0) -> None:
    """Recipes app<start>..app<stop-1>, ``extra`` (the module installed and uninstalled) and the
    ``batch`` modules of the batch refresh."""
    for i in [*range(start, stop), -1, *range(-2, -2 - batch, -1)]:
        name = module_name(i) if i >= 0 else "extra" if i == -1 else batch_name(-2 - i)
        (directory / f"{name}.yaml").write_text(
            f"name: {name}\nimage: docker.io/library/busybox\ndescription: bench module {name}\n"
            f"versions:\n  '1.0': '1.36'\naliases:\n  {name}-sh: /bin/sh\n")


def bench_env(tmp: Path, root: Path, recipes: Path) -> dict[str, str]:
    return {"SHPC_LITE_ROOT": str(root), "SHPC_LITE_REGISTRY": str(recipes),
            "SHPC_LITE_SYSTEM_CONFIG": "/nonexistent", "XDG_CONFIG_HOME": str(tmp / "cfg")}


def grow(config: Config, image: Path, start: int, stop: int) -> None:
    """Add modules start..stop-1 as an install writes them (ref first, then the module)."""
    index = recipe_index(config)
    for i in range(start, stop):
        recipe = index.get(module_name(i))
        pin = recipe.versions[0]
        refs.add(config.layout, image, recipe.name, pin.version)
        write_module(make_spec(recipe, pin.version, pin.tag, "", image, config.layout, config), config.layout, config)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def lmod(root: Path, command: str, rc: Path | None, **extra: str) -> float:
    """Seconds one ``module`` command takes in a fresh bash (Lmod's start-up included)."""
    env = {**extra, "PATH": os.environ["PATH"], "HOME": str(root.parent / "home"), "LANG": "C.UTF-8",
           "MODULEPATH": str(root / "modules"), "LMOD_SHORT_TIME": "86400", "LMOD_REDIRECT": "yes"}
    if rc is not None:
        env["LMOD_RC"] = str(rc)
    script = f". {LMOD_INIT}\n{command} >/dev/null 2>&1 || {{ echo failed: {command} >&2; exit 1; }}"
    start = time.perf_counter()
    subprocess.run(["bash", "--noprofile", "--norc", "-c", script], env=env, check=True, timeout=1800)
    return time.perf_counter() - start


def after_batch(size: int, cached: Config, sif: Path, batch: int) -> list[Row]:
    """The refresh after a batch of installs, after removing them, after one install: by name."""
    from shpc_lite.index import refresh

    names = [batch_name(i) for i in range(batch)]
    for name in names:
        install_sif(cached, name, "1.0", sif)
    rows = [Row(size, f"refresh after a batch of {batch} installs (by name)", timed(lambda: refresh(cached)))]
    for name in names:
        uninstall(cached, name, "1.0")
    rows.append(Row(size, f"refresh after uninstalling those {batch} (by name)", timed(lambda: refresh(cached))))
    install_sif(cached, "extra", "1.0", sif)
    rows.append(Row(size, "refresh after one install (by name)", timed(lambda: refresh(cached))))
    uninstall(cached, "extra", "1.0")
    refresh(cached)
    rows.append(Row(size, "refresh, full walk of the same tree", timed(lambda: refresh(cached, full=True))))
    return rows


def measure(size: int, config: Config, env: dict[str, str], sif: Path, samples: int, batch: int) -> list[Row]:
    root = config.layout.root
    rows = []

    installs, removals = [], []
    for _ in range(samples):
        installs.append(timed(lambda: install_sif(config, "extra", "1.0", sif)))
        removals.append(timed(lambda: uninstall(config, "extra", "1.0")))
    rows += [Row(size, "install one more (in process)", statistics.median(installs)),
             Row(size, "uninstall it (in process)", statistics.median(removals))]
    cli_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    rows.append(Row(size, "shpc-lite list (CLI)", timed(lambda: subprocess.run(
        [sys.executable, "-m", "shpc_lite", "list"], env=cli_env, check=True, capture_output=True))))
    rows.append(Row(size, "shpc-lite show X (CLI)", timed(lambda: subprocess.run(
        [sys.executable, "-m", "shpc_lite", "show", PROBE], env=cli_env, check=True, capture_output=True))))
    if not LMOD_INIT.exists():
        return rows
    from shpc_lite.index import refresh

    cached = load_config({"spider_cache": True}, environ=env)
    for label, rc in (("no cache", None), ("spider cache", root / "lmodrc.lua")):
        if rc is not None:
            rows.append(Row(size, "spider cache made (full walk)", timed(lambda: refresh(cached))))
        rows.append(Row(size, f"module -t avail ({label})", lmod(root, "module -t avail", rc)))
        rows.append(Row(size, f"module spider {PROBE} ({label})", lmod(root, f"module spider {PROBE}", rc)))
        rows.append(Row(size, f"module load {PROBE} ({label})", lmod(root, f"module load {PROBE}", rc)))
    # This Lmod reads the cache for avail and load only when the site says so (cached_loads)
    for command in ("module -t avail", f"module load {PROBE}"):
        rows.append(Row(size, f"{command} (spider cache, LMOD_CACHED_LOADS=yes)",
                        lmod(root, command, root / "lmodrc.lua", LMOD_CACHED_LOADS="yes")))
    rows += after_batch(size, cached, sif, batch)
    shutil.rmtree(root / "cache" / "lmod", ignore_errors=True)  # the next size starts without
    (root / "lmodrc.lua").unlink(missing_ok=True)
    return rows


def table(rows: list[Row], sizes: list[int]) -> str:
    """One line per measurement, one column per size (Markdown, for the README)."""
    whats = list(dict.fromkeys(r.what for r in rows))
    found = {(r.what, r.size): r.seconds for r in rows}
    lines = ["| seconds | " + " | ".join(f"{s:,} modules" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for what in whats:
        cells = [f"{found[(what, s)]:.3f}" if (what, s) in found else "-" for s in sizes]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,5000,20000", help="tree sizes, comma-separated, ascending")
    parser.add_argument("--samples", type=int, default=3, help="installs timed per size (median)")
    parser.add_argument("--batch", type=int, default=50, help="installs in the batch before a refresh")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shpc-lite-scale-") as name:
        tmp = Path(name)
        recipes, root = tmp / "recipes", tmp / "root"
        recipes.mkdir()
        env = bench_env(tmp, root, recipes)
        config = load_config(environ=env)
        sif = small_sif(tmp)
        write_recipes(recipes, 0, 1)
        image = Path(install_sif(config, "app00000", "1.0", sif).sif)  # the one stored image
        have = 1
        for size in sizes:
            write_recipes(recipes, have, size, args.batch)
            start = time.perf_counter()
            grow(config, image, have, size)
            print(f"grew the tree to {size:,} modules in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            have = size
            rows += measure(size, config, env, sif, args.samples, args.batch)
            print(table(rows, sizes), file=sys.stderr)
    print(table(rows, sizes))


if __name__ == "__main__":
    main()
