"""Golden files: the exact modulefiles and wrappers generated for every built-in recipe.

A change to a template shows up here as a diff to review. Regenerate on purpose with
SHPC_LITE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

tests/data/hostile/hostile.yaml (braces, brackets, quotes, $, backticks, newlines in every text
field) is rendered too, into tests/golden/hostile/: how each context quotes it is reviewed there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shpc_lite.config import load_config
from shpc_lite.module_systems import LMOD, TCL
from shpc_lite.modules import make_spec, render, render_modulefile, render_wrapper
from shpc_lite.packages import Package
from shpc_lite.recipe import RecipeIndex
from shpc_lite.resources import builtin_registry

GOLDEN = Path(__file__).parent / "golden"
HOSTILE = Path(__file__).parent / "data" / "hostile"
NAMES = RecipeIndex([builtin_registry()]).names()
UPDATE = os.environ.get("SHPC_LITE_UPDATE_GOLDEN") == "1"


def _rendered(name: str, registry: Path) -> dict[str, str]:
    config = load_config({"root": "/srv/shpc-lite", "bind_paths": "/scratch"}, environ={})
    recipe = RecipeIndex([registry]).get(name)
    pin = recipe.versions[0]
    digest = "sha256:" + "0123456789abcdef" * 4
    sif = config.layout.containers / f"sha256-{'0123456789abcdef' * 4}.sif"
    # packages are found in the image at install; the golden files show how they are declared
    packages = (Package("numpy", "1.26.4"), Package("torch", "2.2.1")) if name in ("pytorch", "hostile") else ()
    spec = make_spec(recipe, pin.version, pin.tag, digest, sif, config.layout, config, packages=packages)
    out = {
        f"{pin.version}.lua": render_modulefile(spec, LMOD),
        f"{pin.version}.tcl": render_modulefile(spec, TCL),
        ".modulerc.lua": render("modulerc.lua.j2", name=name, default=pin.version, gpu_versions=[]),
        ".modulerc": render("modulerc.tcl.j2", name=name, default=pin.version,
                            gpu_versions=[pin.version] if spec.gpu != "none" else []),
    }
    out.update({f"bin/{w.name}": render_wrapper(spec, w) for w in spec.wrappers})
    return out


@pytest.mark.parametrize("name, registry", [*((n, builtin_registry()) for n in NAMES), ("hostile", HOSTILE)])
def test_golden(name, registry):
    assert {"python", "pytorch", "tensorflow", "ngc-pytorch", "ngc-tensorflow"} <= set(NAMES)
    for rel, text in _rendered(name, registry).items():
        path = GOLDEN / name / rel
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.read_text() == text, f"{path} differs from the rendered output"
