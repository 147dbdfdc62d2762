#!/usr/bin/env python3
"""Pull a big synthetic image into a SIF with the builtin puller, against the floor and the peer.

    python3 bench/pull.py [--size-mb 2048] [--layers 30] [--rss-mb 200] [--rss-layers N] [--rounds 1]

The bench makes the image itself and pushes it to a CNCF distribution registry
(``docker-registry``) it starts on 127.0.0.1: ``--layers`` layers, alternately gzip and zstd
(every third one zstd), holding a realistic mix of file sizes: many small text files (200 B to
24 KB), MB-sized text and random (incompressible) files, and a few 100 MB-class files (one
compressible, the others random), with whiteouts and an opaque directory in later layers. Then,
in the same run:

  builtin cold       ``shpc_lite.puller.pull`` into an empty root, in a child process (so its peak
                     RSS can be measured): download, merge, squashfs (the native writer for zstd
                     and gzip; mksquashfs, measured separately, for other compressors), SIF
  builtin warm       the same with the blob cache kept (nothing downloaded)
  builtin keep_blobs=false cold   the same with config keep_blobs false
  builtin squashfs_writer=mksquashfs cold   the same with the merged tar streamed into
                     ``mksquashfs -tar`` instead of the native writer
  download alone     the builtin's concurrent, verified download of every layer, nothing else
  skopeo+umoci+mksquashfs   ``skopeo copy docker://... oci:DIR`` + ``umoci unpack --rootless`` +
                     ``mksquashfs rootfs OUT`` (what ``apptainer pull`` does inside, without the SIF;
                     umoci 0.4.7 cannot read zstd layers, so skopeo recompresses those to gzip)
  mksquashfs alone   on the tree umoci unpacked
  floor              download alone + mksquashfs alone: what a pull cannot beat

and the peak RSS of a builtin cold pull of a ``--rss-mb`` image (default 200 MB, as many layers)
beside the big one (its last round), for the pulling process and any mksquashfs it ran separately,
with each image's file count and the growth, beside mksquashfs alone on umoci's tree of the same
image (the floor's memory: mksquashfs's tables grow with the number of files; docs/registries.md). Every mksquashfs call uses the same
compression (zstd level 3 unless --compression/--level) and all cores. Everything is on loopback, so the times show local
work, not network latency. Scratch space: about 3x the image size (registry, blob cache, umoci's
rootfs); check ``df -h`` first.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shpc_lite.config import load_config  # noqa: E402
from shpc_lite.pull.squashfs import MKSQUASHFS_MEM, compression_args  # noqa: E402
from tests.imagetools import LAYER_TYPES, OCI_CONFIG, OCI_MANIFEST, Pusher, make_config  # noqa: E402
from tests.registry_fixture import _start_registry, _stop  # noqa: E402

TAG = "1.0"
TOOLS = ("docker-registry", "skopeo", "umoci", "mksquashfs", "/usr/bin/time")
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
         "et dolore magna aliqua import def return class self none true false while for in if else elif try "
         "except finally with as yield lambda usr lib share include bin etc config value path module version "
         "python numpy torch cuda float int string list dict error warning info debug").split()

# The child that pulls prints its time and its own peak RSS (VmHWM: getrusage's ru_maxrss would
# count the bench's memory too, since Linux keeps it across fork and exec). mksquashfs's peak is
# taken by GNU time around it (a wrapper first on PATH), for the same reason.
PULL_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from shpc_lite.config import load_config
from shpc_lite.oci.reference import parse_reference
from shpc_lite.puller import pull
config = load_config({}, environ=json.loads(sys.argv[2]))
start = time.perf_counter()
pull(config, parse_reference(sys.argv[3]), quiet=True)
seconds = time.perf_counter() - start
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "python_kb": hwm}))
"""
MKSQUASHFS_WRAPPER = """#!/bin/sh
exec /usr/bin/time -a -o "$BENCH_MKSQUASHFS_RSS" -f %M {exe} "$@"
"""


