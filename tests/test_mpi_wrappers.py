"""``mpi: host`` in the generated wrappers of every runtime kind (issue 11, part 3).

Each kind's runtime is a recording stand-in (apptainer and singularity are not packaged for
Debian 12; podman cannot start containers here; shifter needs its site install; the Charliecloud
wrapper's squashfuse mount is real, only ch-run is stood in). What is checked is what the wrapper
execs: the config's ``mpi_binds`` as the kind's bind options and ``mpi_env`` as its env, byte-exact
for hostile values (nothing of them runs), and what an MPI launcher hands the process (PMI_RANK,
PMI_SIZE, PMIX_*, the PMI socket named by PMI_FD, here fd 9) reaching the runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.imagetools import image_recipe
from tests.needs import requires
from tests.test_container_runs import BUSYBOX, busybox_image

HOSTILE_BIND = "/opt/mpi dir/$(touch pwned)/`id`;lib"
HOSTILE_VALUE = "$(touch pwned) 'single' \"double\" `id` ; \\ $HOME"
RECORDER = """#!/bin/sh
rec=${SHPC_LITE_TEST_RECORD:?}
printf '%s\\0' "$@" > "$rec.argv"
env -0 > "$rec.env"
ls /proc/$$/fd > "$rec.fds"
if [ -n "${PMI_FD:-}" ]; then echo "PMI socket open in the runtime" >&"$PMI_FD"; fi
"""

# What an MPI launcher hands a rank (the socket at fd 9 is set up by _run)
PMI = {"PMI_FD": "9", "PMI_RANK": "1", "PMI_SIZE": "2", "PMIX_NAMESPACE": "slurm.pmix.7.0"}

pytestmark = [
    requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (scripts/test.sh installs it)"),
]


def _config(site, extra: str = "") -> None:
    Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).write_text(
        f"mpi_binds: [{json.dumps(HOSTILE_BIND + ':/opt/host-mpi/lib')}, /usr/lib/libfabric.so.1]\n"
        f"mpi_env:\n  LD_LIBRARY_PATH: /opt/host-mpi/lib\n  HOSTILE: {json.dumps(HOSTILE_VALUE)}\n{extra}")


def _recipe(site, image: str, mpi: str | None) -> None:
    image_recipe(site, "tiny", image, {"1.0": "1.0"})
    features = f"  mpi: {mpi}\n" if mpi else ""
    text = (site.recipes / "tiny.yaml").read_text().replace("features:\n", "features:\n" + features)
    site.write_recipe("tiny", text.replace("aliases:\n", "env:\n  HOSTILE: from the recipe\naliases:\n"))


def _run(site) -> tuple[list[str], dict[str, str], str]:
    """Run the ``tool`` wrapper as a launcher would start a rank (PMI env, socket at fd 9): what
    the runtime was given (argv, env) and what it wrote to the socket."""
    wrapper = site.root / "wrappers" / "tiny" / "1.0" / "bin" / "tool"
    read, write = os.pipe()
    env = {**site.env, **PMI, "SHPC_LITE_MOUNT_DIR": str(site.tmp / "mounts"), "SHPC_LITE_MOUNT_LINGER": "0.1", "USER": "root"}
    try:
        proc = subprocess.run(["bash", "-c", f'exec "$@" 9>&{write} {write}>&-', "sh", str(wrapper), "arg"],
                              env=env, pass_fds=(write,), capture_output=True, text=True, timeout=60, cwd=site.tmp)
        os.close(write)
        write = -1
        assert proc.returncode == 0, proc.stderr
        os.set_blocking(read, False)
        try:
            got = os.read(read, 4096).decode()
        except BlockingIOError:
            got = ""
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    base = site.env["SHPC_LITE_TEST_RECORD"]
    argv = Path(base + ".argv").read_bytes().decode().split("\0")[:-1]
    recorded = dict(item.partition("=")[::2] for item in Path(base + ".env").read_bytes().decode().split("\0")[:-1])
    return argv, recorded, got


def _install(site, runtime: str, kind: str, mpi: str | None, registry=None, repo: str = "",
             sif: Path | None = None) -> None:
    (site.bin / runtime).write_text(RECORDER)
    (site.bin / runtime).chmod(0o755)
    if registry is not None:  # podman and shifter pull into their own storage (stood in: recorded)
        registry.pusher().push_image(repo, busybox_image(), tags=["1.0"])
        _recipe(site, f"{registry.host}/{repo}", mpi)
        (site.bin / "shifterimg").write_text(RECORDER)
        (site.bin / "shifterimg").chmod(0o755)
        site.cli("--runtime", runtime, "--runtime-kind", kind, "install", "tiny:1.0", check=True)
    else:
        _recipe(site, "docker.io/library/tiny", mpi)
        site.cli("--runtime", runtime, "--runtime-kind", kind, "install", "tiny:1.0", "--sif", str(sif),
                 check=True)


@pytest.mark.parametrize("kind", ["apptainer", "singularity"])
def test_apptainer_kinds_bind_and_set_env(site, small_sif, kind):
    _config(site)
    _install(site, kind, kind, "host", sif=small_sif)
    argv, env, pmi = _run(site)
    prefix = "APPTAINERENV_" if kind == "apptainer" else "SINGULARITYENV_"
    assert argv[argv.index(HOSTILE_BIND + ":/opt/host-mpi/lib") - 1] == "-B"
    assert argv[argv.index("/usr/lib/libfabric.so.1") - 1] == "-B"
    assert env[prefix + "HOSTILE"] == HOSTILE_VALUE  # the site's value wins over the recipe's
    assert env[prefix + "LD_LIBRARY_PATH"] == "/opt/host-mpi/lib"
    assert {k: env[k] for k in PMI} == PMI and pmi == "PMI socket open in the runtime\n"
    assert not list(site.tmp.rglob("pwned"))


@requires(shutil.which("squashfuse") and shutil.which("flock") and os.geteuid() == 0 and os.path.exists("/dev/fuse"),
          reason="the Charliecloud wrapper mounts the SIF: squashfuse, flock, root and /dev/fuse")
def test_charliecloud_binds_sets_env_and_keeps_the_pmi_socket(site, small_sif):
    _config(site)
    _install(site, "ch-run", "charliecloud", "host", sif=small_sif)
    argv, env, pmi = _run(site)
    assert argv[argv.index(HOSTILE_BIND + ":/opt/host-mpi/lib") - 1] == "-b"
    assert argv[argv.index("/usr/lib/libfabric.so.1") - 1] == "-b"
    sets = [a for a in argv if a.startswith("--set-env=HOSTILE=")]
    assert sets == [f"--set-env=HOSTILE='{HOSTILE_VALUE}'"]  # ch-run --env-no-expand: taken literally
    assert "--set-env=LD_LIBRARY_PATH='/opt/host-mpi/lib'" in argv
    # ch-run keeps the caller's environment and open files: PMI reaches it, fd 9 included (the
    # wrapper's own locks take other descriptors)
    assert {k: env[k] for k in PMI} == PMI and pmi == "PMI socket open in the runtime\n"
    assert not list(site.tmp.rglob("pwned"))


@pytest.mark.parametrize("runtime", ["podman", "podman-hpc"])
def test_podman_passes_pmi_env_and_fds(site, registry, unique_repo, runtime):
    _config(site)
    _install(site, runtime, runtime, "host", registry=registry, repo=unique_repo)
    argv, _env, pmi = _run(site)
    assert argv[argv.index(HOSTILE_BIND + ":/opt/host-mpi/lib") - 1] == "-v"
    assert argv[argv.index("/usr/lib/libfabric.so.1:/usr/lib/libfabric.so.1") - 1] == "-v"
    assert f"--env=HOSTILE={HOSTILE_VALUE}" in argv and "--env=HOSTILE=from the recipe" not in argv
    # podman passes neither the environment nor open files on: by prefix, and fds 3..9
    assert {"--env=PMI*", "--env=SLURM_*", "--env=FI_*", "--env=UCX_*", "--preserve-fds=7"} <= set(argv)
    assert argv.index("--env=PMI*") < argv.index(f"--env=HOSTILE={HOSTILE_VALUE}")  # set values win
    # podman refuses --preserve-fds=7 unless fds 3 to 9 are all open: the wrapper opened 3 to 8
    assert {"3", "4", "5", "6", "7", "8", "9"} <= set(Path(site.env["SHPC_LITE_TEST_RECORD"] + ".fds").read_text().split())
    assert pmi == "PMI socket open in the runtime\n"
    assert not list(site.tmp.rglob("pwned"))


def test_shifter_volumes_env_and_inherits_pmi(site, registry, unique_repo):
    _config(site)
    _install(site, "shifter", "shifter", "host", registry=registry, repo=unique_repo)
    argv, env, pmi = _run(site)
    assert f"--volume={HOSTILE_BIND}:/opt/host-mpi/lib" in argv
    assert "--volume=/usr/lib/libfabric.so.1:/usr/lib/libfabric.so.1" in argv
    assert f"--env=HOSTILE={HOSTILE_VALUE}" in argv
    assert {k: env[k] for k in PMI} == PMI and pmi == "PMI socket open in the runtime\n"
    assert not list(site.tmp.rglob("pwned"))


@pytest.mark.parametrize("config_mpi, recipe_mpi, bound", [
    ("host", None, True),     # the site default applies to a recipe that says nothing
    ("host", "none", False),  # the recipe wins
    ("none", None, False),
])
def test_recipe_setting_wins_over_the_site_default(site, small_sif, config_mpi, recipe_mpi, bound):
    _config(site, f"mpi: {config_mpi}\n")
    _install(site, "apptainer", "apptainer", recipe_mpi, sif=small_sif)
    argv, env, _ = _run(site)
    assert ("/usr/lib/libfabric.so.1" in argv) is bound
    assert env["APPTAINERENV_HOSTILE"] == (HOSTILE_VALUE if bound else "from the recipe")
    record = json.loads((site.root / "wrappers/tiny/1.0/install.json").read_text())
    assert record["mpi"] == ("host" if bound else "none")
    help_line = "MPI: the host's MPI library is used"
    assert (help_line in (site.root / "modules/tiny/1.0.lua").read_text()) is bound


def test_bad_mpi_settings_are_one_line(site, small_sif):
    Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).write_text("mpi_env:\n  'LD PATH': /x\n")
    proc = site.cli("install", "python:3.12", "--sif", str(small_sif))
    assert proc.returncode != 0 and "mpi_env" in proc.stderr and "'LD PATH'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).write_text("mpi: yes-please\n")
    proc = site.cli("install", "python:3.12", "--sif", str(small_sif))
    assert proc.returncode != 0 and "none, host" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    Path(site.env["SHPC_LITE_SYSTEM_CONFIG"]).unlink()
    _recipe(site, "docker.io/library/tiny", "hostt")
    proc = site.cli("install", "tiny:1.0", "--sif", str(small_sif))
    assert proc.returncode != 0 and "features.mpi" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_top_level_mpi_host_is_the_feature(site, small_sif):
    """The issue's spelling, ``mpi: host`` at the top of a recipe, binds as features.mpi does; a
    recipe that says both with different values is refused in one line naming the file."""
    _config(site, "mpi: none\n")
    _recipe(site, "docker.io/library/tiny", None)
    recipe = site.recipes / "tiny.yaml"
    recipe.write_text(recipe.read_text() + "mpi: host\n")
    site.cli("--runtime", "apptainer", "--runtime-kind", "apptainer", "install", "tiny:1.0", "--sif",
             str(small_sif), check=True)
    (site.bin / "apptainer").write_text(RECORDER)
    (site.bin / "apptainer").chmod(0o755)
    argv, env, _ = _run(site)
    assert "/usr/lib/libfabric.so.1" in argv and env["APPTAINERENV_HOSTILE"] == HOSTILE_VALUE
    recipe.write_text(recipe.read_text().replace("features:\n", "features:\n  mpi: none\n"))
    proc = site.cli("install", "tiny:1.0", "--sif", str(small_sif))
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "tiny.yaml" in proc.stderr and "contradicts features.mpi" in proc.stderr
