"""A plain ``pip install`` of the wheel into a fresh venv: recipes and templates come along."""

from __future__ import annotations

import os
import subprocess


def test_wheel_cli_works_outside_the_checkout(wheel_venv, tmp_path, small_sif):
    venv = wheel_venv
    env = {
        "PATH": f"{venv}/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "SHPC_LITE_SYSTEM_CONFIG": str(tmp_path / "none.yaml"),
    }

    def run(*args):
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    where = run(f"{venv}/bin/python", "-c", "import shpc_lite, sys; print(shpc_lite.__file__)")
    assert where.startswith(str(venv)), where
    assert "pytorch" in run("shpc-lite", "list", "--available")
    run("shpc-lite", "install", "python:3.12", "--sif", str(small_sif))
    root = tmp_path / "data" / "shpc-lite"  # the XDG data dir, never site-packages
    assert (root / "modules" / "python" / "3.12.lua").read_text().startswith("-- python/3.12")
    assert os.access(root / "wrappers" / "python" / "3.12" / "bin" / "python", os.X_OK)
    assert "python/3.12" in run(f"{venv}/bin/python", "-m", "shpc_lite", "list")
    site_packages = next((venv / "lib").glob("python*/site-packages"))
    assert not any(p.suffix == ".sif" for p in site_packages.rglob("*"))
