"""Generated modulefiles loaded by the real module systems, wrappers called for real.

The container runtime is the recording stand-in tests/runtime_standin.sh on PATH (Apptainer and
Singularity are not packaged for Debian 12): everything up to its exec is real.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import read_record
from tests.modsys import have, run_bash
from tests.needs import requires

SYSTEMS = [
    pytest.param("lmod", marks=requires(have("lmod"), reason="Debian lmod not installed")),
    pytest.param("tcl", marks=requires(have("tcl"), reason="Environment Modules not unpacked")),
]


def _install(site, system, *specs, sif):
    for spec in specs:
        site.cli("--module-system", system, "install", spec, "--sif", str(sif), check=True)


@pytest.mark.parametrize("system", SYSTEMS)
def test_load_default_version_and_run_alias(site, system, small_sif):
    _install(site, system, "python:3.11", "python:3.12", sif=small_sif)
    modules = site.root / "modules"
    proc = run_bash(
        system,
        f"""
        module use {modules}
        module avail 2>&1
        echo "--- load"
        module load python
        module list 2>&1
        echo "--- which"
        command -v python
        python -c 'print(1)' 'two words' ''
        echo "--- rc=$?"
        module unload python
        echo "--- after unload"
        command -v python || true
        """,
        site.env,
    )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "python/3.11" in out and "python/3.12" in out
    listed = out.split("--- load")[1].split("--- which")[0]
    assert "python/3.12" in listed  # newest is the default
    wrapper_dir = site.root / "wrappers" / "python" / "3.12" / "bin"
    assert f"{wrapper_dir}/python" in out.split("--- which")[1]
    assert str(wrapper_dir) not in out.split("--- after unload")[1]
    argv, env = read_record(site)
    stored = next((site.root / "containers").glob("*.sif"))
    assert argv == [b"exec", str(stored).encode(), b"python", b"-c", b"print(1)", b"two words", b""]
    assert env[b"SINGULARITYENV_PYTHONNOUSERSITE"] == b"1"


@pytest.mark.parametrize("system", SYSTEMS)
def test_gpu_recipe_flags_and_property(site, system, small_sif):
    _install(site, system, "pytorch:2.2.1", sif=small_sif)
    modules = site.root / "modules"
    script = f"""
        module use {modules}
        module avail 2>&1
        module load pytorch/2.2.1
        echo "SIF=$SHPC_LITE_PYTORCH_SIF"
        torchrun --nproc_per_node=2 train.py
        """
    proc = run_bash(system, script, site.env)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    # the GPU marker: Lmod's arch=gpu property shows as (g), Environment Modules shows the tag
    assert ("(g)" in out) if system == "lmod" else ("gpu" in out.split("pytorch/2.2.1", 1)[1].splitlines()[0])
    stored = next((site.root / "containers").glob("*.sif"))
    assert f"SIF={stored}" in out
    argv, _ = read_record(site)
    # no NVIDIA device on this machine: gpu auto adds no --nv
    assert argv == [b"exec", str(stored).encode(), b"torchrun", b"--nproc_per_node=2", b"train.py"]
    proc = run_bash(system, script, {**site.env, "SHPC_LITE_GPU": "always",
                                     "SHPC_LITE_RUNTIME_OPTS": "--cleanenv -B /scratch"})
    argv, _ = read_record(site)
    assert argv[:5] == [b"exec", b"--nv", b"--cleanenv", b"-B", b"/scratch"]


@pytest.mark.parametrize("system", SYSTEMS)
def test_runtime_module_is_loaded(site, system, small_sif, tmp_path):
    # a site module for the runtime, which every container module must load first
    rt = tmp_path / "rtmods" / "apptainer"
    rt.mkdir(parents=True)
    if system == "lmod":
        (rt / "1.3.lua").write_text('setenv("RUNTIME_MODULE_LOADED", "yes")\n')
    else:
        (rt / "1.3").write_text("#%Module1.0\nsetenv RUNTIME_MODULE_LOADED yes\n")
    site.cli("--module-system", system, "--set", "runtime_module=apptainer/1.3", "--runtime", "apptainer",
             "install", "python:3.12", "--sif", str(small_sif), check=True)
    proc = run_bash(system, f"""
        module use {tmp_path / 'rtmods'}
        module use {site.root / 'modules'}
        module load python
        echo "loaded=$RUNTIME_MODULE_LOADED"
        pip --version
        """, site.env)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "loaded=yes" in proc.stdout.decode()
    argv, env = read_record(site)
    assert argv[-2:] == [b"pip", b"--version"]
    assert env[b"APPTAINERENV_PYTHONNOUSERSITE"] == b"1"


@pytest.mark.parametrize("system", SYSTEMS)
def test_uninstall_moves_default_and_removes_files(site, system, small_sif):
    _install(site, system, "python:3.11", "python:3.12", sif=small_sif)
    site.cli("--module-system", system, "uninstall", "python:3.12", check=True)
    proc = run_bash(system, f"module use {site.root / 'modules'}\nmodule load python\nmodule list 2>&1", site.env)
    assert "python/3.11" in proc.stdout.decode()
    assert not (site.root / "wrappers" / "python" / "3.12").exists()
    site.cli("--module-system", system, "uninstall", "python", check=True)
    assert not (site.root / "modules" / "python").exists()
    assert not list((site.root / "containers").glob("*.sif"))  # last user gone: the SIF goes too


@requires(have("lmod"), reason="Debian lmod not installed")
@requires(shutil.which("mpirun"), reason="mpirun not installed (Debian mpich, installed by .ci/run)")
def test_wrappers_under_mpirun(site, small_sif):
    """mpirun (real MPICH Hydra) execs the wrapper on every rank; each rank reaches the runtime
    with the exact argv (the stand-in records per rank, from MPICH's PMI_RANK)."""
    site.cli("install", "python:3.12", "--sif", str(small_sif), check=True)
    stored = next((site.root / "containers").glob("*.sif"))
    proc = run_bash(
        "lmod",
        f"""
        module use {site.root / 'modules'}
        module load python
        mpirun -np 2 python -c 'print(1)' 'two words' '' '$(id)'
        """,
        site.env,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    record = site.env["SHPC_LITE_TEST_RECORD"]
    for rank in ("0", "1"):
        argv = Path(f"{record}.{rank}.argv").read_bytes().split(b"\0")[:-1]
        assert argv == [b"exec", str(stored).encode(), b"python", b"-c", b"print(1)", b"two words", b"", b"$(id)"]
