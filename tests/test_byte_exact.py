"""Property: arbitrary arguments and recipe env values reach the container byte-exact, through
the wrapper alone (under dash) and through the loaded module (Lmod and Environment Modules).

The runtime is the recording stand-in (tests/runtime_standin.sh); everything before it is real.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shpc_lite.config import load_config
from shpc_lite.modules import make_spec, write_module
from shpc_lite.recipe import recipe_from_dict
from tests.conftest import read_record
from tests.modsys import run_bash
from tests.needs import need_system

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=30)
ARGS = st.lists(TEXT, max_size=5)
SYSTEMS = ("lmod", "tcl")


def _generate(site, system: str, env_value: str, description: str) -> str:
    data = {
        "name": "demo",
        "image": "docker.io/library/demo",
        "description": description or "x",
        "versions": {"1.0": "1.0"},
        "aliases": {"demo-cmd": ["/opt/bin/tool", "fixed arg"]},
        "env": {"DEMO_VALUE": env_value},
    }
    # through YAML, as a recipe file would carry it
    recipe = recipe_from_dict(yaml.safe_load(yaml.safe_dump(data, allow_unicode=True)), "demo.yaml")
    config = load_config({"root": str(site.root), "module_system": system}, environ={})
    sif = site.root / "containers" / "x.sif"
    spec = make_spec(recipe, "1.0", "1.0", "", sif, config.layout, config)
    write_module(spec, config.layout, config)
    return spec.wrapper_dir


def _check(site, args, env_value, sif):
    argv, env = read_record(site)
    assert argv == [b"exec", str(sif).encode(), b"/opt/bin/tool", b"fixed arg", *(a.encode() for a in args)]
    assert env[b"SINGULARITYENV_DEMO_VALUE"] == env_value.encode()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS, env_value=TEXT)
def test_wrapper_under_dash_is_byte_exact(site, args, env_value):
    wrapper_dir = _generate(site, "lmod", env_value, "d")
    subprocess.run(["dash", f"{wrapper_dir}/demo-cmd", *args], env=site.env, check=True, timeout=20)
    _check(site, args, env_value, site.root / "containers" / "x.sif")


@pytest.fixture
def systems() -> tuple[str, ...]:
    """Both module systems: a missing one skips, or fails on CI (CI=true)."""
    for system in SYSTEMS:
        need_system(system)
    return SYSTEMS


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS, env_value=TEXT, description=TEXT)
def test_through_loaded_module_is_byte_exact(site, systems, args, env_value, description):
    for system in systems:
        _generate(site, system, env_value, description)
        proc = run_bash(system, f'module use {site.root}/modules\nmodule load demo\ndemo-cmd "$@"', site.env, args)
        assert proc.returncode == 0, (system, proc.stderr.decode(errors="replace"))
        _check(site, args, env_value, site.root / "containers" / "x.sif")
        # the description reaches `module whatis` unchanged (quoted, never code)
        if "\n" not in description and description.strip() == description and description:
            what = run_bash(system, f"module use {site.root}/modules\nmodule whatis demo/1.0 2>&1", site.env)
            assert description.encode() in what.stdout, (system, what.stdout)
