"""Shared fixtures. Fixtures of the real parts live in their own modules, registered here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.registry_fixture",
    "tests.slurm_fixture",
    "tests.pyimage",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(ok, reason): a real part the test needs (tests/needs.py)")


def pytest_runtest_setup(item):
    from tests.needs import check_requirements

    check_requirements(item)


@dataclass
class Site:
    """An isolated shpc-lite setup: its own root, config dirs, recipes dir and runtime stand-in."""

    tmp: Path
    root: Path
    recipes: Path
    bin: Path
    env: dict

    def cli(self, *args: str, check: bool = False, extra_env: dict | None = None, timeout: float = 300):
        """Run the real CLI (``python -m shpc_lite``) in a subprocess; returns CompletedProcess (text)."""
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", "shpc_lite", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"shpc-lite {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def files(self) -> set[str]:
        """Every file and dir below the root (to assert that nothing was written)."""
        if not self.root.exists():
            return set()
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")}

    def write_recipe(self, name: str, text: str) -> Path:
        path = self.recipes / f"{name}.yaml"
        path.write_text(text)
        return path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root = tmp_path / "root"
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("singularity", "apptainer"):
        shutil.copy(HERE / "runtime_standin.sh", bindir / name)
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
        "SHPC_LITE_SYSTEM_CONFIG": str(tmp_path / "etc-config.yaml"),
        "SHPC_LITE_ROOT": str(root),
        "SHPC_LITE_REGISTRY": str(recipes),
        # the runtime stand-ins on PATH cannot pull: use the builtin puller unless a test says so
        "SHPC_LITE_PULLER": "builtin",
        "SHPC_LITE_TEST_RECORD": str(tmp_path / "record"),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
    }
    return Site(tmp_path, root, recipes, bindir, env)


def read_record(site: Site) -> tuple[list[bytes], dict[bytes, bytes]]:
    """What the runtime stand-in saw: argv and environment, byte for byte."""
    base = Path(site.env["SHPC_LITE_TEST_RECORD"])
    argv = base.with_name(base.name + ".argv").read_bytes().split(b"\0")[:-1]
    env = {}
    for item in base.with_name(base.name + ".env").read_bytes().split(b"\0")[:-1]:
        key, _, value = item.partition(b"=")
        env[key] = value
    return argv, env


@pytest.fixture(scope="session")
def small_sif(tmp_path_factory) -> Path:
    """A real, small SIF: a squashfs made by mksquashfs wrapped by shpc-lite's SIF writer."""
    return make_small_sif(tmp_path_factory.mktemp("sif"), "hello from the image\n")


def make_small_sif(tmp: Path, hello: str) -> Path:
    """A small SIF whose image holds ``hello.txt`` (another text, another image digest)."""
    if not shutil.which("mksquashfs"):
        from tests.needs import missing

        missing("mksquashfs (squashfs-tools) is not installed")
    from shpc_lite.sif import build_container_sif

    rootfs = tmp / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "hello.txt").write_text(hello)
    squash = tmp / "fs.squashfs"
    subprocess.run(["mksquashfs", str(rootfs), str(squash), "-noappend", "-quiet", "-all-root"], check=True,
                   capture_output=True)
    sif = tmp / "small.sif"
    build_container_sif(sif, squash, deffile=b"bootstrap: localimage\nfrom: test\n", json_objects={}, arch="amd64")
    return sif


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    """A fresh venv with shpc-lite installed from its wheel (plain ``pip install``, not editable).

    Made from Debian's /usr/bin/python3 in a world-readable directory, so tests can also run it
    as an unprivileged user (the interpreter the suite runs with may live under /root).
    """
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="shpc-lite-venv-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        dist = tmp_path_factory.mktemp("dist")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(dist), str(REPO)], check=True, capture_output=True, timeout=300)
        wheel = next(dist.glob("shpc_lite-*.whl"))
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        venv = base / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        proc = subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"pip install of the wheel into a fresh venv failed:\n{proc.stderr[-2000:]}")
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)
