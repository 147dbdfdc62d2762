"""Issue 5: a user without write access to the central tree keeps a private one beside it.

Runs shpc-lite (installed from its wheel into a venv) as a real unprivileged user created by the
test; Lmod shows both trees. The runtime would be the recording stand-in; nothing here execs it.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import imagetools as it
from tests.modsys import LMOD_INIT, have
from tests.needs import requires

USER = "shpcuser"

pytestmark = [
    requires(os.geteuid() == 0, reason="needs root to create an unprivileged user"),
    requires(shutil.which("useradd") and shutil.which("runuser"), reason="no useradd/runuser"),
    requires(have("lmod"), reason="Debian lmod not installed"),
]


@pytest.fixture(scope="module")
def user():
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True, timeout=60)
    entry = pwd.getpwnam(USER)
    yield entry
    subprocess.run(["userdel", "--remove", USER], capture_output=True, timeout=60)


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_user_tree_reuses_central_images(user, wheel_venv, registry, unique_repo):
    base = Path(tempfile.mkdtemp(prefix="shpc-central-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        central, recipes = base / "central", base / "recipes"
        recipes.mkdir()
        layer = it.make_layer([it.File("hello.txt", "hi\n")])
        image = it.make_image([layer])
        registry.pusher().push_image(unique_repo, image, tags=["1.0", "2.0"])
        (recipes / "hello.yaml").write_text(
            f"name: hello\nimage: {registry.host}/{unique_repo}\ndescription: hello\n"
            "versions:\n  '1.0': '1.0'\n  '2.0': '2.0'\naliases:\n  hello: cat /hello.txt\n")
        system_config = base / "system.yaml"
        system_config.write_text(f"root: {central}\nregistry: [{recipes}]\npuller: builtin\n")
        env = {"PATH": f"{wheel_venv}/bin:/usr/bin:/bin", "SHPC_LITE_SYSTEM_CONFIG": str(system_config),
               "LANG": "C.UTF-8"}
        # the admin installs 1.0 centrally
        admin = subprocess.run(["shpc-lite", "install", "hello:1.0"], env={**env, "HOME": "/root"},
                               capture_output=True, text=True, timeout=300)
        assert admin.returncode == 0, admin.stderr
        central_sif = next((central / "containers").glob("*.sif"))
        for d in [central, *central.rglob("*")]:
            d.chmod(0o755 if d.is_dir() else 0o644 if not os.access(d, os.X_OK) else 0o755)
        before = _snapshot(central)

        def as_user(*args, check=True):
            cmd = ["runuser", "-u", USER, "--", "env", *(f"{k}={v}" for k, v in env.items()),
                   f"HOME={user.pw_dir}", *args]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd="/tmp")
            if check:
                assert proc.returncode == 0, proc.stderr
            return proc

        # without --user the central tree refuses them, with one clear line and nothing written
        denied = as_user("shpc-lite", "install", "hello:2.0", check=False)
        assert denied.returncode != 0 and len(denied.stderr.strip().splitlines()) == 1, denied.stderr
        # their own install of 2.0 (same image digest) reuses the central SIF: no download, no copy
        as_user("shpc-lite", "--user", "install", "hello:2.0")
        user_root = Path(user.pw_dir) / ".local/share/shpc-lite"
        modulefile = (user_root / "modules/hello/2.0.lua").read_text()
        assert str(central_sif) in modulefile
        assert not list(user_root.glob("containers/*.sif"))
        assert not (user_root / "cache" / "blobs").exists()
        assert _snapshot(central) == before  # nothing of theirs in the central tree
        # both trees visible in real Lmod; `shpc-lite use` prints the lines
        use_lines = as_user("shpc-lite", "--user", "use").stdout
        assert f"module use '{central}/modules'" in use_lines and str(user_root) in use_lines
        script = f". {LMOD_INIT}\n{use_lines}\nmodule --redirect avail 2>&1\nmodule load hello\nmodule list 2>&1"
        avail = as_user("bash", "--noprofile", "--norc", "-c", script).stdout
        assert str(central / "modules") in avail and str(user_root / "modules") in avail
        assert "hello/1.0" in avail and "hello/2.0" in avail
        assert "hello/2.0" in avail.split("Currently Loaded")[-1]
        # the admins remove 1.0: its image goes with it, and the user's doctor says what broke
        admin = subprocess.run(["shpc-lite", "uninstall", "hello:1.0"], env={**env, "HOME": "/root"},
                               capture_output=True, text=True, timeout=300)
        assert admin.returncode == 0 and not central_sif.exists(), admin.stderr
        doctor = as_user("shpc-lite", "--user", "doctor", "--offline", "--json", check=False)
        images = next(f for f in json.loads(doctor.stdout) if f["check"] == "images")
        assert doctor.returncode == 1 and images["level"] == "error" and "hello:2.0" in images["detail"]
        assert "shpc-lite --user install" in images["fix"]
        as_user("shpc-lite", "--user", "install", "hello:2.0")  # the fix: now from their own store
        assert [p.name for p in (user_root / "containers").glob("*.sif")] == [central_sif.name]
        doctor = as_user("shpc-lite", "--user", "doctor", "--offline", "--json", check=False)
        assert next(f for f in json.loads(doctor.stdout) if f["check"] == "images")["level"] == "ok"
    finally:
        shutil.rmtree(base, ignore_errors=True)
