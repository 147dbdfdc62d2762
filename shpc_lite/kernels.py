"""Jupyter kernelspecs that run a module's Python inside its container.

A kernelspec is a directory holding ``kernel.json``; Jupyter runs its ``argv``. Ours runs
``python -m ipykernel_launcher -f {connection_file}`` through the module's wrapper (its ``python``
alias, else ``python3`` through its ``<name>-exec``), so the kernel starts in the container
exactly as the alias does: the runtime, binds and the GPU flag are the wrapper's, decided at run
time. The JSON is made by ``json.dumps`` from a dict, so a display name is only ever text.

Where kernelspecs go: ``--user`` (the default) is Jupyter's user data dir, ``--prefix DIR`` is
``DIR/share/jupyter/kernels`` (as ``jupyter kernelspec install --prefix``); a recipe with
``jupyter: true`` carries one in the module's own tree (shpc_lite.modules.write_module), put on
``JUPYTER_PATH`` by the modulefile. Only kernelspecs that name shpc-lite in their metadata are
listed, replaced or removed: a user's other kernels are never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from shpc_lite.errors import EnvError
from shpc_lite.fsutil import atomic_write
from shpc_lite.layout import KERNELS, kernel_dir

if TYPE_CHECKING:
    from shpc_lite.config import Config
    from shpc_lite.modules import ModuleSpec

# jupyter_client accepts [a-z0-9._-] (it folds case); we ask for lower case and a plain first
# character, so the name is also one safe path component.
KERNEL_NAME = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,63}\Z")
OWNER = "shpc-lite"  # the metadata key that marks a kernelspec as ours
SPEC_FILE = "kernel.json"


@dataclass(frozen=True)
class Kernel:
    name: str
    display_name: str
    argv: tuple[str, ...]
    module: str  # name/version of the module whose container runs it

    def to_json(self) -> str:
        return json.dumps({
            "argv": list(self.argv),
            "display_name": self.display_name,
            "language": "python",
            "interrupt_mode": "signal",  # SIGINT reaches the kernel through the wrapper's exec
            "metadata": {OWNER: {"module": self.module}},
        }, indent=1) + "\n"


@dataclass(frozen=True)
class FoundKernel:
    name: str
    display_name: str
    module: str
    path: str


def check_name(name: str) -> str:
    if not isinstance(name, str) or not KERNEL_NAME.fullmatch(name):
        raise EnvError(f"invalid kernel name {str(name)[:80]!r} (allowed: lower-case letters, digits and . _ -)")
    return name


def default_name(name: str, version: str) -> str:
    return check_name(re.sub(r"[^a-z0-9._-]", "-", f"{name}-{version}".lower()))


def default_display_name(module: str) -> str:
    return f"Python ({module}, container)"


def python_argv(wrapper_bin: Path, name: str, commands: Sequence[str]) -> tuple[str, ...]:
    """How to start the module's Python on the host: its ``python`` alias wrapper, else
    ``python3`` in the container through the module's generic exec wrapper."""
    if "python" in commands:
        return (str(Path(wrapper_bin) / "python"),)
    return (str(Path(wrapper_bin) / f"{name}-exec"), "python3")


def launcher_argv(python: Sequence[str]) -> tuple[str, ...]:
    return (*python, "-m", "ipykernel_launcher", "-f", "{connection_file}")


def make_kernel(wrapper_bin: Path, name: str, version: str, commands: Sequence[str],
                kernel_name: Optional[str] = None, display_name: Optional[str] = None) -> Kernel:
    """The kernelspec of installed module ``name/version`` (its wrappers in ``wrapper_bin``)."""
    module = f"{name}/{version}"
    return Kernel(check_name(kernel_name) if kernel_name is not None else default_name(name, version),
                  display_name if display_name is not None else default_display_name(module),
                  launcher_argv(python_argv(wrapper_bin, name, commands)), module)


def module_kernel(spec: "ModuleSpec") -> Kernel:
    """The kernelspec a ``jupyter: true`` module carries (written with its wrappers)."""
    return make_kernel(Path(spec.wrapper_dir), spec.name, spec.version, spec.commands)


# ------------------------------------------------------------------------------ where they go