class ImageMaker:
    """Writes the layers one at a time (compressed, pushed, dropped: memory holds one layer)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        lines, total = [], 0
        while total < 8 << 20:
            line = " ".join(self.rng.choices(WORDS, k=self.rng.randint(4, 14))) + "\n"
            lines.append(line)
            total += len(line)
        self.pool = "".join(lines).encode()

    def text(self, size: int) -> bytes:
        parts, got = [f"# {self.rng.random()}\n".encode()], 0
        while got < size:
            start = self.rng.randrange(0, len(self.pool) - 65536)
            parts.append(self.pool[start:start + min(65536, size - got)])
            got += len(parts[-1])
        return b"".join(parts)[:size]

    def random(self, size: int) -> bytes:
        return self.rng.randbytes(size)

    def layer_files(self, index: int, budget: int, big: list) -> list:
        """(name, data, mode) of one layer: ~25% small text, ~45% MB-sized files, the rest big ones."""
        rng, files, used = self.rng, [], 0
        for name, size, compressible in big:
            data = self.text(size) if compressible else self.random(size)
            files.append((name, data, 0o644))
            used += size
        small_budget = max(0, budget - used) * 35 // 100
        i = 0
        while small_budget > 0:
            size = rng.randint(200, 24_000)
            files.append((f"l{index}/pkg{i % 50}/m{i}.py", self.text(size), 0o644))
            small_budget -= size
            used += size
            i += 1
        j = 0
        while used < budget:
            size = rng.randint(1, 8) << 20
            if j % 2:
                files.append((f"l{index}/lib/lib{j}.so", self.random(size), 0o755))
            else:
                files.append((f"l{index}/share/data{j}.txt", self.text(size), 0o644))
            used += size
            j += 1
        return files


def make_and_push(pusher: Pusher, repo: str, size_mb: int, n_layers: int, seed: int) -> dict:
    """Make the image layer by layer, push it, and return what it holds."""
    maker = ImageMaker(seed)
    budget = (size_mb << 20) // n_layers
    # a few 100 MB-class files (only in images big enough to hold them), spread over the layers
    n_big = max(0, size_mb // 400)
    big_at = {round((k + 0.5) * n_layers / max(1, n_big)): k for k in range(n_big)}
    descriptors, diff_ids, blob_bytes, file_bytes, n_files = [], [], 0, 0, 0
    for index in range(n_layers):
        big = []
        if index in big_at:
            k = big_at[index]
            big = [(f"l{index}/big/model{k}.bin", maker.rng.randint(90, 140) << 20, k % 3 == 0)]
        files = maker.layer_files(index, budget, big)
        n_files += len(files)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
            if index >= 2:  # whiteouts of a few files two layers down, an opaque dir
                for name in (f"l{index - 2}/pkg{k}/m{k}.py" for k in range(0, 40, 3)):
                    d, _, base = name.rpartition("/")
                    tf.addfile(tarfile.TarInfo(f"{d}/.wh.{base}"))
                tf.addfile(tarfile.TarInfo(f"l{index - 1}/pkg7/.wh..wh..opq"))
            for name, data, mode in files:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mode, ti.mtime = len(data), mode, 1_700_000_000
                tf.addfile(ti, io.BytesIO(data))
        del files
        tar = raw.getvalue()
        del raw
        file_bytes += len(tar)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        kind = "zstd" if index % 3 == 2 else "gzip"
        if kind == "zstd":
            import zstandard

            blob = zstandard.ZstdCompressor(level=3, threads=-1).compress(tar)
        else:  # ISA-L's level 3 (fast to make; registries serve deflate at any level)
            from isal import igzip

            blob = igzip.compress(tar, compresslevel=3)
        del tar
        digest = pusher.push_blob(repo, blob)
        descriptors.append({"mediaType": LAYER_TYPES[(True, kind)], "digest": digest, "size": len(blob)})
        blob_bytes += len(blob)
        del blob
    config = make_config([SimpleNamespace(diff_id=d) for d in diff_ids], env=["PATH=/usr/bin:/bin", "BENCH=1"],
                         entrypoint=["/bin/sh"])
    config_digest = pusher.push_blob(repo, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                           "layers": descriptors}).encode()
    pusher.push_manifest(repo, TAG, manifest, OCI_MANIFEST)
    return {"blob_bytes": blob_bytes, "tar_bytes": file_bytes, "layers": n_layers, "files": n_files,
            "zstd": sum(1 for d in descriptors if d["mediaType"].endswith("zstd"))}


def run(*cmd: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


def cpu_seconds() -> float:
    """CPU time (user + sys) of this process and of every child it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple:
    """(wall seconds, CPU seconds) of ``fn()``: on a shared machine the CPU time is the steadier figure."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def pull_child(env: dict, ref: str, work: Path) -> dict:
    """A builtin pull in a fresh Python process: its time and peak RSS (Python, mksquashfs)."""
    wrapper_dir, rss_file = work / "bin", work / "mksquashfs.rss"
    if not wrapper_dir.is_dir():
        wrapper_dir.mkdir()
        (wrapper_dir / "mksquashfs").write_text(MKSQUASHFS_WRAPPER.format(exe=shutil.which("mksquashfs")))
        (wrapper_dir / "mksquashfs").chmod(0o755)
    rss_file.unlink(missing_ok=True)
    child_env = {**os.environ, "PATH": f"{wrapper_dir}:{os.environ['PATH']}", "BENCH_MKSQUASHFS_RSS": str(rss_file)}
    cpu = cpu_seconds()
    proc = subprocess.run([sys.executable, "-c", PULL_CHILD, str(REPO), json.dumps(env), ref],
                          capture_output=True, text=True, timeout=3600, env=child_env)
    cpu = cpu_seconds() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"builtin pull failed: {proc.stderr.strip()[-800:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks = [int(x) for x in rss_file.read_text().split() if x.isdigit()] if rss_file.exists() else []
    result["children_kb"] = max(peaks, default=0)
    result["cpu"] = cpu  # the child's and mksquashfs's (the child's startup included)
    return result


def mksquashfs_alone_kb(tree: Path, out: Path, squash: list, work: Path) -> int:
    """Peak RSS of ``mksquashfs`` alone on an extracted tree, in KB, with the builtin's cache cap
    (``-mem``; without it mksquashfs fills a quarter of RAM with read-ahead): the floor's memory."""
    record = work / "alone.rss"
    run("/usr/bin/time", "-o", str(record), "-f", "%M", "mksquashfs", str(tree), str(out), *squash,
        "-mem", MKSQUASHFS_MEM)
    return int(record.read_text().split()[-1])


