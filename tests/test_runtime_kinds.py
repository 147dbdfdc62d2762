"""Choosing the runtime kind (config runtime_kind / auto from the runtime's name), and what a kind
cannot do is refused at install with one line (issue 10)."""

from __future__ import annotations

import pytest

from shpc_lite.errors import ConfigError
from shpc_lite.runtimes import RUNTIME_KINDS, runtime_kind


@pytest.mark.parametrize("runtime, kind", [
    ("singularity", "singularity"), ("/opt/apptainer/bin/apptainer", "apptainer"), ("ch-run", "charliecloud"),
    ("/usr/bin/podman", "podman"), ("podman-hpc", "podman-hpc"), ("shifter", "shifter"),
    ("singularity-ce", "singularity"),
])
def test_auto_takes_the_kind_from_the_runtime_name(runtime: str, kind: str) -> None:
    assert runtime_kind({"runtime": runtime, "runtime_kind": "auto"}).name == kind


def test_an_explicit_kind_wins_and_an_unknown_name_is_one_error() -> None:
    assert runtime_kind({"runtime": "/site/bin/run-container", "runtime_kind": "podman"}) is RUNTIME_KINDS["podman"]
    with pytest.raises(ConfigError, match="runtime_kind"):
        runtime_kind({"runtime": "/site/bin/run-container", "runtime_kind": "auto"})


def test_kind_from_env_and_flag_and_bad_value(site, small_sif) -> None:
    bad = site.cli("--runtime-kind", "docker", "install", "python:3.12", "--sif", str(small_sif))
    assert bad.returncode != 0 and "runtime_kind" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    site.cli("--runtime-kind", "charliecloud", "install", "python:3.12", "--sif", str(small_sif), check=True)
    wrapper = (site.root / "wrappers" / "python" / "3.12" / "bin" / "python").read_text()
    assert "exec 'singularity' --env-no-expand" in wrapper and "squashfuse" in wrapper


def test_charliecloud_refuses_read_only_binds_it_cannot_honour(site, small_sif) -> None:
    proc = site.cli("install", "python:3.12", "--sif", str(small_sif),
                    extra_env={"SHPC_LITE_RUNTIME": "ch-run", "SHPC_LITE_BIND_PATHS": "/srv/data:/data:ro"})
    assert proc.returncode == 1 and "read-only" in proc.stderr and "/srv/data:/data:ro" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (site.root / "modules").exists() and not list(site.root.glob("containers/*.sif"))
