#!/usr/bin/env python3
"""Time ``discover`` and the install-time package scan against ``unsquashfs -l`` on one SIF.

Run by hand: python bench/discover.py [--mb 200] [--files 20000] [--runs 5]. Builds a SIF of
about MB megabytes (random, so incompressible) spread over FILES files laid out as in a Python
image: 2% commands in /usr/bin (some symlinks; /bin -> usr/bin), 10% in dist-info directories,
the rest package modules. Then, median of RUNS:

- ``unsquashfs -l -o OFFSET SIF`` (the floor: listing the directory table);
- the package scan (``shpc_lite.packages.scan_sif``) and discover (``image_commands``), each in
  a fresh interpreter (timed after the imports, as within an install), with its peak RSS (the
  interpreter's, and unsquashfs's);
- with strace on PATH, the bytes unsquashfs reads for the listing, against the SIF's size:
  neither reads file contents.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shpc_lite.sif import build_container_sif, partition_offset, read_sif  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from shpc_lite.discover import image_commands
import shpc_lite.inspect  # imports requests (via shpc_lite.oci): a fixed cost, not the listing
from shpc_lite.packages import scan_sif
t = time.perf_counter()
n = len(scan_sif({sif!r}) if {what!r} == "packages" else image_commands({sif!r}))
print(json.dumps({{"seconds": time.perf_counter() - t, "found": n,
                  "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def build(tmp: Path, mb: int, files: int) -> Path:
    root = tmp / "rootfs"
    bindir = root / "usr/bin"
    site = root / "usr/lib/python3.11/site-packages"
    bindir.mkdir(parents=True)
    site.mkdir(parents=True)
    size = mb * (1 << 20) // files
    # as in a Python image: 2% commands (a tenth of them symlinks), 10% dist-info files, the
    # rest modules of the packages
    for i in range(files):
        package = f"pkg{i // 100}"
        if i % 50 == 0:
            path = bindir / f"tool{i}"
        elif i % 10 == 1:
            dist = site / f"{package}-1.0.dist-info"
            dist.mkdir(exist_ok=True)
            path = dist / f"RECORD{i}"
        else:
            (site / package).mkdir(exist_ok=True)
            path = site / package / f"module{i}.py"
        path.write_bytes(os.urandom(size))
        if i % 50 == 0:
            path.chmod(0o755)
            if i % 500 == 0:
                (bindir / f"link{i}").symlink_to(path.name)
    (root / "bin").symlink_to("usr/bin")
    squash = tmp / "fs.squashfs"
    subprocess.run(["mksquashfs", str(root), str(squash), "-noappend", "-quiet", "-all-root", "-comp", "zstd"],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    sif = tmp / "bench.sif"
    config = json.dumps({"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}).encode()
    build_container_sif(sif, squash, deffile=b"bootstrap: localimage\n", json_objects={"oci-config.json": config},
                        arch="amd64")
    squash.unlink()
    return sif


def median_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def child(what: str, sif: Path, runs: int) -> dict:
    code = CHILD.format(repo=str(REPO), what=what, sif=str(sif))
    results = [json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                         text=True).stdout) for _ in range(runs)]
    best = {k: statistics.median(r[k] for r in results) for k in results[0]}
    return best


def peak_rss_kb(argv: list[str]) -> int | None:
    """Peak RSS of a command by GNU time (a child's own ru_maxrss counts the forking
    interpreter's pages before exec, so it is not measured from Python)."""
    if not Path("/usr/bin/time").exists():
        return None
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=True)
    return int(proc.stderr.strip().splitlines()[-1])


def bytes_read(argv: list[str], tmp: Path) -> int | None:
    """Sum of what read()/pread64() returned in unsquashfs (None without strace)."""
    if not shutil.which("strace"):
        return None
    log = tmp / "strace.log"
    subprocess.run(["strace", "-f", "-e", "trace=read,pread64", "-o", str(log), *argv], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sum(int(m.group(1)) for m in re.finditer(r"= (\d+)$", log.read_text(), re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shpc-lite-bench-") as tmpdir:
        tmp = Path(tmpdir)
        t = time.perf_counter()
        sif = build(tmp, args.mb, args.files)
        print(f"SIF {sif.stat().st_size / (1 << 20):.0f} MiB, {args.files} files, built in "
              f"{time.perf_counter() - t:.1f} s")
        listing = ["unsquashfs", "-l", "-o", str(partition_offset(read_sif(str(sif)))), str(sif)]
        floor = median_seconds(listing, args.runs)
        read = bytes_read(listing, tmp)
        print(f"{'what':<38} {'median s':>9} {'x floor':>8} {'found':>6} {'peak RSS MiB':>13}")
        rss = peak_rss_kb(listing)
        print(f"{'unsquashfs -l (floor)':<38} {floor:>9.3f} {1.0:>8.2f} {'':>6} "
              f"{rss / 1024 if rss else float('nan'):>13.1f}")
        for what in ("packages", "discover"):
            r = child(what, sif, args.runs)
            print(f"{what + ' (interpreter, after imports)':<38} {r['seconds']:>9.3f} {r['seconds'] / floor:>8.2f} "
                  f"{r['found']:>6.0f} {r['rss_kb'] / 1024:>13.1f}")
        if read is not None:
            print(f"unsquashfs -l read {read / (1 << 20):.2f} MiB of the {sif.stat().st_size / (1 << 20):.0f} MiB SIF")


if __name__ == "__main__":
    main()
