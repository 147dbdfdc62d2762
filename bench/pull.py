#!/usr/bin/env python3
"""Pull a ~200 MB image into a SIF with the builtin puller and with skopeo + umoci + mksquashfs.

    python3 bench/pull.py [--size-mb 200] [--rounds 2]

The bench makes the image itself (four gzip layers of mixed compressible text and random files,
with whiteouts and opaque directories: the layers of bench/squashfs_paths.py), pushes it to a CNCF
distribution registry (``docker-registry``) it starts on 127.0.0.1, and then, in the same run:

  builtin cold   ``shpc_lite.puller.pull`` into an empty root: blobs downloaded concurrently and
                 verified, layers merged, squashfs streamed into mksquashfs, wrapped in a SIF
  builtin warm   the same after deleting the SIF (blobs from the cache: nothing downloaded)
  peer cold      ``skopeo copy docker://... oci:DIR`` + ``umoci unpack --rootless`` +
                 ``mksquashfs rootfs OUT`` (what ``apptainer pull`` does inside, without the SIF)
  peer warm      the same with skopeo's OCI layout kept (skopeo skips blobs it has)
  floor          ``mksquashfs`` alone on the unpacked rootfs

Every mksquashfs call uses the same compression (zstd level 3 unless --compression/--level) and
all cores. Everything is on loopback, so the times show local work, not network latency.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from shpc_lite.config import load_config  # noqa: E402
from shpc_lite.oci.reference import parse_reference  # noqa: E402
from shpc_lite.pull.squashfs import compression_args  # noqa: E402
from squashfs_paths import make_layers  # noqa: E402
from tests.imagetools import Layer, Pusher, make_image, sha256  # noqa: E402
from tests.registry_fixture import _start_registry, _stop  # noqa: E402

REPOSITORY = "bench/big"
TAG = "1.0"
TOOLS = ("docker-registry", "skopeo", "umoci", "mksquashfs")


def push_image(url: str, work: Path, size_mb: int) -> tuple[str, int, int]:
    """Make and push the image; returns (digest, compressed bytes, file bytes)."""
    blobs, file_bytes = make_layers(work, size_mb)
    layers = []
    for blob in blobs:
        data = blob.path.read_bytes()
        layers.append(Layer(data, "gzip", sha256(gzip.decompress(data))))
        blob.path.unlink()
    image = make_image(layers, oci=True, entrypoint=["/bin/sh"], env=["PATH=/usr/bin:/bin", "BENCH=1"])
    digest = Pusher(url).push_image(REPOSITORY, image, tags=[TAG])
    return digest, sum(layer.size for layer in layers), file_bytes


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(*cmd: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="each row is the best of this many runs")
    ap.add_argument("--compression", default="zstd")
    ap.add_argument("--level", type=int, default=None)
    opts = ap.parse_args()
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install docker-registry skopeo umoci squashfs-tools)",
              file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="shpc-lite-bench-pull-"))
    proc = None
    try:
        (work / "registry").mkdir()
        proc, port, _ = _start_registry(work / "registry", "")
        host = f"127.0.0.1:{port}"
        env = {"SHPC_LITE_PULLER": "builtin", "SHPC_LITE_SQUASHFS_COMPRESSION": opts.compression,
               "SHPC_LITE_SYSTEM_CONFIG": str(work / "none.yaml"), "XDG_CONFIG_HOME": str(work / "cfg")}
        if opts.level is not None:
            env["SHPC_LITE_SQUASHFS_LEVEL"] = str(opts.level)
        level = load_config({}, environ=env)["squashfs_level"] or None  # the builtin's level, given to the peer too
        squash = ["-noappend", "-no-xattrs", "-quiet", "-no-progress", *compression_args(opts.compression, level)]
        started = time.perf_counter()
        _, blob_bytes, file_bytes = push_image(f"http://{host}", work, opts.size_mb)
        print(f"image: {file_bytes / 1e6:.0f} MB of files in 4 gzip layers ({blob_bytes / 1e6:.0f} MB pushed), "
              f"made and pushed in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs; "
              f"squashfs {opts.compression} level {level or 'default'}")

        from shpc_lite.puller import pull

        rows: dict[str, list[float]] = {}
        sizes: dict[str, int] = {}
        for rnd in range(opts.rounds):
            # builtin: cold (empty root), then warm (SIF deleted, blob cache kept)
            config = load_config({}, environ={**env, "SHPC_LITE_ROOT": str(work / f"root-{rnd}")})
            stored = None

            def builtin() -> None:
                nonlocal stored
                stored = pull(config, parse_reference(f"{host}/{REPOSITORY}:{TAG}"), quiet=True)

            rows.setdefault("builtin cold (download + SIF)", []).append(timed(builtin))
            sizes["builtin"] = stored.path.stat().st_size
            stored.path.unlink()
            rows.setdefault("builtin warm (blob cache)", []).append(timed(builtin))
            shutil.rmtree(work / f"root-{rnd}")

            # peer: skopeo copy + umoci unpack + mksquashfs (cold), then with the OCI layout kept
            layout, bundle, out = work / f"oci-{rnd}", work / f"bundle-{rnd}", work / f"peer-{rnd}.sqfs"

            def peer() -> None:
                shutil.rmtree(bundle, ignore_errors=True)
                run("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{host}/{REPOSITORY}:{TAG}",
                    f"oci:{layout}:{TAG}")
                run("umoci", "unpack", "--rootless", "--image", f"{layout}:{TAG}", str(bundle))
                run("mksquashfs", str(bundle / "rootfs"), str(out), *squash)

            rows.setdefault("skopeo + umoci + mksquashfs cold", []).append(timed(peer))
            rows.setdefault("skopeo + umoci + mksquashfs warm", []).append(timed(peer))
            sizes["peer"] = out.stat().st_size
            rows.setdefault("floor: mksquashfs alone", []).append(
                timed(lambda: run("mksquashfs", str(bundle / "rootfs"), str(out), *squash)))
            for path in (layout, bundle):
                shutil.rmtree(path, ignore_errors=True)
            out.unlink()

        best = {name: min(times) for name, times in rows.items()}
        print(f"\n{'path':<36}{'best s':>9}{'mean s':>9}{'vs peer':>9}")
        for name, times in rows.items():
            peer_key = "skopeo + umoci + mksquashfs " + ("warm" if "warm" in name else "cold")
            ratio = best[name] / best[peer_key]
            print(f"{name:<36}{best[name]:>9.2f}{sum(times) / len(times):>9.2f}{ratio:>8.2f}x")
        print(f"\nbuiltin SIF {sizes['builtin'] / 1e6:.1f} MB, peer squashfs {sizes['peer'] / 1e6:.1f} MB; "
              f"builtin cold / peer cold = {best['builtin cold (download + SIF)'] / best['skopeo + umoci + mksquashfs cold']:.2f}")
        return 0
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
