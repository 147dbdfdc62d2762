"""Personal venvs on top of a container module: the venv on the host, its Python in the image.

``venv create PATH --module NAME[:VERSION]`` makes a module in this tree (default
``<name>-venv/<version>``) from the same model as the image's own module (``make_spec``), with:
PATH bound into the container at the same path, ``VIRTUAL_ENV`` set and PATH/bin first on the
container's PATH, and aliases ``python``/``python3`` (PATH/bin/python) plus every console script
found in PATH/bin (``pip`` among them). Then the venv itself is made in the container with
``python -m venv --system-site-packages PATH`` (the image's packages stay importable) and marked
as ours (``VENV_MARKER``). What users ``pip install`` lands in PATH on shared storage; running
``venv create`` again refreshes the module (new console scripts, the base module's current image)
without touching the venv.

The venv module holds a ref on the image it runs (shpc_lite.refs), so reinstalling or removing
the base module does not pull the image from under it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from shpc_lite.errors import EnvError, NotFoundError
from shpc_lite.fsutil import atomic_write
from shpc_lite.layout import Layout, component, venv_marker
from shpc_lite.recipe import SAFE_NAME, Alias, generated_commands, recipe_index

if TYPE_CHECKING:
    from shpc_lite.config import Config
    from shpc_lite.modules import Installed, ModuleSpec
    from shpc_lite.recipe import Recipe

DEFAULT_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# In PATH/bin but not commands of their own: the interpreters (the python aliases) and activate*.
_NOT_COMMANDS = re.compile(r"\A(python[0-9.]*|activate.*|Activate\.ps1)\Z")


def module_name(spec: Optional[str], base: "Installed") -> tuple[str, str]:
    """``--name NAME[/VERSION]`` (or ``NAME:VERSION``), defaulting to ``<name>-venv/<version>``."""
    if spec is None:
        return Layout.venv_module(base.name), base.version
    name, _, version = spec.replace(":", "/").partition("/")
    return component(name, "module name"), component(version or base.version, "version")


def _image_path(spec: "ModuleSpec") -> str:
    """The image's PATH (read from the SIF at install for kinds that run it), else Debian's."""
    env = dict(spec.image_env)
    if "PATH" not in env and Path(spec.sif).is_file():
        from shpc_lite.inspect import inspect_sif

        try:
            env = inspect_sif(spec.sif)["env"]
        except Exception:  # noqa: BLE001 - an unreadable image keeps the default PATH
            env = {}
    return env.get("PATH") or DEFAULT_IMAGE_PATH


def entry_points(venv: Path) -> list[str]:
    """Console scripts in PATH/bin as they are now (``pip`` among them)."""
    try:
        names = sorted(os.listdir(venv / "bin"))
    except OSError:
        return []
    return [n for n in names if SAFE_NAME.match(n) and not _NOT_COMMANDS.match(n)
            and os.access(venv / "bin" / n, os.X_OK) and (venv / "bin" / n).is_file()]


def venv_spec(config: "Config", recipe: "Recipe", base: "Installed", name: str, version: str,
              venv: Path) -> "ModuleSpec":
    """The venv module: the base module's spec, renamed, with the venv bound and active."""
    from shpc_lite.modules import make_spec

    layout = config.layout
    spec = make_spec(recipe, base.version, base.tag, base.digest, Path(base.sif), layout, config)
    bindir = str(venv / "bin")
    aliases = {a.name: a for a in recipe.aliases}
    for cmd in ("python", "python3"):
        aliases[cmd] = Alias(cmd, (f"{bindir}/python",))
    for cmd in entry_points(venv):
        aliases[cmd] = Alias(cmd, (f"{bindir}/{cmd}",))
    for cmd in generated_commands(name):
        aliases.pop(cmd, None)
    env = dict(spec.env)
    env.update({"VIRTUAL_ENV": str(venv), "PATH": f"{bindir}:{_image_path(spec)}"})
    return dataclasses.replace(
        spec, name=name, version=version, wrapper_dir=str(layout.wrapper_bin(name, version)),
        description=f"Personal venv {venv} with the Python of {base.name}/{base.version}",
        aliases=tuple(aliases[k] for k in sorted(aliases)), env=tuple(env.items()),
        host_paths=(str(venv),), venv=str(venv), base=f"{base.name}/{base.version}",
        jupyter_path="", packages=(), keywords=("venv",))


