"""A real Python image for tests, built from this machine's Debian packages (no base image pulled).

The image is Debian 12's python3.11 as installed here: the files ``dpkg -L`` lists for the
interpreter, its standard library, ``venv``/``ensurepip`` and the wheels ensurepip installs from
(/usr/share/python-wheels), plus the shared libraries ``ldd`` names for the interpreter and its
extension modules, with the symlinks on the way kept (merged /usr: /lib -> usr/lib), and
busybox-static as /bin/sh (as tests/test_container_runs.py does). Optional extra layers:
``pip install --target`` of PyPI packages (ipykernel) into /usr/local/lib/python3.11/dist-packages,
and small files (an /etc/os-release naming the test image).

Layers are plain tars (uncompressed: quicker to build and to push to the loopback registry).
Built once per session by the ``python_images`` fixture (registered in tests/conftest.py); other
images (MPI) can reuse ``python_layer`` and add their own layers (``extra_layer``, ``pip_layer``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pytest

from tests import imagetools as it
from tests.needs import missing

PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11",
            "python3.11-venv", "python3-pip-whl", "python3-setuptools-whl")
INTERPRETER = "/usr/bin/python3.11"
SITE_DIR = "usr/local/lib/python3.11/dist-packages"  # on Debian python3.11's sys.path
SKIP = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/lintian/", "/usr/share/binfmts/")
SYSTEM_DIRS = ("dev", "proc", "sys", "home", "root", "run", "mnt", "srv", "opt", "var", "var/tmp",
               "etc", "usr/local/bin")
BUSYBOX = Path("/bin/busybox")
BUSYBOX_TOOLS = ("sh", "cat", "echo", "ls", "env", "id", "sleep", "kill", "test", "pwd")
OS_RELEASE = 'PRETTY_NAME="shpc-lite python test image"\nID=shpc-lite-pytest\n'


@dataclass(frozen=True)
class PythonImage:
    """What a test needs to know of a built image."""

    image: it.Image
    os_release: str = OS_RELEASE
    python: str = INTERPRETER


def available() -> bool:
    return Path(INTERPRETER).is_file() and BUSYBOX.is_file() and shutil.which("dpkg") is not None


def _package_paths(packages: Sequence[str]) -> list[str]:
    proc = subprocess.run(["dpkg", "-L", *packages], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        missing(f"dpkg -L {' '.join(packages)} failed (install them): {proc.stderr.strip()}")
    return [line for line in proc.stdout.splitlines() if line.startswith("/") and not line.startswith(SKIP)]


def _libraries(binaries: Iterable[str]) -> set[str]:
    """The shared libraries ``ldd`` resolves for each binary (the loader included)."""
    found: set[str] = set()
    for binary in binaries:
        proc = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=60)
        for line in proc.stdout.splitlines():
            words = line.split()
            if "=>" in words and words[words.index("=>") + 1].startswith("/"):
                found.add(words[words.index("=>") + 1])
            elif words and words[0].startswith("/"):
                found.add(words[0])
    return found


class _Tree:
    """A staging root: host paths are copied in with mtimes kept (so the stdlib's .pyc files
    stay valid) and every symlink on the way reproduced, so /lib/x/libc.so.6 lands as the
    /lib -> usr/lib link plus usr/lib/x/libc.so.6, as on the host."""

    def __init__(self, root: Path):
        self.root = root

    def add(self, host_path: str, depth: int = 0) -> None:
        if depth > 20:
            raise AssertionError(f"symlink loop at {host_path}")
        parts = Path(host_path).parts[1:]
        current = Path("/")
        for i, part in enumerate(parts):
            current = current / part
            target = self.root / current.relative_to("/")
            if current.is_symlink():
                if not os.path.lexists(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(current), target)
                rest = Path(*parts[i + 1:]) if i + 1 < len(parts) else None
                resolved = (current.parent / os.readlink(current))
                self.add(os.path.normpath(resolved / rest if rest else resolved), depth + 1)
                return
            if i == len(parts) - 1:
                if current.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                elif current.is_file() and not os.path.lexists(target):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(current, target)

    def add_tree(self, host_dir: str) -> None:
        """A directory with everything below it (for the stdlib's __pycache__ dirs)."""
        for dirpath, dirnames, filenames in os.walk(host_dir):
            for name in filenames:
                self.add(os.path.join(dirpath, name))


def _layer_of(stage: Path) -> it.Layer:
    return it.layer_from_tar(it.tar_directory("python-pax", stage), None)


def python_layer(work: Path) -> it.Layer:
    """Debian's python3.11 (stdlib, venv, ensurepip wheels), its libraries and busybox /bin/sh."""
    if not available():
        missing(f"{INTERPRETER}, busybox-static and dpkg are needed for the Python test image")
    stage = work / "python-root"
    tree = _Tree(stage)
    for d in SYSTEM_DIRS:
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").mkdir(mode=0o1777, exist_ok=True)
    os.chmod(stage / "tmp", 0o1777)
    paths = _package_paths(PACKAGES)
    for path in paths:
        tree.add(path)
    tree.add_tree("/usr/lib/python3.11")  # the __pycache__ dirs postinst compiled (not in dpkg -L)
    dynload = [str(p) for p in Path("/usr/lib/python3.11/lib-dynload").glob("*.so")]
    for lib in sorted(_libraries([INTERPRETER, *dynload])):
        tree.add(lib)
    tree.add(str(BUSYBOX))
    bindir = (stage / "bin").resolve()
    for tool in BUSYBOX_TOOLS:
        if not os.path.lexists(bindir / tool):
            os.symlink("busybox", bindir / tool)
    for name in ("python3", "python"):
        if not os.path.lexists(stage / "usr/bin" / name):
            os.symlink("python3.11", stage / "usr/bin" / name)
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\n")
    (stage / "etc/os-release").write_text(OS_RELEASE)
    return _layer_of(stage)


def pip_layer(work: Path, requirements: Sequence[str], name: str) -> it.Layer:
    """``pip install --target`` of PyPI packages into the image's site dir (uses the network, once)."""
    stage = work / f"{name}-root"
    target = stage / SITE_DIR
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--no-warn-script-location", "--only-binary=:all:", "--python-version", "3.11",
                           "--target", str(target), *requirements],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        missing(f"pip install --target {' '.join(requirements)} failed (needs PyPI): {proc.stderr[-500:]}")
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts with the host's shebang
    # the system libraries their extension modules need (librt, libstdc++: manylinux wheels
    # bundle only the others), from this machine, as for the interpreter
    tree = _Tree(stage)
    for lib in sorted(_libraries(str(p) for p in target.rglob("*.so*") if p.is_file())):
        if not lib.startswith(str(stage)):
            tree.add(lib)
    return _layer_of(stage)


