"""Install and uninstall: store the image, then generate the module; undo on any failure."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from shpc_lite.config import Config
from shpc_lite.modules import Installed, find_installed, installed, make_spec, remove_module, write_module
from shpc_lite.recipe import recipe_index
from shpc_lite.store import import_sif, unreferenced


def install_sif(config: Config, name: str, version: str, sif: Path) -> Installed:
    """``install NAME:VERSION --sif PATH``: the recipe must know the version (its tag is recorded)."""
    recipe = recipe_index(config).get(name)
    pin = recipe.version(version)
    paths = config.paths
    stored, created = import_sif(paths, sif, config)
    try:
        spec = make_spec(recipe, version, pin.tag, pin.digest or "", stored, paths, config)
        return write_module(spec, paths, config)
    except BaseException:
        if created:
            _drop_unused(config, [str(stored)])
        raise


def uninstall(config: Config, name: str, version: Optional[str] = None) -> list[Installed]:
    from shpc_lite import views

    paths = config.paths
    records = find_installed(paths, name, version)
    for record in records:
        remove_module(paths, record, config)
    _drop_unused(config, [r.sif for r in records])
    views.prune(paths, config)
    return records


def after_change(config: Config) -> Optional[str]:
    """Refresh indexes after the tree changed; returns the LMOD_RC line when a cache is kept."""
    from shpc_lite.index import refresh

    return refresh(config)


def _drop_unused(config: Config, sifs: list[str]) -> None:
    paths = config.paths
    for path in unreferenced(paths, sifs, (r.sif for r in installed(paths))):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


