"""Run real module commands (Lmod, Environment Modules) in a bash subprocess.

Lmod is Debian's ``lmod``; Environment Modules conflicts with it as a package, so .ci/run
unpacks it with ``dpkg-deb -x`` (default /opt/envmodules, or $SHPC_LITE_TEST_ENVMODULES) and
it runs through tclsh, as its own docs allow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
ENVMODULES = Path(os.environ.get("SHPC_LITE_TEST_ENVMODULES", "/opt/envmodules"))
MODULECMD_TCL = ENVMODULES / "usr/lib/x86_64-linux-gnu/modulecmd.tcl"


def have(system: str) -> bool:
    if system == "lmod":
        return LMOD_INIT.exists()
    return MODULECMD_TCL.exists() and shutil.which("tclsh8.6") is not None


def preamble(system: str) -> str:
    if system == "lmod":
        return f". {LMOD_INIT}\n"
    return (
        f'module() {{ eval "$(tclsh8.6 {MODULECMD_TCL} bash "$@")"; }}\n'
        f"export MODULESHOME={ENVMODULES}/usr/share/modules\n"
    )


def run_bash(
    system: str, script: str, env: dict, args: tuple[str, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run ``script`` (with positional ``args``) after initialising ``system``; output as bytes."""
    base = {
        "PATH": env.get("PATH", os.environ["PATH"]),
        "HOME": env.get("HOME", os.environ.get("HOME", "/root")),
        "LANG": "C.UTF-8",
        "LMOD_REDIRECT": "yes",
    }
    base.update(env)
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", preamble(system) + script, "bash", *args],
        env=base,
        capture_output=True,
        timeout=timeout,
    )
