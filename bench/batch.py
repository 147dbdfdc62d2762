#!/usr/bin/env python3
"""Install 300 recipes' modules, then time ``module avail``/``spider`` with and without the spider cache.

    python3 bench/batch.py [--count 300] [--repeat 5]

The recipes are copies of the built-in ones under new names in a site registry directory (so
aliases, env and GPU features are real). Each is installed with ``install_sif`` from its own SIF
path, every one a hard link to one small SIF (the content-addressed store keeps a single file).
Then, with real Lmod (Debian ``lmod``), each command runs in a fresh ``bash`` with an empty
``$HOME`` (so Lmod's per-user cache never helps):

  no cache     ``module use <root>/modules`` and the command: Lmod walks and evaluates the tree
  spider cache the same with ``LMOD_RC=<root>/lmodrc.lua`` (written by ``shpc-lite`` when config
               ``spider_cache`` is on): Lmod reads the cache shpc-lite built

Environment Modules (Tcl tree, no cache) is timed too where it is unpacked (see tests/modsys.py).
Reference from shpc's own reports, not measured here: 303 shpc modules, ``module avail`` 1.4 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shpc_lite.config import load_config  # noqa: E402
from shpc_lite.index import refresh  # noqa: E402
from shpc_lite.install import install_sif  # noqa: E402
from shpc_lite.resources import builtin_registry  # noqa: E402
from shpc_lite.sif import write_sif  # noqa: E402
from tests.modsys import have, run_bash  # noqa: E402


def write_recipes(directory: Path, count: int) -> list[tuple[str, str]]:
    """``count`` recipe files; returns (name, version) of the module each gets."""
    directory.mkdir(parents=True)
    base = [yaml.safe_load(path.read_text()) for path in sorted(builtin_registry().glob("*.yaml"))]
    modules = []
    for i in range(count):
        data = dict(base[i % len(base)], name=f"{base[i % len(base)]['name']}-{i:03d}")
        (directory / f"{data['name']}.yaml").write_text(yaml.safe_dump(data))
        modules.append((data["name"], next(iter(data["versions"]))))
    return modules


def install_all(root: Path, system: str, recipes: Path, modules, sif: Path) -> float:
    config = load_config({"root": str(root), "module_system": system, "registry": [str(recipes)],
                          "spider_cache": system == "lmod"}, environ={})
    links = root.parent / f"sifs-{system}"
    links.mkdir()
    start = time.perf_counter()
    for name, version in modules:
        link = links / f"{name}.sif"
        os.link(sif, link)
        install_sif(config, name, version, link)
    elapsed = time.perf_counter() - start
    if system == "lmod":
        start = time.perf_counter()
        refresh(config)
        print(f"spider cache built (update_lmod_system_cache_files) in {time.perf_counter() - start:.2f} s")
    return elapsed


def time_command(system: str, root: Path, command: str, env: dict, repeat: int, work: Path) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeat):
        home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
        script = f"module use {root}/modules\n{command} 2>&1"
        start = time.perf_counter()
        proc = run_bash(system, script, {**env, "HOME": str(home)}, timeout=300)
        times.append(time.perf_counter() - start)
        out = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"{command} failed under {system}: {out[-500:]}")
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5, help="each timing is the median of this many runs")
    opts = ap.parse_args()
    if not have("lmod"):
        print("Lmod is not installed (apt-get install lmod)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="shpc-lite-bench-batch-") as tmp:
        work = Path(tmp)
        modules = write_recipes(work / "recipes", opts.count)
        sif = work / "small.sif"
        write_sif(sif, [])
        systems = ["lmod"] + (["tcl"] if have("tcl") else [])
        rows = []
        for system in systems:
            root = work / system / "root"
            root.mkdir(parents=True)
            seconds = install_all(root, system, work / "recipes", modules, sif)
            stored = len(list((root / "containers").glob("*.sif")))
            rows.append((f"install {len(modules)} modules ({system})", seconds,
                         f"{1000 * seconds / len(modules):.1f} ms/module, {stored} SIF stored"))

        probe = modules[len(modules) // 2][0]
        lmod_root = work / "lmod" / "root"
        cached = {"LMOD_RC": str(lmod_root / "lmodrc.lua")}
        for command in ("module -t avail", f"module spider {probe}", f"module load {probe}"):
            plain, out_plain = time_command("lmod", lmod_root, command, {}, opts.repeat, work)
            fast, out_fast = time_command("lmod", lmod_root, command, cached, opts.repeat, work)
            note = ""
            if command.endswith("avail"):
                shown = sum(1 for line in out_plain.splitlines() if "/" in line and not line.endswith((":", "/")))
                same = out_plain == out_fast
                note = f"{shown} modules listed; outputs {'identical' if same else 'DIFFER'}"
            rows.append((f"lmod `{command}` no cache", plain, note))
            rows.append((f"lmod `{command}` spider cache", fast, f"{plain / fast:.1f}x faster"))
        if "tcl" in systems:
            seconds, _ = time_command("tcl", work / "tcl" / "root", "module -t avail", {}, opts.repeat, work)
            rows.append(("environment-modules `module -t avail`", seconds, "no cache"))

    print(f"\n{'what':<48}{'seconds':>9}  notes")
    for what, seconds, note in rows:
        print(f"{what:<48}{seconds:>9.3f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
