#!/usr/bin/env python3
"""Time a no-op command (``/bin/true``) through a generated wrapper vs the runtime called directly,
per runtime kind. Run by hand, never in CI:

    python3 bench/wrapper.py [--runs 100] [--kinds charliecloud,apptainer,...] [--profile]

* charliecloud, for real (root, /dev/fuse, ch-run, squashfuse, fusermount3): a busybox image
  (scripts/busybox_image.py) installed with ``--from oci-archive:``. Timed: the wrapper's first
  call (it mounts the SIF's squashfs with squashfuse), its later calls once mounted (a call
  sleeping in the background keeps the mount), and ``ch-run`` called directly on the mounted
  directory, both bare and with the exact argv the wrapper passes (recorded by a stand-in).
* apptainer, singularity, podman, podman-hpc, shifter: the runtime is a no-op stand-in (``#!/bin/sh\\nexit 0``):
  the wrapper calling it vs calling it directly with the same argv, i.e. the wrapper's own cost
  (the install-time ``podman pull`` / ``shifterimg pull`` is the stand-in too). A kind whose
  install fails (e.g. its template is not in the checkout) shows ``n/a``; ``--repo DIR`` installs
  with another shpc-lite checkout, read only.

Prints a table (median of the runs, ms) and whether "the wrapper adds at most 5 ms once mounted"
holds. ``--profile`` (automatic when it does not hold) times the Charliecloud wrapper's steps.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import busybox_image  # noqa: E402

LIMIT_MS = 5.0
STANDIN = "#!/bin/sh\nexit 0\n"
RECORDER = "#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$SHPC_LITE_BENCH_ARGV\"\n"
KINDS = {"charliecloud": "ch-run", "apptainer": "apptainer", "singularity": "singularity",
         "podman": "podman", "podman-hpc": "podman-hpc", "shifter": "shifter"}
RECIPE = """\
name: noop
image: localhost/noop
description: a busybox image for bench/wrapper.py
versions:
  "1.0": "1.0"
aliases:
  "true": /bin/true
  hold: /bin/sleep
"""


def spawn_ms(argv: list[str], env: dict, cwd: Path) -> float:
    """Wall time of one run, in ms (posix_spawn: no Python fork overhead in the figure)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1)]
        old = os.getcwd()
        os.chdir(cwd)
        try:
            start = time.perf_counter()
            pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
            _, status = os.waitpid(pid, 0)
            took = (time.perf_counter() - start) * 1000
        finally:
            os.chdir(old)
    finally:
        os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[0]} exited {os.waitstatus_to_exitcode(status)}")
    return took


def median_ms(argv: list[str], env: dict, cwd: Path, runs: int, before=None) -> float:
    spawn_ms(argv, env, cwd)  # warm the page cache
    times = []
    for _ in range(runs):
        if before:
            before()
        times.append(spawn_ms(argv, env, cwd))
    return statistics.median(times)


