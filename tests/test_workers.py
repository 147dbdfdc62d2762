"""Issue 13: a large batch install split over forked worker processes (shpc_lite.workers).

What a user would notice: every shard's work is done (in other processes, on other cores), the
results come back in order, a worker that dies or fails turns into failed lines for its modules
rather than a hang or a traceback, and no worker outlives a ``kill -9`` of the command.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from shpc_lite.site import Entry, shards
from shpc_lite.workers import map_forked
from tests import imagetools as it
from tests.imagetools import image_recipe


def _lost(shard, reason):
    return ("lost", shard, reason)


def test_every_shard_runs_in_its_own_process_and_results_come_back_in_order():
    results = map_forked(lambda n: (n, n * n, os.getpid()), [1, 2, 3], _lost)
    assert [r[:2] for r in results] == [(1, 1), (2, 4), (3, 9)]
    pids = [r[2] for r in results]
    assert pids[0] == os.getpid() and len(set(pids)) == 3  # the first here, the others forked


def test_a_worker_killed_or_failing_becomes_a_lost_shard_not_a_hang():
    def work(n):
        if n == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == 3:
            raise RuntimeError("disk on fire")
        return n

    results = map_forked(work, [1, 2, 3], _lost)
    assert results[0] == 1
    assert results[1][:2] == ("lost", 2) and "killed by signal 9" in results[1][2]
    assert results[2][:2] == ("lost", 3) and results[2][2].endswith("RuntimeError: disk on fire")


def test_a_large_result_crosses_the_pipe_whole():
    results = map_forked(lambda n: [n] * 200_000, [1, 2], _lost)
    assert results == [[1] * 200_000, [2] * 200_000]


def test_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of the CLI's process: its workers stop at once (PR_SET_PDEATHSIG), so none goes
    on writing modules while an admin reruns the batch."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from shpc_lite.workers import map_forked

        def work(n):
            open(os.path.join({str(tmp_path)!r}, f"pid-{{n}}"), "w").write(str(os.getpid()))
            time.sleep(60)

        map_forked(work, [0, 1, 2], lambda s, r: None)
    """))
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        end = time.monotonic() + 30
        while len(list(tmp_path.glob("pid-*"))) < 3 and time.monotonic() < end:
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("pid-*"))]
        assert len(pids) == 3 and pids[0] == proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)
    end = time.monotonic() + 10
    while any(_running(p) for p in pids[1:]) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids[1:]), "a worker outlived its killed parent"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_shards_keep_a_name_in_one_process_and_balance_the_rest():
    entries = [Entry(f"n{i}", (f"{v}.0",)) for i in range(40) for v in range(1 + (i == 0) * 9)]
    parts = shards(entries, 2, minimum=4)
    assert len(parts) == 2 and sorted((e for p in parts for e in p), key=repr) == sorted(entries, key=repr)
    owner = {e.name: i for i, p in enumerate(parts) for e in p}
    assert all(owner[e.name] == i for i, p in enumerate(parts) for e in p)  # every version of a name together
    assert abs(len(parts[0]) - len(parts[1])) <= 9
    assert shards(entries, 2, minimum=40) == [entries]  # too small to be worth a fork
    assert len(shards(entries[:3], 8, minimum=1)) == 1  # never more shards than names


def test_batch_install_split_over_workers_reports_in_manifest_order(site, small_sif):
    """``batch_workers: 2``: the modules are written by two processes, the summary lists them in
    manifest order, an entry that fails is its own line, and the tree is the one a single
    process writes."""
    names = [f"w{i}" for i in range(6)]
    for name in names:
        site.write_recipe(name, f"name: {name}\nimage: docker.io/library/busybox\ndescription: {name}\nversions:\n  '1.0': '1.36'\n"
                                f"aliases:\n  {name}-sh: /bin/sh\n")
    listed = names[:3] + ["nosuchrecipe"] + names[3:]
    manifest = site.tmp / "site.yaml"
    manifest.write_text("modules:\n" + "".join(f"  - name: {n}\n    sif: {small_sif}\n" for n in listed))
    trees = []
    for workers in (2, 1):
        root = site.tmp / f"root-{workers}"
        proc = site.cli("--root", str(root), "--set", f"batch_workers={workers}", "batch", "install", str(manifest))
        assert proc.returncode == 1, proc.stdout + proc.stderr  # the unknown recipe
        rows = [line.split()[0] for line in proc.stdout.splitlines()[1:-1]]
        assert rows == [f"{n}/1.0" for n in names[:3]] + ["nosuchrecipe"] + [f"{n}/1.0" for n in names[3:]], rows
        assert "unknown recipe 'nosuchrecipe'" in proc.stdout and "1 failed, 6 installed" in proc.stdout
        trees.append({str(p.relative_to(root)): p.read_bytes().replace(str(root).encode(), b"<root>")
                      for top in ("modules", "wrappers") for p in sorted((root / top).rglob("*")) if p.is_file()})
    assert trees[0] == trees[1] and len([k for k in trees[0] if k.endswith(".lua") and "/." not in k]) == 6


