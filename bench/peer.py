#!/usr/bin/env python3
"""shpc-lite against shpc (singularity-hpc from PyPI): the same 300 recipes, one small SIF, one run.

    python3 bench/peer.py [--count 300] [--install-runs 3] [--repeat 5] [--cli-samples 10] [--venv DIR]

What is compared, all in this run and on the same machine:

* the recipes: the first ``--count`` docker recipes (by path) of ../shared/data/shpc-recipes
  whose ``latest`` tag shpc-lite can take, one per image. shpc reads them as its registry (a
  directory of ``container.yaml``); shpc-lite reads them through ``shpc-lite import-shpc``
  (timed on its own row: a one-time migration, not part of an install);
* the install of all of them as Lmod modules with their wrapper scripts (shpc:
  ``wrapper_scripts.enabled``, the default; shpc-lite: always), each version being shpc's
  ``latest`` tag, each from the same small SIF (a real one, made by mksquashfs), each tool in
  a fresh process:
    - shpc through its own API in one Python process (``get_client().install(uri,
      container_image=SIF)``, what ``shpc install URI SIF`` does, without 300 start-ups),
    - shpc-lite through ``shpc-lite batch install`` of a manifest naming the SIF (``sif:``), as
      installed (its worker processes, one per usable core) and in one process (``batch_workers=1``);
  and per-command CLI installs (``shpc install URI SIF`` / ``shpc-lite install NAME:VER --sif
  SIF``), the median of ``--cli-samples`` into the full tree;
* ``list``, ``show``, Lmod ``module -t avail`` and ``module load`` on the two trees (same size),
  each the median of ``--repeat`` fresh processes (Lmod in a fresh bash with an empty HOME).

shpc calls ``singularity --version`` and ``singularity inspect`` while installing (no pull: the
SIF is given). Neither Apptainer nor Singularity is packaged here, so a stand-in ``singularity``
(a few lines of sh, printing a version and nothing for inspect) is put on PATH for shpc; how
much of shpc's time it takes is measured and shown. shpc is installed into its own venv
(``python3 -m venv``, ``pip install singularity-hpc``) under ``--venv``, reused when present.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from batch import time_command  # noqa: E402  (bench/batch.py: a module command in a fresh bash)
from scale import small_sif  # noqa: E402  (bench/scale.py: a real SIF of a few KB)
from shpc_lite.recipe import SAFE_VERSION  # noqa: E402
from shpc_lite.workers import usable_cores  # noqa: E402
from tests.modsys import have  # noqa: E402

RECIPES = REPO.parent / "shared" / "data" / "shpc-recipes"
STANDIN = """#!/bin/sh
# Stand-in for singularity (not packaged on Debian 12), for shpc's install: a version, an empty inspect.
case "$1" in
  --version|version) echo "singularity version 3.8.0" ;;
esac
exit 0
"""
SHPC_INSTALL = """
import sys
from shpc.main import get_client
cli = get_client(quiet=True, settings_file=sys.argv[1])
for uri in sys.argv[3:]:
    cli.install(uri, container_image=sys.argv[2])