def _marker(venv: Path) -> Optional[dict]:
    try:
        data = json.loads(venv_marker(venv).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _base_python(recipe: "Recipe") -> tuple[str, ...]:
    """The base module's Python inside the container: its ``python`` alias's argv, else python3."""
    for alias in recipe.aliases:
        if alias.name == "python":
            return alias.argv
    return ("python3",)


def create(config: "Config", path: str, name: str, version: Optional[str],
           module: Optional[str] = None) -> "Installed":
    from shpc_lite import refs
    from shpc_lite.install import drop_unused, hold_image
    from shpc_lite.modules import find_installed, locate, remove_module, write_module

    layout = config.layout
    venv = Path(os.path.abspath(os.path.expanduser(path)))
    _, base = locate(config, name, version)
    vname, vversion = module_name(module, base)
    try:
        previous = find_installed(layout, vname, vversion)[0]
    except NotFoundError:
        previous = None
    if previous is not None and previous.venv != str(venv):
        raise EnvError(f"module {vname}/{vversion} exists and is not the venv {venv} "
                       f"({previous.venv or 'an image module'}): choose another --name")
    ours = _marker(venv) is not None
    if not ours and venv.exists() and (not venv.is_dir() or any(venv.iterdir())):
        raise EnvError(f"{venv} exists and is not a venv shpc-lite created: give a new or empty directory")
    if not hold_image(config, Path(base.sif), vname, vversion):
        raise EnvError(f"{base.name}/{base.version}: its image {base.sif} is gone; reinstall the module")
    recipe = recipe_index(config).get(base.name)
    spec = venv_spec(config, recipe, base, vname, vversion, venv)
    made = not venv.exists()
    try:
        record = write_module(spec, layout, config)
        if not ours:
            venv.mkdir(parents=True, exist_ok=True)
            _make_venv(layout, spec, _base_python(recipe), venv)
            atomic_write(venv_marker(venv), json.dumps(
                {"created_by": "shpc-lite", "module": spec.module, "root": str(layout.root), "base": spec.base},
                indent=1) + "\n")
            spec = venv_spec(config, recipe, base, vname, vversion, venv)  # now with the venv's console scripts
            record = write_module(spec, layout, config)
    except BaseException:
        if previous is None:
            try:
                remove_module(layout, find_installed(layout, vname, vversion)[0], config)
            except NotFoundError:
                pass
            refs.drop(layout, Path(base.sif), vname, vversion)
        if made:
            shutil.rmtree(venv, ignore_errors=True)
        elif not ours:  # it was empty: what is in it now is ours
            for child in venv.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
    if previous is not None and previous.sif != base.sif:
        refs.drop(layout, Path(previous.sif), vname, vversion)
        drop_unused(config, [previous.sif])
    return record


def _make_venv(layout: Layout, spec: "ModuleSpec", python: tuple[str, ...], venv: Path) -> None:
    """``python -m venv --system-site-packages PATH`` in the container, through the venv
    module's own exec wrapper (which binds PATH); run from PATH's parent, which the container
    sees as PATH is."""
    exec_wrapper = layout.wrapper_bin(spec.name, spec.version) / f"{spec.name}-exec"
    try:
        proc = subprocess.run([str(exec_wrapper), *python, "-m", "venv", "--system-site-packages", str(venv)],
                              capture_output=True, text=True, timeout=600, cwd=str(venv.parent),
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EnvError(f"{venv}: cannot run python -m venv in {spec.base}'s container: {err}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EnvError(f"{venv}: python -m venv failed in {spec.base}'s container: {last}")


def venvs(layout: Layout) -> list["Installed"]:
    from shpc_lite.modules import installed

    return [r for r in installed(layout) if r.venv]


def remove(config: "Config", name: str, version: Optional[str], delete: bool = False) -> list["Installed"]:
    """Remove venv modules; with ``delete`` also their venvs, each only if its marker says this
    tree's module made it (checked for all before anything is removed)."""
    from shpc_lite import refs
    from shpc_lite.install import drop_unused
    from shpc_lite.modules import find_installed, remove_module

    layout = config.layout
    records = [r for r in find_installed(layout, name, version) if r.venv]
    if not records:
        raise EnvError(f"{name}{':' + version if version else ''} is not a venv module in {layout.root}")
    if delete:
        for record in records:
            venv = Path(record.venv)
            marker = _marker(venv)
            if venv.is_symlink() or marker is None or marker.get("module") != f"{record.name}/{record.version}" \
                    or marker.get("root") != str(layout.root):
                raise EnvError(f"{venv} is not a venv this module created (no matching {venv_marker(venv).name}): "
                               f"not deleting it")
    for record in records:
        remove_module(layout, record, config)
        refs.drop(layout, Path(record.sif), record.name, record.version)
        if delete:
            shutil.rmtree(record.venv)
    drop_unused(config, [r.sif for r in records])
    return records
