"""``doctor`` on ``mpi: host`` (issue 11, part 3): what it can see without running anything.

The host's "MPI libraries" are real ELF shared objects the test links with gcc, each with the
soname of an MPI family (MPICH ABI libmpi.so.12, Open MPI libmpi.so.40): doctor reads their
SONAME from the ELF header, as ``readelf -d`` shows it. Images are real SIFs (mksquashfs) whose
directory table names the image's MPI library; modules are installed through the CLI (the
runtime is the recording stand-in: nothing runs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from shpc_lite import mpi
from tests.needs import need_tools, requires

pytestmark = [requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed")]


def _library(directory: Path, name: str, soname: str) -> Path:
    need_tools("gcc")
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "lib.c"
    src.write_text("int MPI_Init(int *c, char ***v) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(directory / name), str(src)],
                   check=True, timeout=60)
    src.unlink()
    return directory / name


def _sif(tmp: Path, library: str) -> Path:
    from shpc_lite.sif import build_container_sif

    rootfs = tmp / f"rootfs-{library}"
    (rootfs / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (rootfs / "usr/lib/x86_64-linux-gnu" / library).write_bytes(b"\x7fELF")
    (rootfs / "usr/lib/x86_64-linux-gnu/libmpifort.so.40").write_bytes(b"")  # not the C library
    squash = tmp / f"{library}.squashfs"
    subprocess.run(["mksquashfs", str(rootfs), str(squash), "-noappend", "-quiet", "-all-root"], check=True,
                   capture_output=True, timeout=60)
    sif = tmp / f"{library}.sif"
    build_container_sif(sif, squash, deffile=b"bootstrap: localimage\nfrom: test\n", json_objects={}, arch="amd64")
    return sif


def _install(site, name: str, sif: Path) -> None:
    site.write_recipe(name, f"name: {name}\nimage: docker.io/library/{name}\ndescription: MPI app\n"
                            "versions:\n  '1.0': '1.0'\naliases:\n  app: /usr/bin/app\nfeatures:\n  mpi: host\n")
    site.cli("install", f"{name}:1.0", "--sif", str(sif), check=True)


def _mpi_lines(site) -> list[tuple[str, str]]:
    proc = site.cli("doctor", "--offline", "--json")
    return [(f["level"], f["detail"]) for f in json.loads(proc.stdout) if f["check"] == "mpi"]


def _config(site, **values) -> None:
    Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).write_text(json.dumps(values))


def test_matching_host_library_passes(site, tmp_path):
    host = _library(tmp_path / "host" / "lib", "libmpi.so.12.4.0", "libmpi.so.12")
    _config(site, mpi_binds=[f"{host.parent}:/opt/host-mpi/lib"], mpi_env={"LD_LIBRARY_PATH": "/opt/host-mpi/lib"})
    _install(site, "mpich-app", _sif(tmp_path, "libmpi.so.12.0.5"))
    assert _mpi_lines(site) == [
        ("ok", f"host MPI {host}: soname libmpi.so.12 (MPICH ABI)"),
        ("ok", "mpich-app:1.0: image's libmpi.so.12 matches the host's"),
    ]
    proc = site.cli("doctor", "--offline")
    assert "[error] mpi" not in proc.stdout
    # the config changed after the install: the wrappers still bind the old settings
    _config(site, mpi_binds=[f"{host.parent}:/opt/host-mpi/lib"], mpi_env={"LD_LIBRARY_PATH": "/elsewhere"})
    assert ("warn", "1 module(s) installed with other mpi_binds/mpi_env than the config's now: mpich-app:1.0") \
        in _mpi_lines(site)


def test_open_mpi_image_and_missing_bind_are_one_line_each(site, tmp_path):
    host = _library(tmp_path / "host" / "lib", "libmpich.so.12", "libmpich.so.12")
    gone = tmp_path / "no-such" / "libfabric.so.1"
    _config(site, mpi_binds=[str(host), f"{gone}:/opt/fabric/libfabric.so.1"])
    _install(site, "ompi-app", _sif(tmp_path, "libmpi.so.40"))
    proc = site.cli("doctor", "--offline")
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("[error] mpi")]
    assert errors == [
        f"[error] mpi: mpi_binds: {gone} does not exist on this host",
        "[error] mpi: ompi-app:1.0: image built against libmpi.so.40 (Open MPI, not the MPICH ABI), "
        "host MPI is libmpich.so.12 (MPICH ABI): the host library cannot replace it",
    ]


def test_open_mpi_on_the_host_is_an_error(site, tmp_path):
    host = _library(tmp_path / "ompi" / "lib", "libmpi.so.40.30.1", "libmpi.so.40")
    _config(site, mpi="host", mpi_binds=[str(host.parent)])
    assert _mpi_lines(site) == [("error", f"host MPI {host}: soname libmpi.so.40 (Open MPI, not the MPICH ABI)")]


def test_empty_binds_tell_the_admin_what_to_set(site):
    _config(site, mpi="host")
    proc = site.cli("doctor", "--offline")
    lines = proc.stdout.splitlines()
    at = lines.index("[error] mpi: mpi: host but config mpi_binds is empty: the wrappers bind no host MPI")
    fix = lines[at + 1]
    found = mpi.ldconfig_suggestion()
    if Path("/usr/lib/x86_64-linux-gnu/libmpich.so.12").exists():  # Debian's MPICH (scripts/test.sh)
        assert any(path.endswith("/libmpich.so.12") for path in found)
    assert "mpi_binds" in fix and "LD_LIBRARY_PATH" in fix
    assert all(path in fix for path in found)  # e.g. Debian MPICH's /lib/x86_64-linux-gnu/libmpich.so.12


def test_no_mpi_no_lines(site):
    assert _mpi_lines(site) == []


@pytest.mark.parametrize("name, soname", [
    ("libmpi.so.12.4.0", "libmpi.so.12"), ("libmpich.so.12", "libmpich.so.12"), ("libmpi.so.40", "libmpi.so.40"),
    ("libmpi_cxx.so.40", None), ("libmpifort.so.12", None), ("libmpi.so", None), ("libmpich.so.12.x", None),
])
def test_soname_of_a_file_name(name, soname):
    assert mpi.soname_of_name(name) == soname


def test_elf_soname_matches_readelf(tmp_path):
    need_tools("readelf")
    lib = _library(tmp_path, "libx.so", "libmpi.so.12")
    readelf = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "Library soname: [libmpi.so.12]" in readelf and mpi.elf_soname(lib) == "libmpi.so.12"
    (tmp_path / "text").write_text("not ELF")
    assert mpi.elf_soname(tmp_path / "text") is None and mpi.elf_soname(tmp_path / "missing") is None
