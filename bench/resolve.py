#!/usr/bin/env python3
"""Resolve every built-in recipe against a local registry; print wall time and HTTP requests.

Run by hand: python bench/resolve.py [--jobs 4] [--rounds 3]. It starts a CNCF distribution
registry (``docker-registry``) on 127.0.0.1 with Bearer-token auth (the flow Docker Hub and nvcr.io
use; the token server of tests/registry_fixture.py), pushes a small image under every real tag of
tests/data/tags/ (library/python, pytorch/pytorch, tensorflow/tensorflow, nvidia/pytorch,
nvidia/tensorflow), and maps docker.io and nvcr.io to it with config ``mirrors``. Then:

- in process: ``resolve()`` with ``client_from_config``; requests counted by the client's
  ``stats`` and the token server (goal: one token per scope, one tag-list walk per repository,
  one HEAD per chosen tag, no manifest GET);
- the CLI: ``python -m shpc_lite resolve`` (interpreter start included) writing the lock.

Everything runs on loopback, so the times show client overhead, not network latency.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shpc_lite.config import load_config  # noqa: E402
from shpc_lite.recipe import RecipeIndex  # noqa: E402
from shpc_lite.resolve import client_from_config, resolve  # noqa: E402
from shpc_lite.resources import builtin_registry  # noqa: E402
from tests.imagetools import make_image, make_layer  # noqa: E402
from tests.registry_fixture import SERVICE, ISSUER, TokenServer, _start_registry, _stop  # noqa: E402

TAG_LISTS = {
    "library/python": "dockerhub_library-python_2024-02-15.txt",
    "pytorch/pytorch": "dockerhub_pytorch-pytorch.txt",
    "tensorflow/tensorflow": "dockerhub_tensorflow-tensorflow.txt",
    "nvidia/pytorch": "nvcr_nvidia-pytorch.txt",
    "nvidia/tensorflow": "nvcr_nvidia-tensorflow.txt",
}


def real_tags(name: str) -> list[str]:
    lines = (REPO / "tests" / "data" / "tags" / name).read_text().splitlines()
    return [line.split("\t")[0] for line in lines if line.strip()]


def push_all(pusher) -> int:
    count = 0
    for repo, listing in TAG_LISTS.items():
        image = make_image([make_layer({"etc/image": repo}, compression=None)])
        pusher.push_image(repo, image, tags=real_tags(listing))
        count += len(real_tags(listing))
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--auth", choices=("token", "none"), default="token",
                        help="Bearer tokens from an in-process token server (its RS256 signing shares "
                             "this process's GIL), or an anonymous registry")
    opts = parser.parse_args()
    if not shutil.which("docker-registry"):
        print("docker-registry is not installed (apt-get install docker-registry)", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="shpc-lite-bench-resolve-"))
    tokens = TokenServer({"bench": "bench-pw"}).start()
    proc = None
    try:
        (work / "root.pem").write_bytes(tokens.cert_pem)
        auth = ("auth:\n  token:\n"
                f"    realm: {tokens.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {work / 'root.pem'}\n") if opts.auth == "token" else ""
        proc, port, _ = _start_registry(work, auth)
        url = f"http://127.0.0.1:{port}"
        from tests.imagetools import Pusher

        started = time.perf_counter()
        pushed = push_all(Pusher(url, "bench", "bench-pw"))
        print(f"pushed {pushed} tags into {len(TAG_LISTS)} repositories in {time.perf_counter() - started:.1f} s")

        env = {
            **os.environ,
            "SHPC_LITE_ROOT": str(work / "root"),
            "XDG_CONFIG_HOME": str(work / "config"),
            "SHPC_LITE_SYSTEM_CONFIG": str(work / "none.yaml"),
            "HOME": str(work / "home"),
            "DOCKER_CONFIG": str(work / "home" / ".docker"),
        }
        (work / "config" / "shpc-lite").mkdir(parents=True)
        (work / "config" / "shpc-lite" / "config.yaml").write_text(
            f"mirrors:\n  docker.io: {url}\n  nvcr.io: {url}\njobs: {opts.jobs}\n")
        config = load_config({}, environ=env)
        recipes = [r for _, r in RecipeIndex([builtin_registry()]).all()]

        times = []
        for _ in range(opts.rounds):
            tokens.reset()
            client = client_from_config(config)
            started = time.perf_counter()
            result = resolve(recipes, client, jobs=opts.jobs)
            times.append(time.perf_counter() - started)
            client.close()
            if not result.ok:
                for failure in result.failures:
                    print("failed:", failure, file=sys.stderr)
                return 1
        chosen = sum(len(r.versions) for r in result.recipes)
        distinct_tags = len({(r.image, v.tag) for r in result.recipes for v in r.versions})
        scopes = collections.Counter(s for req in tokens.requests for s in req.scopes)
        print(f"in process ({opts.auth} auth): {len(recipes)} recipes, {chosen} module versions ({distinct_tags} distinct tags), "
              f"jobs={opts.jobs}: median {statistics.median(times) * 1000:.0f} ms over {opts.rounds} rounds "
              f"(min {min(times) * 1000:.0f} ms)")
        stats = client.stats.snapshot()
        print("  requests (last round): " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        print(f"  token requests: {sum(scopes.values())} for {len(scopes)} scopes "
              f"(max per scope {max(scopes.values(), default=0)})")

        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "shpc_lite", "resolve"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        cli = time.perf_counter() - started
        if run.returncode != 0:
            print(run.stdout, run.stderr, file=sys.stderr)
            return 1
        lock = work / "root" / "shpc-lite.lock"
        print(f"CLI: shpc-lite resolve (all recipes, lock written, {lock.stat().st_size} bytes) "
              f"{cli * 1000:.0f} ms wall including interpreter start")
        return 0
    finally:
        if proc is not None:
            _stop(proc)
        tokens.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
