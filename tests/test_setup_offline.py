"""The main job's offline part (scripts/offline-demo.sh, what scripts/setup.sh runs where Docker
Hub cannot be reached), for real: a busybox image written on the spot as an OCI archive, a recipe
in a temporary registry dir, ``install --from oci-archive:`` for Charliecloud, ``module load``
in real Lmod, and commands run inside the container by the real ch-run on a squashfuse mount.
Only the apt part of setup.sh is left out (.ci/run installs the same packages)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.modsys import have
from tests.needs import requires
from tests.test_container_runs import BUSYBOX

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    requires(all(shutil.which(t) for t in ("ch-run", "squashfuse", "fusermount3", "flock")),
             reason="Charliecloud (ch-run), squashfuse, fusermount3 or flock not installed (.ci/run installs them)"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (.ci/run installs it)"),
    requires(os.geteuid() == 0 and os.path.exists("/dev/fuse"), reason="squashfuse needs root and /dev/fuse"),
    requires(have("lmod"), reason="Debian lmod not installed"),
]


def test_offline_demo_ends_with_output_from_inside_the_image(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8", "USER": "root",
        "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"), "SHPC_LITE_SYSTEM_CONFIG": "/nonexistent",
    }
    proc = subprocess.run(["bash", str(REPO / "scripts/offline-demo.sh"), sys.executable, "-m", "shpc_lite"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    demo = re.match(r"wrote (/tmp/shpc-lite-demo\.\w+)/busybox-demo\.tar \(oci-archive, sha256:[0-9a-f]{64}\)$", out[0])
    assert demo, out
    demo_dir = demo.group(1)
    assert f"installed busybox-demo/1.0 -> {demo_dir}/root/modules/busybox-demo/1.0.lua" in out
    tail = out[out.index("$ os-release"):]
    assert tail[:2] == ["$ os-release", 'PRETTY_NAME="shpc-lite busybox demo"']  # the image's file, not the host's
    assert tail[-6:] == [
        "$ busybox-sh -c ...",
        "hello from inside the busybox demo image",  # /etc/motd of the image
        f"uname: {' '.join(os.uname()[i] for i in (0, 2, 4))}",  # the host's kernel, seen from inside
        f"pwd: {demo_dir}",  # the caller's directory at the same path
        "id: uid=0(root) gid=0(root)",  # the image's /etc/passwd names uid 0
        "env: set by the image; set by the recipe",  # image ENV and recipe env through --set-env
    ]
    # nothing left behind: the mount was released and the temporary directory removed
    assert not Path(demo_dir).exists()
    assert demo_dir not in Path("/proc/self/mounts").read_text()
    assert not (home / ".local/share/shpc-lite").exists()  # the user's own tree is not touched


def test_setup_runs_the_offline_demo_last_where_docker_hub_is_unreachable():
    """setup.sh's apt and pip steps are not run here; what it does offline is the demo above,
    as its last step (so its output ends with what the container printed)."""
    lines = [line.strip() for line in (REPO / "scripts/setup.sh").read_text().splitlines()]
    assert "bash scripts/system-packages.sh charliecloud-runtime squashfuse fuse3 busybox-static" in lines
    offline = lines[lines.index("else"):]
    assert offline[-2:] == ['bash scripts/offline-demo.sh "$exe"', "fi"]
