"""The whole path with a container that really runs: an image built by the test (a static
busybox) is pushed to the real local registry, installed with the builtin puller, loaded with
real Lmod, and its aliases run inside the image.

`singularity` is tests/runtime_chrun.sh (Apptainer is not packaged for Debian 12): it mounts the
SIF's partition with squashfuse and runs the command with Charliecloud's ch-run. Everything
before that exec is shpc-lite's own output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


from tests import imagetools as it
from tests.imagetools import image_recipe
from tests.modsys import have, run_bash
from tests.needs import requires

BUSYBOX = Path("/bin/busybox")
pytestmark = [
    requires((shutil.which("ch-run") and shutil.which("squashfuse")),
                       reason="Charliecloud (ch-run) or squashfuse not installed (.ci/run installs them)"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (.ci/run installs it)"),
    requires(os.geteuid() == 0 and os.path.exists("/dev/fuse"), reason="squashfuse needs root and /dev/fuse"),
    requires(have("lmod"), reason="Debian lmod not installed"),
    requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed"),
]


def busybox_image():
    """A static busybox with the dirs the transparency checks bind to (/home, /mnt/cfg, /srv/recipe)."""
    base = it.make_layer([
        *(it.Dir(d) for d in ("bin", "dev", "proc", "sys", "home", "etc", "mnt", "mnt/cfg", "srv", "srv/recipe")),
        it.Dir("tmp", 0o1777),
        it.File("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        *(it.Symlink(f"bin/{tool}", "busybox")
          for tool in ("sh", "cat", "echo", "printf", "ls", "kill", "sleep", "pwd", "env", "id", "sha256sum")),
        it.File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), it.File("etc/group", "root:x:0:\n"),
        it.File("etc/motd", "old motd\n"),
    ], "gzip")
    top = it.make_layer([it.File("etc/motd", "hello from inside the image\n")], "zstd")
    return it.make_image([base, top], env=["PATH=/bin"])


def test_loaded_module_runs_commands_inside_the_image(site, registry, unique_repo):
    registry.pusher().push_image(unique_repo, busybox_image(), tags=["1.0"])
    image_recipe(site, "tiny", f"{registry.host}/{unique_repo}", {"1.0": "1.0"})
    site.write_recipe("tiny", (site.recipes / "tiny.yaml").read_text().replace(
        "aliases:\n", "aliases:\n  motd: cat /etc/motd\n  bsh: /bin/sh\nenv:\n  GREETING: 'hi \"there\" $HOME'\n"))
    for name in ("singularity", "apptainer"):
        shutil.copy(Path(__file__).parent / "runtime_chrun.sh", site.bin / name)
    site.cli("install", "tiny:1.0", check=True)
    proc = run_bash("lmod", f"""
        module use {site.root / 'modules'}
        module load tiny
        motd
        bsh -c 'printf "%s|" "$GREETING" "$#" "$@"; echo' bsh 'two words' '' '$(id)'
        """, site.env, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert out.splitlines() == ["hello from inside the image",  # the top layer's file, not the base's
                                'hi "there" $HOME|3|two words||$(id)|']