def extra_layer(work: Path, name: str, files: dict[str, str]) -> it.Layer:
    """A layer of small text files (path in the image -> content)."""
    stage = work / f"{name}-root"
    for path, text in files.items():
        (stage / path).parent.mkdir(parents=True, exist_ok=True)
        (stage / path).write_text(text)
    return _layer_of(stage)


def python_image(layers: Sequence[it.Layer]) -> PythonImage:
    env = ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]
    return PythonImage(it.make_image(list(layers), env=env))


# ------------------------------------------------------------------------------ the fixture

@dataclass(frozen=True)
class PushedImages:
    """The Python images in the session's test registry (tag 3.11 each)."""

    ipykernel: str  # registry/repo of Python + ipykernel (and a package only in the image)
    bare: str  # registry/repo of Python alone
    os_release: str = OS_RELEASE


IMAGE_PKG = "shpc_image_pkg"  # a package only in the images: importable from a venv's python


@pytest.fixture(scope="session")
def python_images(registry, tmp_path_factory) -> PushedImages:
    """Build the layers once per session and push both images to the real test registry."""
    work = tmp_path_factory.mktemp("pyimage")
    base = python_layer(work)
    own = extra_layer(work, "own", {f"{SITE_DIR}/{IMAGE_PKG}/__init__.py": 'WHERE = "only in the image"\n'})
    ipk = pip_layer(work, ["ipykernel"], "ipykernel")
    pusher = registry.pusher()
    pusher.push_image("pytest/python-ipykernel", python_image([base, own, ipk]).image, tags=["3.11"])
    pusher.push_image("pytest/python-bare", python_image([base, own]).image, tags=["3.11"])
    return PushedImages(f"{registry.host}/pytest/python-ipykernel", f"{registry.host}/pytest/python-bare")
