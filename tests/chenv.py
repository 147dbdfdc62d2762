"""The environment of an isolated shpc-lite install that runs containers with real Charliecloud
(ch-run on the SIF mounted by squashfuse), shared by the tests that run commands in a container."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def charliecloud_env(top: Path, recipes: Path, *, home: Path, mounts: Path, bin_dir: Path | None = None,
                     **extra: str) -> dict[str, str]:
    """Root, config dirs and recipes under ``top``; the builtin puller; ``ch-run`` as the runtime
    (``SHPC_LITE_RUNTIME`` in ``extra`` replaces it); mounts under ``mounts``, released 0.2 s after
    the last call. ``extra`` adds or overrides variables."""
    path = f"{os.environ['PATH']}:/usr/sbin:/sbin"
    return {
        "PATH": f"{bin_dir}:{path}" if bin_dir else path,
        "HOME": str(home),
        "USER": "root",
        "XDG_CONFIG_HOME": str(top / "xdg-config"),
        "XDG_DATA_HOME": str(top / "xdg-data"),
        "SHPC_LITE_SYSTEM_CONFIG": str(top / "etc-config.yaml"),
        "SHPC_LITE_ROOT": str(top / "root"),
        "SHPC_LITE_REGISTRY": str(recipes),
        "SHPC_LITE_PULLER": "builtin",
        "SHPC_LITE_RUNTIME": "ch-run",
        "SHPC_LITE_MOUNT_DIR": str(mounts),
        "SHPC_LITE_MOUNT_LINGER": "0.2",
        "SHPC_LITE_TEST_STANDIN_MNT": str(mounts),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
        **extra,
    }


def release_mounts(base: Path) -> None:
    """Unmount (lazily) every squashfuse mount a test left below ``base``."""
    import subprocess

    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split()[1].startswith(str(base)):
            subprocess.run(["fusermount3", "-u", "-z", line.split()[1]], capture_output=True, timeout=30)