class Bench:
    def __init__(self, tmp: Path, runs: int, repo: Path = REPO):
        self.tmp, self.runs, self.repo = tmp, runs, repo
        self.archive = tmp / "noop.tar"
        raw = Path("/bin/busybox").read_bytes()
        busybox_image.write_oci_archive(self.archive, raw, busybox_image.ARCHES.get(os.uname().machine, "amd64"), "1.0")
        (tmp / "registry").mkdir()
        (tmp / "registry" / "noop.yaml").write_text(RECIPE)
        self.bin = tmp / "standin-bin"
        self.bin.mkdir()
        self.work = tmp / "work"  # the callers' directory: under /tmp, which every image can show
        self.work.mkdir()
        self.base_env = {
            "PATH": os.environ["PATH"], "HOME": str(tmp / "home"), "USER": os.environ.get("USER", "root"),
            "LANG": "C.UTF-8", "SHPC_LITE_SYSTEM_CONFIG": "/nonexistent", "XDG_CONFIG_HOME": str(tmp / "cfg"),
            "SHPC_LITE_MOUNT_DIR": str(tmp / "mounts"), "SHPC_LITE_MOUNT_LINGER": "0.05",
        }
        (tmp / "home").mkdir()

    def install(self, kind: str, runtime: str) -> Path:
        root = self.tmp / kind
        env = {**self.base_env, "PYTHONPATH": str(self.repo), "PYTHONDONTWRITEBYTECODE": "1", "SHPC_LITE_ROOT": str(root),
               "SHPC_LITE_REGISTRY": str(self.tmp / "registry"), "SHPC_LITE_RUNTIME": runtime,
               "SHPC_LITE_RUNTIME_KIND": kind}
        proc = subprocess.run([sys.executable, "-m", "shpc_lite", "install", "noop:1.0", "--from",
                               f"oci-archive:{self.archive}"], env=env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr.strip().splitlines() or ["install failed"])[-1])
        return root / "wrappers" / "noop" / "1.0" / "bin"

    def recorded_argv(self, wrapper: Path, binary: str) -> list[str]:
        """The argv the wrapper execs, recorded by a stand-in found first on PATH."""
        rec = self.tmp / "recorder"
        rec.mkdir(exist_ok=True)
        (rec / binary).write_text(RECORDER)
        (rec / binary).chmod(0o755)
        out = self.tmp / "argv"
        env = {**self.base_env, "PATH": f"{rec}:{self.base_env['PATH']}", "SHPC_LITE_BENCH_ARGV": str(out)}
        subprocess.run([str(wrapper)], env=env, cwd=self.work, check=True, timeout=60)
        return [a.decode() for a in out.read_bytes().split(b"\0")[:-1]]

    # -- stand-in kinds -----------------------------------------------------------------------

    def standin_kind(self, kind: str) -> dict:
        binary = KINDS[kind]
        runtime = self.bin / binary
        for name in (binary, "shifterimg"):  # shifter's install pulls with shifterimg beside it
            (self.bin / name).write_text(STANDIN)
            (self.bin / name).chmod(0o755)
        bindir = self.install(kind, str(runtime))
        wrapper = bindir / "true"
        direct = [str(runtime), *self.recorded_argv_abs(wrapper, runtime)]
        w = median_ms([str(wrapper)], self.base_env, self.work, self.runs)
        d = median_ms(direct, self.base_env, self.work, self.runs)
        return {"kind": kind, "rows": [("wrapper -> no-op stand-in", w, "stand-in called directly, same argv", d)]}

    def recorded_argv_abs(self, wrapper: Path, runtime: Path) -> list[str]:
        """As recorded_argv, for a wrapper that execs an absolute path: swap the stand-in briefly."""
        saved = runtime.read_text()
        out = self.tmp / "argv"
        runtime.write_text(RECORDER)
        try:
            env = {**self.base_env, "SHPC_LITE_BENCH_ARGV": str(out)}
            subprocess.run([str(wrapper)], env=env, cwd=self.work, check=True, timeout=60)
        finally:
            runtime.write_text(saved)
        return [a.decode() for a in out.read_bytes().split(b"\0")[:-1]]

    # -- Charliecloud, for real ---------------------------------------------------------------

    def mounts(self) -> list[str]:
        base = self.base_env["SHPC_LITE_MOUNT_DIR"] + "/"
        return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                if line.split()[1].startswith(base)]

    def wait_unmounted(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.mounts():
            if time.monotonic() > deadline:
                raise RuntimeError(f"still mounted: {self.mounts()}")
            time.sleep(0.01)

    def charliecloud(self, profile: bool) -> dict:
        bindir = self.install("charliecloud", "ch-run")
        wrapper = bindir / "true"
        argv = self.recorded_argv(wrapper, "ch-run")
        self.wait_unmounted()
        first = median_ms([str(wrapper)], self.base_env, self.work, max(5, self.runs // 4), before=self.wait_unmounted)
        holder = subprocess.Popen([str(bindir / "hold"), "600"], env=self.base_env, cwd=self.work,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not self.mounts() and time.monotonic() < deadline:
                time.sleep(0.01)
            mnt = self.mounts()[0]
            later = median_ms([str(wrapper)], self.base_env, self.work, self.runs)
            same = median_ms(["ch-run", *argv], self.base_env, self.work, self.runs)
            bare = median_ms(["ch-run", mnt, "--", "/bin/true"], self.base_env, self.work, self.runs)
            steps = self.profile_steps(wrapper) if profile else []
        finally:
            holder.terminate()
            holder.wait(timeout=10)
        self.wait_unmounted()
        return {"kind": "charliecloud", "rows": [
            ("wrapper, first call (mounts)", first, "ch-run on the mounted dir, bare", bare),
            ("wrapper, once mounted", later, "ch-run on the mounted dir, the wrapper's argv", same),
        ], "steps": steps}

    def profile_steps(self, wrapper: Path) -> list[tuple[str, float]]:
        """What each step of the Charliecloud wrapper costs once mounted (the mount is held)."""
        state = Path(self.mounts()[0]).parent
        text = wrapper.read_text()
        noexec = self.tmp / "wrapper-noexec"
        noexec.write_text(text.replace("exec 'ch-run'", "exit 0 #"))
        noexec.chmod(0o755)
        noflock = self.tmp / "wrapper-noexec-noflock"
        noflock.write_text(noexec.read_text().replace("flock -s 9 || exit 125", ": flock skipped"))
        noflock.chmod(0o755)
        lock = state / "users.lock"
        env, cwd, n = self.base_env, self.work, self.runs
        sh = median_ms(["/bin/sh", "-c", "exit 0"], env, cwd, n)
        steps = [
            ("/bin/sh start-up (sh -c 'exit 0')", sh),
            ("the wrapper up to its exec (sh included)", median_ms([str(noexec)], env, cwd, n)),
            ("  the same without the flock exec", median_ms([str(noflock)], env, cwd, n)),
            ("one `flock -s` exec in sh (minus sh)", median_ms(["/bin/sh", "-c", f"exec 9<>{lock}; flock -s 9"], env, cwd, n) - sh),
            ("one `id -un` exec in sh (minus sh; only when $USER is unset)", median_ms(["/bin/sh", "-c", "id -un"], env, cwd, n) - sh),
            ("`[ -e $mnt/.singularity.d ]` etc. on the FUSE mount (minus sh)",
             median_ms(["/bin/sh", "-c", f"[ -e {state}/root/.singularity.d ] || [ -e {state}/root/bin ]"], env, cwd, n) - sh),
        ]
        return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="runs per figure (the median is shown)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    parser.add_argument("--profile", action="store_true", help="time the Charliecloud wrapper's steps")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="the shpc-lite checkout whose install writes the wrappers (default: this one); "
                             "nothing is written into it")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kind(s): {', '.join(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="shpc-lite-bench-wrapper.", dir="/tmp"))
    bench = Bench(tmp, args.runs, args.repo.resolve())
    results, failures = [], []
    try:
        for kind in kinds:
            try:
                if kind == "charliecloud":
                    for tool in ("ch-run", "squashfuse", "fusermount3", "flock"):
                        if shutil.which(tool) is None:
                            raise RuntimeError(f"{tool} is not installed")
                    results.append(bench.charliecloud(args.profile))
                else:
                    results.append(bench.standin_kind(kind))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                failures.append((kind, str(exc)))
    finally:
        for mnt in bench.mounts():
            subprocess.run(["fusermount3", "-u", "-z", mnt], check=False)
        if args.keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"no-op (/bin/true) through the wrapper vs the runtime called directly: median of {args.runs} runs, ms "
          f"(first calls: median of {max(5, args.runs // 4)}); wrappers written by {args.repo.resolve()}\n")
    print(f"| kind | through the wrapper | ms | called directly | ms | wrapper adds (ms) |")
    print("|---|---|---:|---|---:|---:|")
    worst = 0.0
    steps = []
    for res in results:
        for what, w, direct_what, d in res["rows"]:
            added = w - d
            once_mounted = "first call" not in what
            if once_mounted:
                worst = max(worst, added)
            print(f"| {res['kind']} | {what} | {w:.2f} | {direct_what} | {d:.2f} | "
                  f"{added:+.2f}{'' if once_mounted else ' (incl. mount)'} |")
        steps += res.get("steps", [])
    for kind, why in failures:
        print(f"| {kind} | n/a | | {why} | | |")
    holds = bool(results) and worst <= LIMIT_MS
    print(f"\n\"the wrapper adds at most {LIMIT_MS:g} ms once mounted\": {'holds' if holds else 'does NOT hold'} "
          f"(worst: {worst:+.2f} ms)")
    if steps:
        print("\nCharliecloud wrapper, step by step once mounted (median ms):\n")
        for what, ms in steps:
            print(f"  {ms:7.2f}  {what}")
    if not holds and not args.profile and any(r["kind"] == "charliecloud" for r in results):
        print("\n(run again with --profile to see which step of the wrapper costs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
