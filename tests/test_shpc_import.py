"""``shpc-lite import-shpc``: real shpc recipes (tests/data/shpc-recipes, and the whole shared set
when it is beside the project) become recipes that load, install and run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import read_record
from tests.modsys import run_bash
from tests.needs import need_system, requires

HERE = Path(__file__).parent
SAMPLES = HERE / "data" / "shpc-recipes"
SHARED = HERE.parent.parent / "shared" / "data" / "shpc-recipes"


def _import(site, *args, out=None):
    out = out or site.tmp / "imported"
    return out, site.cli("import-shpc", *map(str, args), "--out", str(out))


def test_import_carries_over_what_shpc_offered(site):
    out, proc = _import(site, SAMPLES)
    assert proc.returncode == 1  # two recipes could not be imported, and say why
    skipped = proc.stderr.strip().splitlines()
    assert len(skipped) == 2
    assert any("R/container.yaml: site-built SIF files (path:)" in line for line in skipped)
    assert any("singularity-deploy/container.yaml: images from GitHub releases (gh:)" in line for line in skipped)
    assert sorted(p.stem for p in out.glob("*.yaml")) == [
        "amdih-pytorch", "beast2", "fastqc", "node", "nvidia-pytorch", "openfoam", "python",
        "tensorflow-notebook"]

    python = yaml.safe_load((out / "python.yaml").read_text())
    assert python["image"] == "docker.io/library/python"
    assert python["versions"]["3.11"] == {
        "tag": "3.11", "digest": "sha256:e7e3b031dbf71514d0a8d759d8417b04f8dcf483aec18d69abd1a2b3955297b6"}
    assert "3.12-rc" in python["versions"]  # shpc offered it: an explicit pin, never a selection
    assert python["aliases"] == {"python": "/usr/local/bin/python"}
    assert "tag filter was not converted" in (out / "python.yaml").read_text()
    assert yaml.safe_load((out / "nvidia-pytorch.yaml").read_text())["features"] == {"gpu": "nvidia"}
    beast = yaml.safe_load((out / "beast2.yaml").read_text())
    assert beast["env"] == {"DISPLAY": ""} and beast["features"] == {"home": True}
    assert yaml.safe_load((out / "fastqc.yaml").read_text())["features"] == {"x11": True}
    assert "per-tag alias overrides were not converted" in (out / "openfoam.yaml").read_text()

    # every file loads as a recipe: the registry lists them all, with no error line
    listed = site.cli("--registry", str(out), "list", "--available", check=True)
    assert "error" not in listed.stderr.lower()
    for name in ("node", "python", "nvidia-pytorch", "tensorflow-notebook"):
        assert f"\n{name} " in "\n" + listed.stdout

    again = _import(site, SAMPLES, out=out)[1]  # nothing replaced without --force
    assert again.stderr.count("exists (--force replaces it)") == 8
    amd, dry = _import(site, SAMPLES / "upstream-2024-2025-from-gh-pages-library-json", "--gpu-vendor", "amd",
                       "--dry-run", out=site.tmp / "dry")
    assert dry.returncode == 0 and "would import amdih-pytorch" in dry.stdout and not amd.exists()
    amd, proc = _import(site, SAMPLES / "upstream-2024-2025-from-gh-pages-library-json", "--gpu-vendor", "amd",
                        out=site.tmp / "amd")
    assert yaml.safe_load((amd / "nvidia-pytorch.yaml").read_text())["features"] == {"gpu": "amd"}


def test_imported_recipe_installs_and_its_aliases_run(site, small_sif):
    """The stand-in runtime records what the wrappers exec (no Apptainer on this OS)."""
    need_system("lmod")
    out, _ = _import(site, SAMPLES)
    for spec in ("node:18.7", "tensorflow-notebook:latest"):
        site.cli("--registry", str(out), "install", spec, "--sif", str(small_sif), check=True)
    stored = str(next((site.root / "containers").glob("*.sif"))).encode()
    proc = run_bash("lmod", f"module use {site.root / 'modules'}\nmodule load node\nnode --version 'a b'", site.env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert read_record(site)[0] == [b"exec", stored, b"/usr/local/bin/node", b"--version", b"a b"]
    # shpc ran `--port=$(shuf ...)` as shell: it still does, inside the container, never on the host
    proc = run_bash("lmod", f"module use {site.root / 'modules'}\nmodule load tensorflow-notebook\n"
                            "run-notebook --debug", site.env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert read_record(site)[0] == [
        b"exec", stored, b"sh", b"-c",
        b'jupyter notebook --no-browser --port=$(shuf -i 2000-65000 -n 1) --ip 0.0.0.0 "$@"',
        b"run-notebook", b"--debug"]


@requires(SHARED.is_dir(), reason="../shared/data/shpc-recipes is not beside the project")
def test_every_shared_shpc_recipe_imports_or_says_why(site):
    sources = sorted(SHARED.rglob("container.yaml"))
    out, proc = _import(site, SHARED)
    skipped = proc.stderr.strip().splitlines()
    written = list(out.glob("*.yaml"))
    assert len(written) + len(skipped) == len(sources) and len(written) > 300
    for line in skipped:
        assert line.startswith(f"shpc-lite: skipped {SHARED}") and "container.yaml: " in line
    listed = site.cli("--registry", str(out), "list", "--available", "--json", check=True)
    assert len({r["name"] for r in json.loads(listed.stdout)}) >= len(written)