def jupyter_data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Jupyter's user data dir, as jupyter_core computes it on Linux."""
    if environ.get("JUPYTER_DATA_DIR"):
        return Path(environ["JUPYTER_DATA_DIR"]).expanduser()
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")) / "jupyter"


def kernels_dir(prefix: Optional[str], environ: Mapping[str, str] = os.environ) -> Path:
    """``--prefix DIR`` -> DIR/share/jupyter/kernels; otherwise (``--user``) the user's."""
    if prefix:
        return Path(os.path.abspath(os.path.expanduser(prefix))) / "share" / "jupyter" / KERNELS
    return jupyter_data_dir(environ) / KERNELS


# ------------------------------------------------------------------------------ files

def _owner(directory: Path) -> Optional[dict]:
    """The kernelspec's contents if it is one of ours (a real dir whose kernel.json names us)."""
    try:
        if directory.is_symlink() or not directory.is_dir():
            return None
        data = json.loads((directory / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    meta = data.get("metadata") if isinstance(data, dict) else None
    return data if isinstance(meta, dict) and isinstance(meta.get(OWNER), dict) else None


def write_kernelspec(kernels: Path, kernel: Kernel) -> Path:
    """Write ``kernels/<name>/kernel.json``, replaced in one rename (Jupyter lists a kernel dir only
    once it holds a kernel.json, so a new one is never seen half-made); an existing kernelspec of
    ours is replaced, anyone else's refused."""
    target = kernel_dir(kernels, check_name(kernel.name))
    if os.path.lexists(target) and _owner(target) is None:
        raise EnvError(f"{target} exists and is not a kernel shpc-lite wrote: refusing to replace it "
                       f"(choose another --name)")
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(target / SPEC_FILE, kernel.to_json(), 0o644)
    return target


def installed_kernels(kernels: Path) -> list[FoundKernel]:
    found = []
    try:
        names = sorted(os.listdir(kernels))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for name in names:
        if not KERNEL_NAME.fullmatch(name):
            continue
        data = _owner(Path(kernels) / name)
        if data is not None:
            found.append(FoundKernel(name, str(data.get("display_name", "")),
                                     str(data["metadata"][OWNER].get("module", "")), str(Path(kernels) / name)))
    return found


def remove_kernel(kernels: Path, name: str) -> Path:
    target = kernel_dir(kernels, check_name(name))
    if not os.path.lexists(target):
        raise EnvError(f"no kernel {name!r} in {kernels}")
    if _owner(target) is None:
        raise EnvError(f"{target} is not a kernel shpc-lite wrote: not removing it")
    shutil.rmtree(target)
    return target


# ------------------------------------------------------------------------------ install

def check_ipykernel(python: Sequence[str], module: str) -> None:
    """Run the container once: ``python -c 'import ipykernel'`` through the wrapper."""
    try:
        proc = subprocess.run([*python, "-c", "import ipykernel"], capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EnvError(f"{module}: cannot run the module's python to look for ipykernel: {err}") from None
    if proc.returncode == 0:
        return
    if "No module named" in proc.stderr and "ipykernel" in proc.stderr:
        raise EnvError(f"{module}: the image has no ipykernel (python -c 'import ipykernel' failed in the "
                       f"container); use an image with ipykernel, or --no-check to write the kernel anyway")
    last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    raise EnvError(f"{module}: could not run the module's python to look for ipykernel: {last} "
                   f"(--no-check writes the kernel without running it)")


def install_kernel(config: "Config", name: str, version: Optional[str], kernels: Path, *,
                   kernel_name: Optional[str] = None, display_name: Optional[str] = None,
                   check: bool = True) -> tuple[Kernel, Path]:
    """``kernel install``: the kernelspec of an installed module (this tree's, else the central
    one's), after running the container once to see that the image has ipykernel."""
    from shpc_lite.modules import locate

    layout, record = locate(config, name, version)
    wrapper_bin = layout.wrapper_bin(record.name, record.version)
    kernel = make_kernel(wrapper_bin, record.name, record.version, record.commands, kernel_name, display_name)
    if check:
        check_ipykernel(python_argv(wrapper_bin, record.name, record.commands), kernel.module)
    return kernel, write_kernelspec(kernels, kernel)