def unpack_with_umoci(ref: str, layout: Path, bundle: Path) -> None:
    """skopeo + umoci: the reference unpack of ``ref`` into ``bundle/rootfs``."""
    shutil.rmtree(bundle, ignore_errors=True)
    # umoci 0.4.7 (Debian 12) refuses zstd layers: skopeo recompresses them to gzip
    run("skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-compress-format", "gzip",
        f"docker://{ref}", f"oci:{layout}:{TAG}")
    run("umoci", "unpack", "--rootless", "--image", f"{layout}:{TAG}", str(bundle))


def download_alone(env: dict, ref: str) -> tuple:
    """The builtin's download step alone: every layer fetched concurrently and verified."""
    from shpc_lite.oci.reference import parse_reference
    from shpc_lite.progress import Progress
    from shpc_lite.puller import RegistrySource
    from shpc_lite.resolve import client_from_config

    config = load_config({}, environ=env)
    client = client_from_config(config)
    parsed = parse_reference(ref)

    def fetch() -> None:
        source = RegistrySource(client, parsed, client.head_digest(parsed))
        image = source.open()
        for _ in source.fetch_layers(image, config, Progress(image.label, image.size, len(image.layers),
                                                             quiet=True), None):
            pass

    return timed(fetch)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rss-mb", type=int, default=200, help="also pull an image this big for the peak-RSS row (0: no)")
    ap.add_argument("--rss-layers", type=int, default=0, help="layers of that image (default: as many as --layers)")
    ap.add_argument("--rounds", type=int, default=1, help="each row is the best of this many runs")
    ap.add_argument("--compression", default="zstd")
    ap.add_argument("--level", type=int, default=None)
    opts = ap.parse_args()
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install docker-registry skopeo umoci squashfs-tools time)",
              file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="shpc-lite-bench-pull-"))
    proc = None
    try:
        (work / "registry").mkdir()
        proc, port, _ = _start_registry(work / "registry", "")
        host = f"127.0.0.1:{port}"
        base_env = {"SHPC_LITE_PULLER": "builtin", "SHPC_LITE_SQUASHFS_COMPRESSION": opts.compression,
                    "SHPC_LITE_SYSTEM_CONFIG": str(work / "none.yaml"), "XDG_CONFIG_HOME": str(work / "cfg"),
                    "SHPC_LITE_INSECURE_REGISTRIES": host}
        if opts.level is not None:
            base_env["SHPC_LITE_SQUASHFS_LEVEL"] = str(opts.level)
        level = load_config({}, environ=base_env)["squashfs_level"] or None  # the builtin's level, given to the peer too
        squash = ["-noappend", "-no-xattrs", "-quiet", "-no-progress", *compression_args(opts.compression, level)]
        pusher = Pusher(f"http://{host}")
        started = time.perf_counter()
        big = make_and_push(pusher, "bench/big", opts.size_mb, opts.layers, seed=1)
        print(f"image: {big['tar_bytes'] / 1e6:.0f} MB of layer tars in {big['layers']} layers "
              f"({big['zstd']} zstd, the rest gzip; {big['blob_bytes'] / 1e6:.0f} MB pushed), made and pushed in "
              f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs; squashfs {opts.compression} "
              f"level {level or 'default'}", flush=True)
        small = None
        if opts.rss_mb:
            small = make_and_push(pusher, "bench/small", opts.rss_mb, opts.rss_layers or opts.layers, seed=2)
        ref = f"{host}/bench/big:{TAG}"

        rows: dict[str, list[tuple]] = {}  # name -> [(wall s, CPU s)] per round
        rss: dict[int, dict] = {}  # image size in MB -> the peaks of its cold pull
        rss_tool: dict[int, dict] = {}  # the same with squashfs_writer=mksquashfs
        sizes: dict[str, int] = {}
        for rnd in range(opts.rounds):
            root = work / f"root-{rnd}"
            env = {**base_env, "SHPC_LITE_ROOT": str(root)}
            cold = pull_child(env, ref, work)
            rows.setdefault("builtin cold (download + SIF)", []).append((cold["seconds"], cold["cpu"]))
            rss[opts.size_mb] = cold
            sif = next((root / "containers").glob("*.sif"))
            sizes["builtin"] = sif.stat().st_size
            sif.unlink()
            warm = pull_child(env, ref, work)
            rows.setdefault("builtin warm (blob cache)", []).append((warm["seconds"], warm["cpu"]))
            shutil.rmtree(root)
            nokeep = pull_child({**env, "SHPC_LITE_KEEP_BLOBS": "false"}, ref, work)
            rows.setdefault("builtin cold, keep_blobs=false", []).append((nokeep["seconds"], nokeep["cpu"]))
            shutil.rmtree(root)
            tool = pull_child({**env, "SHPC_LITE_SQUASHFS_WRITER": "mksquashfs"}, ref, work)
            rows.setdefault("builtin cold, squashfs_writer=mksquashfs", []).append((tool["seconds"], tool["cpu"]))
            rss_tool[opts.size_mb] = tool
            shutil.rmtree(root)
            rows.setdefault("download alone (builtin, verified)", []).append(download_alone(env, ref))
            shutil.rmtree(root)
            print(f"round {rnd + 1}: builtin done", flush=True)

            layout, bundle, out = work / f"oci-{rnd}", work / f"bundle-{rnd}", work / f"peer-{rnd}.sqfs"

            def peer() -> None:
                unpack_with_umoci(ref, layout, bundle)
                run("mksquashfs", str(bundle / "rootfs"), str(out), *squash)

            rows.setdefault("skopeo + umoci + mksquashfs cold", []).append(timed(peer))
            sizes["peer"] = out.stat().st_size
            rows.setdefault("mksquashfs alone (umoci's tree)", []).append(
                timed(lambda: run("mksquashfs", str(bundle / "rootfs"), str(out), *squash)))
            cold["alone_kb"] = mksquashfs_alone_kb(bundle / "rootfs", out, squash, work)
            for path in (layout, bundle):
                shutil.rmtree(path, ignore_errors=True)
            out.unlink()

        if small is not None:
            root = work / "root-small"
            small_ref = f"{host}/bench/small:{TAG}"
            rss[opts.rss_mb] = pull_child({**base_env, "SHPC_LITE_ROOT": str(root)}, small_ref, work)
            shutil.rmtree(root)
            rss_tool[opts.rss_mb] = pull_child({**base_env, "SHPC_LITE_ROOT": str(root),
                                                "SHPC_LITE_SQUASHFS_WRITER": "mksquashfs"}, small_ref, work)
            shutil.rmtree(root)
            layout, bundle, out = work / "oci-small", work / "bundle-small", work / "small.sqfs"
            unpack_with_umoci(small_ref, layout, bundle)
            rss[opts.rss_mb]["alone_kb"] = mksquashfs_alone_kb(bundle / "rootfs", out, squash, work)
            for path in (layout, bundle):
                shutil.rmtree(path, ignore_errors=True)
            out.unlink()

        best = {name: min(times) for name, times in rows.items()}  # the round with the least wall time
        floor = tuple(a + b for a, b in zip(best["download alone (builtin, verified)"],
                                            best["mksquashfs alone (umoci's tree)"]))
        peer = best["skopeo + umoci + mksquashfs cold"]
        rows_out = [*best.items(), ("floor: download alone + mksquashfs alone", floor)]
        print(f"\n{'path':<42}{'wall s':>8}{'vs floor':>10}{'vs peer':>9}{'CPU s':>8}{'vs floor':>10}")
        for name, (wall, cpu) in rows_out:
            print(f"{name:<42}{wall:>8.2f}{wall / floor[0]:>9.2f}x{wall / peer[0]:>8.2f}x{cpu:>8.2f}{cpu / floor[1]:>9.2f}x")
        cold = best["builtin cold (download + SIF)"]
        print(f"\nbuiltin cold / floor = {cold[0] / floor[0]:.2f} wall, {cold[1] / floor[1]:.2f} CPU (target <= 1.5); "
              f"builtin cold / skopeo+umoci+mksquashfs = {cold[0] / peer[0]:.2f} wall, {cold[1] / peer[1]:.2f} CPU")
        print(f"builtin SIF {sizes['builtin'] / 1e6:.1f} MB, peer squashfs {sizes['peer'] / 1e6:.1f} MB")
        images = {opts.size_mb: big, **({opts.rss_mb: small} if small else {})}
        sizes_mb = sorted(rss)
        columns = [f"{mb} MB image, {images[mb]['files']} files" for mb in sizes_mb]
        head = "".join(f"{c:>30}" for c in columns)
        print(f"\n{'peak RSS of a builtin cold pull, MB':<40}{head}{'growth':>10}")
        for label, peaks_of, key in (("the pull (one process, native writer)", rss, "python_kb"),
                                     ("squashfs_writer=mksquashfs: Python", rss_tool, "python_kb"),
                                     ("squashfs_writer=mksquashfs: mksquashfs", rss_tool, "children_kb"),
                                     (f"mksquashfs -mem {MKSQUASHFS_MEM} alone, umoci's tree", rss, "alone_kb")):
            peaks = [peaks_of[mb][key] / 1024 for mb in sizes_mb]
            print(f"{label:<40}" + "".join(f"{p:>30.0f}" for p in peaks) + f"{peaks[-1] - peaks[0]:>+10.0f}")
        return 0
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
