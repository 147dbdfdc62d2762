#!/usr/bin/env python3
"""Time generating modulefiles and wrappers for 300 recipes (Lmod and Tcl), and one CLI install.

Run by hand: python bench/generate.py [--count 300]. The 300 recipes are copies of the built-in
ones under new names (so aliases, env and GPU features are real); the SIF is one small file
imported once and shared, as the content-addressed store would share it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shpc_lite.config import load_config  # noqa: E402
from shpc_lite.modules import make_spec  # noqa: E402
from shpc_lite.publish import PendingModule, write_modules  # noqa: E402
from shpc_lite.recipe import RecipeIndex, recipe_from_dict  # noqa: E402
from shpc_lite.resources import builtin_registry  # noqa: E402


def recipes(count: int):
    base = [r for _, r in RecipeIndex([builtin_registry()]).all()]
    for i in range(count):
        r = base[i % len(base)]
        data = {
            "name": f"{r.name}-{i:03d}",
            "image": r.image,
            "description": r.description,
            "versions": {p.version: p.tag for p in r.versions},
            "aliases": {a.name: list(a.argv) for a in r.aliases},
            "env": dict(r.env),
            "features": {"gpu": r.features.gpu},
        }
        yield recipe_from_dict(data, "bench")


def generate(root: Path, system: str, count: int) -> tuple[float, int]:
    config = load_config({"root": str(root), "module_system": system}, environ={})
    sif = root / "containers" / "shared.sif"
    start = time.perf_counter()
    pending = []
    for recipe in recipes(count):
        pin = recipe.versions[0]
        pending.append(PendingModule(make_spec(recipe, pin.version, pin.tag, "", sif, config.layout, config)))
    results = write_modules(pending, config.layout, config)  # one batch: what `batch install` writes
    assert all(r.error is None for r in results)
    return time.perf_counter() - start, len(results)


def cli_install_times(root: Path, sif: Path, samples: int) -> list[float]:
    env = {**os.environ, "SHPC_LITE_ROOT": str(root), "PYTHONPATH": str(REPO),
           "SHPC_LITE_SYSTEM_CONFIG": "/nonexistent", "XDG_CONFIG_HOME": str(root / "cfg")}
    times = []
    for i in range(samples):
        version = ["3.11", "3.12"][i % 2]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "shpc_lite", "-q", "install", f"python:{version}", "--sif", str(sif)],
                       env=env, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in ("lmod", "tcl"):
            elapsed, n = generate(Path(tmp) / system, system, args.count)
            files = sum(1 for _ in (Path(tmp) / system).rglob("*") if _.is_file())
            rows.append((f"generate {n} modules ({system})", elapsed, f"{1000 * elapsed / n:.2f} ms/module, {files} files"))
        sys.path.insert(0, str(REPO / "bench"))
        from scale import small_sif  # a real SIF (install --sif refuses one without a root file system)

        sif = small_sif(Path(tmp))
        times = cli_install_times(Path(tmp) / "cli", sif, 10)
        rows.append(("CLI `install --sif` (median of 10)", statistics.median(times), "whole process incl. start-up"))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "shpc_lite", "--version"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        rows.append(("CLI start-up (--version)", time.perf_counter() - start, ""))
    print(f"{'what':<40} {'seconds':>9}  notes")
    for what, seconds, notes in rows:
        print(f"{what:<40} {seconds:>9.3f}  {notes}")


if __name__ == "__main__":
    main()
