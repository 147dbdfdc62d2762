"""The Charliecloud runtime kind, for real: the stored SIF's squashfs is mounted with squashfuse at
its offset and the command runs under ch-run (Debian charliecloud-runtime), loaded through real
Lmod. Nothing is stood in: the wrapper shpc-lite generated calls the real ch-run."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.modsys import have, run_bash
from tests.needs import requires
from tests.test_container_runs import BUSYBOX, busybox_image
from tests.test_install_pull import _recipe

pytestmark = [
    requires(shutil.which("ch-run") and shutil.which("squashfuse") and shutil.which("flock"),
             reason="Charliecloud (ch-run), squashfuse or flock not installed (.ci/run installs them)"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (.ci/run installs it)"),
    requires(os.geteuid() == 0 and os.path.exists("/dev/fuse"), reason="squashfuse needs root and /dev/fuse"),
    requires(have("lmod"), reason="Debian lmod not installed"),
]


def _mounts(site) -> list[str]:
    base = str(site.tmp / "mounts")
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(base)]


def _installed(site, registry, unique_repo) -> dict:
    registry.pusher().push_image(unique_repo, busybox_image(), tags=["1.0"])
    _recipe(site, "tiny", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    site.write_recipe("tiny", (site.recipes / "tiny.yaml").read_text().replace(
        "aliases:\n", "aliases:\n  motd: cat /etc/motd\n  bsh: /bin/sh\nenv:\n  GREETING: 'hi \"there\" $HOME'\n"))
    env = {**site.env, "SHPC_LITE_RUNTIME": "ch-run", "SHPC_LITE_MOUNT_DIR": str(site.tmp / "mounts"),
           "SHPC_LITE_MOUNT_LINGER": "0.2"}
    site.env.update(env)
    site.cli("install", "tiny:1.0", check=True)
    return env


def test_charliecloud_runs_the_sif_with_cwd_env_and_status(site, registry, unique_repo, tmp_path):
    env = _installed(site, registry, unique_repo)
    work = tmp_path / "work dir"
    work.mkdir()
    (work / "data.txt").write_text("from the host\n")
    proc = run_bash("lmod", f"""
        module use {site.root / 'modules'}
        module load tiny
        cd {str(work)!r}
        motd
        bsh -c 'pwd; cat data.txt; printf "%s|" "$GREETING" "$PATH" "$#" "$@"; echo' bsh 'two words' '' '$(id)'
        bsh -c 'exit 42'; echo "status $?"
        """, env, timeout=120)
    out = proc.stdout.decode().splitlines()
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert out == ["hello from inside the image", str(work), "from the host",
                   'hi "there" $HOME|/bin|3|two words||$(id)|', "status 42"]
    deadline = time.monotonic() + 10
    while _mounts(site) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _mounts(site) == []  # the last call ended: the reaper unmounted


def test_concurrent_calls_share_one_mount(site, registry, unique_repo):
    env = _installed(site, registry, unique_repo)
    wrapper = site.root / "wrappers" / "tiny" / "1.0" / "bin" / "bsh"
    procs = [subprocess.Popen([str(wrapper), "-c", "sleep 1; cat /etc/motd"], env=env, stdout=subprocess.PIPE, cwd=site.tmp,
                              stderr=subprocess.PIPE)
             for _ in range(20)]
    time.sleep(0.5)
    during = _mounts(site)
    results = [p.communicate(timeout=60) for p in procs]
    outs = [r[0] for r in results]
    assert all(p.returncode == 0 for p in procs), [r[1] for r in results]
    assert all(p.returncode == 0 for p in procs)
    assert set(outs) == {b"hello from inside the image\n"}
    assert len(during) == 1
    deadline = time.monotonic() + 10
    while _mounts(site) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _mounts(site) == []