"""


@dataclass(frozen=True)
class Pick:
    """One recipe both tools install: shpc's name for it and shpc-lite's, and the version."""

    uri: str  # the recipe's path in shpc's registry
    module: str  # shpc's module name (its docker image)
    name: str  # shpc-lite's module name (from import-shpc)
    version: str  # shpc's ``latest`` tag


@dataclass(frozen=True)
class Row:
    what: str
    shpc: float
    lite: float
    note: str = ""


def candidates(count: int, registry: Path) -> list[tuple[str, str, str]]:
    """(uri, docker image, latest tag) of the first recipes that shpc-lite can import (none with
    custom wrapper scripts: neither tool converts the same thing there), copied into ``registry``."""
    found, images = [], set()
    for path in sorted(RECIPES.rglob("container.yaml")):
        doc = yaml.safe_load(path.read_text())
        uri = "/".join(path.parent.relative_to(RECIPES).parts[1:])  # below its source folder
        latest = doc.get("latest") if isinstance(doc, dict) else None
        if not doc.get("docker") or not isinstance(latest, dict) or len(latest) != 1:
            continue
        if any(key.endswith("_scripts") for key in doc):  # custom wrapper scripts: files beside it
            continue
        tag = str(next(iter(latest)))
        if doc["docker"] in images or (registry / uri).exists() or not SAFE_VERSION.match(tag):
            continue
        if str(tag) not in {str(t) for t in (doc.get("tags") or {})}:
            continue
        images.add(doc["docker"])
        (registry / uri).mkdir(parents=True)
        shutil.copy(path, registry / uri / "container.yaml")
        found.append((uri, str(doc["docker"]), tag))
    return found[: count * 2]  # some are refused by import-shpc: keep spares


def shpc_venv(where: Path) -> Path:
    python = where / "bin" / "python"
    if not (where / "bin" / "shpc").exists():
        print(f"installing singularity-hpc into {where} (python3 -m venv, pip install singularity-hpc)")
        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "singularity-hpc"], check=True)
    return python


def shpc_settings(venv_python: Path, work: Path, registry: Path) -> Path:
    """shpc's own settings.yml with the registry, module and container dirs of this run."""
    found = subprocess.run([str(venv_python), "-c", "import shpc, os; print(os.path.dirname(shpc.__file__))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    settings = yaml.safe_load((Path(found) / "settings.yml").read_text())
    settings.update(registry=[str(registry)], module_sys="lmod", container_tech="singularity",
                    module_base=str(work / "shpc" / "modules"), container_base=str(work / "shpc" / "containers"),
                    wrapper_base=str(work / "shpc" / "wrappers"), views_base=str(work / "shpc" / "views"))
    settings["wrapper_scripts"]["enabled"] = True
    path = work / "shpc-settings.yml"
    path.write_text(yaml.safe_dump(settings))
    return path


def move_aside(tree: Path, where: Path) -> None:
    if tree.exists():
        where.parent.mkdir(parents=True, exist_ok=True)
        tree.rename(where)


def timed(argv: list[str], env: dict, **kwargs) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, **kwargs)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed, proc


def cpu_timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one command and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed, _ = timed(argv, env, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_of(repeat: int, argv: list[str], env: dict) -> float:
    return statistics.median(timed(argv, env)[0] for _ in range(repeat))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5, help="list/show/avail/load: median of this many runs")
    ap.add_argument("--cli-samples", type=int, default=10, help="per-command installs timed (median)")
    ap.add_argument("--install-runs", type=int, default=3, help="installs of all modules per tool (median)")
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "shpc-lite-bench-shpc-venv")
    opts = ap.parse_args()
    if not have("lmod"):
        print("Lmod is not installed (apt-get install lmod)", file=sys.stderr)
        return 1
    venv_python = shpc_venv(opts.venv)
    with tempfile.TemporaryDirectory(prefix="shpc-lite-bench-peer-") as tmp:
        work = Path(tmp)
        registry = work / "registry"
        picked = candidates(opts.count, registry)
        sif = small_sif(work)
        bindir = work / "bin"
        bindir.mkdir()
        (bindir / "singularity").write_text(STANDIN)
        (bindir / "singularity").chmod(0o755)
        base_env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(work / "home"),
                    "XDG_CONFIG_HOME": str(work / "xdg"), "XDG_DATA_HOME": str(work / "xdg-data")}
        # Both tools start as installed ones do, from their bytecode: pip wrote shpc's .pyc files
        # into its venv, and shpc-lite's are written here once (a shell with
        # PYTHONDONTWRITEBYTECODE=1 would otherwise make shpc-lite compile itself at every start).
        base_env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "shpc_lite")], check=True,
                       env=base_env, timeout=300)
        lite_root = work / "lite"
        lite_env = {**base_env, "PYTHONPATH": str(REPO), "SHPC_LITE_SYSTEM_CONFIG": "/nonexistent",
                    "SHPC_LITE_ROOT": str(lite_root), "SHPC_LITE_REGISTRY": str(work / "lite-recipes"),
                    "SHPC_LITE_MODULE_SYSTEM": "lmod"}
        lite = [sys.executable, "-m", "shpc_lite"]

        # shpc-lite reads the recipes through import-shpc; its names for them come from its output
        start = time.perf_counter()
        proc = subprocess.run([*lite, "import-shpc", str(registry), "--out", str(work / "lite-recipes")],
                              env=lite_env, capture_output=True, text=True, timeout=600)
        seconds_import = time.perf_counter() - start
        names = {}
        for line in proc.stdout.splitlines():
            hit = re.match(r"imported (\S+) \(.*\) from (.*)/container\.yaml$", line)
            if hit:
                names[str(Path(hit.group(2)).relative_to(registry))] = hit.group(1)
        picks = [Pick(uri, module, names[uri], tag) for uri, module, tag in picked if uri in names][: opts.count]
        if len(picks) < opts.count:
            raise SystemExit(f"only {len(picks)} recipes both tools can install")
        keep = {p.uri for p in picks}
        for uri, _, _ in picked:  # shpc's registry holds exactly the picked recipes
            if uri not in keep:
                shutil.rmtree(registry / uri)
        settings = shpc_settings(venv_python, work, registry)
        manifest = work / "site.yaml"
        manifest.write_text(yaml.safe_dump({"modules": [
            {"name": p.name, "versions": [p.version], "sif": str(sif)} for p in picks]}))

        rows: list[Row] = []
        n = len(picks)
        # -- install all, each tool in a fresh process, into an empty tree; the runs alternate
        # (shpc, shpc-lite, shpc, ...) so a busy moment of the machine does not hit one tool only
        # shpc-lite as installed: its worker processes, one per usable core (config batch_workers
        # 0); and in one process (batch_workers=1), the row that compares one core with one core
        # Each run starts from an empty tree: the previous run's is moved aside, not deleted. Deleting
        # thousands of files just before makes ext4 create the next ones far slower for half a
        # minute (new inodes skip recently deleted ones: ``recently_deleted`` in ext4_new_inode,
        # seen with perf), which would time the bench's own clean-up rather than either tool.
        runs: dict[str, list[tuple[float, float]]] = {"shpc": [], "lite": [], "lite1": []}
        one_process = {**lite_env, "SHPC_LITE_BATCH_WORKERS": "1"}
        aside = itertools.count()
        for _ in range(opts.install_runs):
            for tree in (work / "shpc", lite_root):
                move_aside(tree, work / "old" / str(next(aside)))
            runs["shpc"].append(cpu_timed([str(venv_python), "-c", SHPC_INSTALL, str(settings), str(sif),
                                           *[p.uri for p in picks]], base_env))
            runs["lite"].append(cpu_timed([*lite, "-q", "batch", "install", str(manifest)], lite_env))
            move_aside(lite_root, work / "old" / str(next(aside)))
            runs["lite1"].append(cpu_timed([*lite, "-q", "batch", "install", str(manifest)], one_process))
        shpc_seconds, lite_seconds, lite1_seconds = (statistics.median(w for w, _ in runs[k])
                                                     for k in ("shpc", "lite", "lite1"))
        shpc_cpu, lite_cpu = (statistics.median(c for _, c in runs[k]) for k in ("shpc", "lite"))
        shpc_modules = sorted((work / "shpc" / "modules").rglob("module.lua"))
        lite_modules = sorted(p for p in (lite_root / "modules").glob("*/[!.]*.lua"))
        shpc_wrappers = sum(1 for _ in (work / "shpc" / "wrappers").rglob("bin/*"))
        lite_wrappers = sum(1 for _ in (lite_root / "wrappers").rglob("bin/*"))
        if len(shpc_modules) != n or len(lite_modules) != n:
            raise SystemExit(f"expected {n} modules each, got shpc {len(shpc_modules)}, shpc-lite {len(lite_modules)}")
        # the stand-in's share of shpc's time: shpc calls it 3 times a module (2x --version, 1x inspect)
        start = time.perf_counter()
        for _ in range(30):
            subprocess.run([str(bindir / "singularity"), "inspect", "--json", str(sif)], capture_output=True)
        standin = (time.perf_counter() - start) / 30 * 3 * n
        rows.append(Row(f"install {n} modules, one process", shpc_seconds, lite_seconds,
                        f"median of {opts.install_runs}; wrappers: shpc {shpc_wrappers}, shpc-lite {lite_wrappers}; "
                        f"shpc-lite: batch install, {usable_cores()} worker process(es)"))
        rows.append(Row("  same, CPU time (user+sys)", shpc_cpu, lite_cpu, "less sensitive to other load"))
        rows.append(Row("  same, shpc-lite in one process", shpc_seconds, lite1_seconds,
                        "batch_workers=1: one core each"))
        rows.append(Row("  same, shpc without its stand-in calls", shpc_seconds - standin, lite_seconds,
                        f"stand-in singularity calls: {standin:.2f} s of shpc's"))

        # -- per-command installs into the full tree (a new version of one recipe each time)
        probe = picks[n // 2]
        shpc_cli = [str(venv_python.parent / "shpc"), "--settings-file", str(settings)]
        shpc_times, lite_times = [], []
        for i in range(opts.cli_samples):
            p = picks[i]
            shutil.rmtree(work / "shpc" / "modules" / p.module / p.version)  # installed anew, not over itself
            timed([*lite, "-q", "uninstall", f"{p.name}:{p.version}"], lite_env)
            shpc_times.append(timed([*shpc_cli, "install", p.uri, str(sif)], base_env)[0])
            lite_times.append(timed([*lite, "-q", "install", f"{p.name}:{p.version}", "--sif", str(sif)], lite_env)[0])
        rows.append(Row("CLI install of one module (median)", statistics.median(shpc_times),
                        statistics.median(lite_times), f"{opts.cli_samples} samples, start-up included"))
        rows.append(Row(f"  x {n}: {n} install commands", statistics.median(shpc_times) * n,
                        statistics.median(lite_times) * n, "extrapolated from the median"))

        # -- list, show, Lmod avail and load on the same-size trees
        rows.append(Row("list", median_of(opts.repeat, [*shpc_cli, "list"], base_env),
                        median_of(opts.repeat, [*lite, "list"], lite_env), f"{n} modules installed"))
        rows.append(Row(f"show {probe.name}", median_of(opts.repeat, [*shpc_cli, "show", probe.uri], base_env),
                        median_of(opts.repeat, [*lite, "show", probe.name], lite_env)))
        shpc_avail, _ = time_command("lmod", work / "shpc", "module -t avail", {}, opts.repeat, work)
        lite_avail, _ = time_command("lmod", lite_root, "module -t avail", {}, opts.repeat, work)
        rows.append(Row("Lmod module -t avail", shpc_avail, lite_avail, "no spider cache, empty HOME"))
        shpc_load, _ = time_command("lmod", work / "shpc", f"module load {probe.module}", {}, opts.repeat, work)
        lite_load, _ = time_command("lmod", lite_root, f"module load {probe.name}", {}, opts.repeat, work)
        rows.append(Row("Lmod module load (default version)", shpc_load, lite_load))

    print(f"\nshpc {shpc_version(venv_python)} vs shpc-lite, {n} recipes of {RECIPES.name}, one small SIF, "
          f"Lmod; shpc's `singularity` is a stand-in (see the docstring)")
    print(f"shpc-lite import-shpc of {len(picked)} recipes: {seconds_import:.2f} s (once; not in the install times)\n")
    print(f"{'what':<44}{'shpc s':>9}{'shpc-lite s':>13}{'ratio':>8}  notes")
    for row in rows:
        print(f"{row.what:<44}{row.shpc:>9.3f}{row.lite:>13.3f}{row.lite / row.shpc:>7.3f}x  {row.note}")
    return 0


def shpc_version(venv_python: Path) -> str:
    return subprocess.run([str(venv_python), "-c", "import shpc; print(shpc.__version__)"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