def test_batch_sync_split_over_workers_removes_only_what_the_manifest_dropped(site, small_sif):
    """``batch sync`` with two workers: what the manifest no longer lists is uninstalled, what
    it lists stays, and an entry that cannot be planned (its recipe broke) keeps its modules."""
    names = [f"s{i}" for i in range(6)]
    for name in names:
        site.write_recipe(name, f"name: {name}\nimage: docker.io/library/busybox\ndescription: {name}\n"
                                f"versions:\n  '1.0': '1.36'\naliases:\n  {name}-sh: /bin/sh\n")
    manifest = site.tmp / "site.yaml"
    flags = ("--set", "batch_workers=2")
    manifest.write_text("modules:\n" + "".join(f"  - name: {n}\n    sif: {small_sif}\n" for n in names))
    site.cli(*flags, "batch", "install", str(manifest), check=True)
    site.write_recipe("s5", "name: s5\nimage: [broken\n")  # s5's entry now fails to plan
    manifest.write_text("modules:\n" + "".join(f"  - name: {n}\n    sif: {small_sif}\n" for n in names[2:]))
    proc = site.cli(*flags, "batch", "sync", str(manifest), "--yes")
    assert proc.returncode == 1 and "s5" in proc.stdout  # the broken recipe, in one line
    left = sorted(p.parent.name for p in (site.root / "modules").glob("*/1.0.lua"))
    assert left == names[2:], proc.stdout  # s0, s1 removed; s5 kept although it failed
    assert "2 removed" in proc.stdout and "3 unchanged" in proc.stdout


def test_auto_workers_follow_the_cores_but_never_exceed_jobs(monkeypatch, tmp_path):
    """Without ``batch_workers``: one worker per usable core, at most ``--jobs`` of them (an
    admin's ``--jobs 1`` still means one pull at a time); set, it is taken as given."""
    from shpc_lite import site, workers
    from shpc_lite.config import load_config

    seen = []
    monkeypatch.setattr(workers, "usable_cores", lambda: 4)
    monkeypatch.setattr(workers, "map_forked", lambda fn, parts, lost: seen.append(len(parts)) or [[] for _ in parts])
    entries = [Entry(f"n{i}") for i in range(100)]
    alone = {"SHPC_LITE_SYSTEM_CONFIG": "/nonexistent", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}  # no config files
    auto = load_config({"root": str(tmp_path)}, environ=alone)
    for jobs in (1, 2, 8):
        site.install(auto, entries, jobs=jobs)
    site.install(load_config({"root": str(tmp_path), "batch_workers": 3}, environ=alone), entries, jobs=1)
    assert seen == [1, 2, 4, 3]


def _on_a_terminal(argv: list, env: dict, timeout: float = 300) -> tuple:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal, as from an admin's shell:
    ``(everything it wrote, exit status)``."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen(argv, env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        os.close(master)
    return b"".join(chunks).decode(errors="replace"), proc.returncode


def test_on_a_terminal_workers_log_plain_lines_where_one_process_draws_bars(site, registry, unique_repo):
    """One process on a terminal draws a progress bar per pull; worker processes share that
    terminal, so bars would overwrite each other: each worker logs its pulls as plain lines."""
    import re

    for name in ("pa", "pb"):
        image = it.make_image([it.make_layer([it.Dir("usr"), it.Dir("usr/bin"),
                                              it.File("usr/bin/tool", f"#!/bin/sh\necho {name}\n", 0o755)], "gzip")])
        registry.pusher().push_image(f"{unique_repo}-{name}", image, tags=["1.0"])
        image_recipe(site, name, f"{registry.host}/{unique_repo}-{name}", {"1.0": "1.0"})
    manifest = site.tmp / "site.yaml"
    manifest.write_text("modules:\n  - pa:1.0\n  - pb:1.0\n")
    out = {}
    for workers in (1, 2):
        argv = [sys.executable, "-m", "shpc_lite", "--root", str(site.tmp / f"root-{workers}"), "--set", "puller=builtin",
                "--set", f"batch_workers={workers}", "batch", "install", str(manifest)]
        text, status = _on_a_terminal(argv, site.env)
        assert status == 0, text
        out[workers] = text.replace("\r\n", "\n")  # the terminal's own line ends
    bar = re.compile(r"\d+%\|")  # tqdm's bar: "100%|####|"
    assert bar.search(out[1]) and "\r" in out[1], repr(out[1])
    assert not bar.search(out[2]) and "\r" not in out[2], out[2]
    for name in ("pa", "pb"):
        assert re.search(rf"^shpc-lite: pulling \S*{unique_repo}-{name}\S*: 1 layers", out[2], re.M), out[2]
        assert f"{name}/1.0" in out[2]
