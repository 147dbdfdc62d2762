#!/usr/bin/env python3
"""Peak RSS of the layer merge and of a whole native squashfs build as images grow in files.

Run by hand: python3 bench/merge_memory.py [--files 1000,100000,1000000] [--layers 10]. For each
count, gzip layers of that many small files in total (200 to a directory, as in a Python image's
site-packages) are written to a temp dir, then, each in a fresh interpreter that reports its
VmHWM: merged and written as the merged tar into a null sink (``build_tree`` +
``write_merged_tar``, what a pull feeds mksquashfs), and built into a squashfs by the native
writer (``build_squashfs(method="native")``, what a pull does by default). The table shows how
memory grows with the file count: the index of files is on disk (docs/registries.md, "Memory of
a pull"), so past its fixed caps it should not.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.imagetools import many_files_layer  # noqa: E402

MERGE = """
import sys
sys.path.insert(0, sys.argv[1])
from shpc_lite.pull.layers import LayerBlob, build_tree, write_merged_tar

class Sink:
    def write(self, chunk):
        pass

with build_tree([LayerBlob(p, "application/vnd.oci.image.layer.v1.tar+gzip", "") for p in sys.argv[2:]]) as tree:
    write_merged_tar(tree, Sink())
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""

BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
from shpc_lite.pull import LayerBlob, build_squashfs

build_squashfs([LayerBlob(p, "application/vnd.oci.image.layer.v1.tar+gzip", "") for p in sys.argv[4:]], {"config": {}},
               sys.argv[2], source_ref="bench", source_digest="sha256:0", workdir=sys.argv[3], method="native")
status = open("/proc/self/status").read()
print(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
"""


def peak(script: str, *args: str) -> tuple:
    """(peak RSS in MB, seconds) of ``script`` in a fresh interpreter."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script, str(REPO), *args], capture_output=True, text=True,
                         check=True, timeout=3600).stdout
    return int(out.split()[-1]) / 1024, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="1000,100000,1000000", help="comma-separated file counts")
    ap.add_argument("--layers", type=int, default=10)
    opts = ap.parse_args()
    counts = [int(c) for c in opts.files.split(",")]
    print(f"{'files':>10}{'layers':>8}{'merge peak MB':>15}{'merge s':>9}{'native build peak MB':>22}{'build s':>9}")
    with tempfile.TemporaryDirectory(prefix="shpc-lite-bench-merge-") as tmp:
        for count in counts:
            layers = max(1, min(opts.layers, count))
            paths = []
            for k in range(layers):
                path = Path(tmp) / f"{count}-{k}.tar.gz"
                many_files_layer(path, count // layers, first=k * (count // layers))
                paths.append(str(path))
            merge_mb, merge_s = peak(MERGE, *paths)
            out = Path(tmp) / "out.sqfs"
            build_mb, build_s = peak(BUILD, str(out), str(Path(tmp) / "work"), *paths)
            print(f"{count:>10,}{layers:>8}{merge_mb:>15.0f}{merge_s:>9.1f}{build_mb:>22.0f}{build_s:>9.1f}", flush=True)
            for path in [*paths, out]:
                Path(path).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
