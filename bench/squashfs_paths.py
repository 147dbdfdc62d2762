#!/usr/bin/env python3
"""Time the squashfs build paths of ``shpc_lite.pull`` on ~200 MB of synthetic layers.

    python3 bench/squashfs_paths.py [--size-mb 200] [--repeat 2] [--compression zstd --level 3]

Layers: four gzip layers (like most registries serve) holding mixed compressible text and random
(incompressible) files, many small and some large, with whiteouts and an opaque directory. Paths:

  native  the merged tree written as squashfs by shpc-lite itself (the default for zstd and gzip)
  dir     apply the merged layers to a rootfs directory, then ``mksquashfs DIR OUT``
  tar     stream one merged, whiteout-applied tar into ``mksquashfs - OUT -tar``

All share pass 1 (reading the tar headers of every layer); it is timed separately too.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shpc_lite.pull import LayerBlob, build_squashfs  # noqa: E402
from shpc_lite.pull.layers import build_tree  # noqa: E402

WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
         "et dolore magna aliqua import def return class self none true false while for in if else elif try "
         "except finally with as yield lambda usr lib share include bin etc config value path module version "
         "python numpy torch cuda float int string list dict error warning info debug").split()


def _text_pool(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


class LayerMaker:
    def __init__(self, out: Path, seed: int = 1):
        self.out = out
        self.rng = random.Random(seed)
        self.pool = _text_pool(self.rng, 4 << 20)

    def text(self, size: int) -> bytes:
        start = self.rng.randrange(0, len(self.pool) - size) if size < len(self.pool) else 0
        head = f"# {self.rng.random()}\n".encode()
        return (head + self.pool[start:start + size])[:size]

    def layer(self, name: str, files: list, whiteouts: list = (), opaque: list = ()) -> LayerBlob:
        path = self.out / f"{name}.tar.gz"
        with gzip.open(path, "wb", compresslevel=6) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for d in opaque:
                    ti = tarfile.TarInfo(d + "/.wh..wh..opq")
                    tf.addfile(ti, io.BytesIO(b""))
                for w in whiteouts:
                    d, _, base = w.rpartition("/")
                    tf.addfile(tarfile.TarInfo((d + "/" if d else "") + ".wh." + base), io.BytesIO(b""))
                for fname, data, mode in files:
                    ti = tarfile.TarInfo(fname)
                    ti.size, ti.mode, ti.mtime = len(data), mode, 1_700_000_000
                    tf.addfile(ti, io.BytesIO(data))
        return LayerBlob(path, "application/vnd.oci.image.layer.v1.tar+gzip", f"sha256:{name}")


def make_layers(out: Path, size_mb: int) -> tuple:
    m = LayerMaker(out)
    rng = m.rng
    scale = size_mb / 200.0
    total = 0

    def files(prefix: str, n_small: int, n_big_text: int, n_random: int, big: int):
        nonlocal total
        result = []
        for i in range(n_small):
            size = rng.randint(200, 24_000)
            result.append((f"{prefix}/d{i % 40}/s{i}.py", m.text(size), 0o644))
        for i in range(n_big_text):
            result.append((f"{prefix}/share/t{i}.txt", m.text(big), 0o644))
        for i in range(n_random):
            result.append((f"{prefix}/lib/r{i}.so", os.urandom(big), 0o755))
        total += sum(len(f[1]) for f in result)
        return result

    l1 = files("usr", int(3000 * scale), int(20 * scale), int(20 * scale), 1_500_000)
    l2 = files("opt/app", int(2000 * scale), int(15 * scale), int(10 * scale), 1_500_000)
    l3 = files("opt/app", int(500 * scale), int(5 * scale), int(10 * scale), 2_000_000)
    l4 = files("srv", int(500 * scale), int(3 * scale), int(2 * scale), 1_000_000)
    deleted = [f[0] for f in l1[: len(l1) // 10]]
    layers = [
        m.layer("base", l1),
        m.layer("app", l2, whiteouts=deleted[: len(deleted) // 2]),
        m.layer("update", l3, whiteouts=deleted[len(deleted) // 2:], opaque=["opt/app/d1", "opt/app/d2"]),
        m.layer("top", l4, whiteouts=["opt/app/share/t0.txt"]),
    ]
    return layers, total


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--compression", default="zstd")
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--processors", type=int, default=None)
    ap.add_argument("--methods", default="native,tar,dir")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="squashfs-bench-") as tmp:
        tmpd = Path(tmp)
        t0 = time.perf_counter()
        layers, total = make_layers(tmpd, args.size_mb)
        blob_mb = sum(os.path.getsize(b.path) for b in layers) / 1e6
        print(f"layers: {len(layers)} gzip blobs, {blob_mb:.0f} MB compressed, {total / 1e6:.0f} MB of file data "
              f"(made in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs; "
              f"compression {args.compression} level {args.level or 'default'}")

        t0 = time.perf_counter()
        with build_tree(layers) as tree:
            plan = tree.plan()
            n_files = sum(1 for _ in plan.layer_inodes())
        print(f"pass 1 (headers of all layers, merge): {time.perf_counter() - t0:.2f} s; final tree: "
              f"{len(plan.dirs)} dirs, {n_files} files")

        rows = []
        for method in args.methods.split(","):
            times, cpus = [], []
            for i in range(args.repeat):
                dest = tmpd / f"{method}-{i}.sqfs"
                c0, t0 = _cpu(), time.perf_counter()
                build_squashfs(layers, {"config": {"Env": ["PATH=/usr/bin"]}}, dest, source_ref="bench",
                               source_digest="sha256:0", compression=args.compression, level=args.level,
                               processors=args.processors, workdir=tmpd / "work", method=method)
                times.append(time.perf_counter() - t0)
                cpus.append(_cpu() - c0)
                size = dest.stat().st_size
                dest.unlink()
            best = min(times)
            rows.append((method, best, sum(times) / len(times), min(cpus), size, total / 1e6 / best))

        print()
        print(f"{'method':<8}{'best s':>9}{'mean s':>9}{'CPU s':>9}{'squashfs MB':>13}{'MB/s':>8}")
        for method, best, mean, cpu, size, rate in rows:
            print(f"{method:<8}{best:>9.2f}{mean:>9.2f}{cpu:>9.2f}{size / 1e6:>13.1f}{rate:>8.1f}")
        fastest = min(rows, key=lambda r: r[1])
        print(f"\nfastest: {fastest[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
