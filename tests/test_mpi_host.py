"""Issue 11, part 3: MPI with the host's stack, through a real container.

A 2-rank MPI hello compiled by the test against the host's MPICH (Debian 12: MPICH 4.0.2,
libmpich.so.12) goes into an image the test builds and pushes to the real test registry: the
hello, a static busybox for /bin/sh, the C library, and the image's own libmpich.so.12, a stub the
test compiles with the same soname that knows no other process (rank 0 of 1) and calls itself
"image stub". The module is installed with the builtin puller for Charliecloud (the real ch-run on
the SIF mounted with squashfuse: nothing is stood in) and loaded with real Lmod and real
Environment Modules. With ``features.mpi: host`` and the site's ``mpi_binds``/``mpi_env`` (the
host's library directory bound at /opt/host-mpi/lib, LD_LIBRARY_PATH pointing there), ``mpirun
-np 2 hello`` (MPICH's Hydra) and ``srun -n 2 --mpi=pmi2 hello`` (the real single-node Slurm) run
two ranks that find each other (PMI through the wrapper and ch-run) and load the HOST's MPICH,
which each rank says (the path the library was loaded from, and its version string). The same
image installed without ``mpi: host`` loads its stub: the binding is what makes the difference.

The Apptainer kind's wrapper runs the same under ``mpirun`` through tests/runtime_apptainer.sh, a
stand-in (Apptainer is not packaged for Debian 12) that really runs the SIF with ch-run.

``srun --mpi=pmix`` (Slurm's PMIx plugin, which needs libpmix-dev's libpmix.so) is shown as far as
the environment goes: each rank inside the container gets its PMIx identity. No PMIx handshake is
shown: Debian 12's MPICH 4.0.2 speaks PMI-1/PMI-2 only (its libmpich.so.12 does not link libpmix).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import imagetools as it
from tests.chenv import charliecloud_env, release_mounts
from tests.modsys import have, run_bash
from tests.needs import need_system, requires
from tests.test_container_runs import BUSYBOX

REPO = Path(__file__).resolve().parent.parent
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")  # where Debian's MPICH (the "host's stack") lives
HOST_MPI = LIBDIR / "libmpich.so.12"
INSIDE = "/opt/host-mpi/lib"  # where the image has an empty directory the host's is bound on

pytestmark = [
    requires(shutil.which("ch-run") and shutil.which("squashfuse") and shutil.which("flock")
             and shutil.which("fusermount3"),
             reason="Charliecloud (ch-run), squashfuse, fuse3 or flock not installed (.ci/run installs them)"),
    requires(BUSYBOX.is_file(), reason="busybox-static not installed (.ci/run installs it)"),
    requires(os.geteuid() == 0 and os.path.exists("/dev/fuse"), reason="squashfuse needs root and /dev/fuse"),
    requires(shutil.which("mksquashfs"), reason="squashfs-tools not installed"),
    requires(shutil.which("mpicc") and shutil.which("mpirun") and HOST_MPI.exists()
             and Path("/usr/include/x86_64-linux-gnu/mpich/mpi.h").exists(),
             reason="MPICH with its headers not installed (mpich, libmpich-dev; .ci/run installs them)"),
    requires(have("lmod"), reason="Debian lmod not installed"),
]

HELLO = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    int rank, size, sum, len;
    char version[MPI_MAX_LIBRARY_VERSION_STRING];
    Dl_info info;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Get_library_version(version, &len);
    version[strcspn(version, "\n")] = 0;
    if (!dladdr(dlsym(RTLD_DEFAULT, "MPI_Init"), &info)) info.dli_fname = "?";
    printf("rank %d of %d, sum of ranks %d, libmpi %s, %s\n", rank, size, sum, info.dli_fname, version);
    MPI_Finalize();
    return 0;
}
"""

# The image's own libmpich.so.12: same soname and symbols as far as the hello needs, no MPI.
# (MPICH's handles are ints: MPI_Comm, MPI_Datatype and MPI_Op.)
STUB = r"""
#include <string.h>
int MPI_Init(int *argc, char ***argv) { return 0; }
int MPI_Comm_rank(int comm, int *rank) { *rank = 0; return 0; }
int MPI_Comm_size(int comm, int *size) { *size = 1; return 0; }
int MPI_Allreduce(const void *in, void *out, int n, int type, int op, int comm) { memcpy(out, in, 4 * n); return 0; }
int MPI_Get_library_version(char *version, int *len) { strcpy(version, "image stub"); *len = 10; return 0; }
int MPI_Finalize(void) { return 0; }
"""


def _build(tmp: Path) -> tuple[Path, Path]:
    (tmp / "hello.c").write_text(HELLO)
    (tmp / "stub.c").write_text(STUB)
    subprocess.run(["mpicc", "-O1", "-o", str(tmp / "hello"), str(tmp / "hello.c")], check=True, timeout=120)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpich.so.12", "-o", str(tmp / "stub.so"),
                    str(tmp / "stub.c")], check=True, timeout=120)
    return tmp / "hello", tmp / "stub.so"


def mpi_image(hello: Path, stub: Path) -> it.Image:
    """busybox, the hello, the image's stub libmpich.so.12 and the C library (the host's copy), an
    empty /opt/host-mpi/lib for the host's libraries (Charliecloud binds only onto what exists)."""
    lib = "usr/lib/x86_64-linux-gnu"
    libc = Path(os.path.realpath(LIBDIR / "libc.so.6"))
    loader = Path(os.path.realpath("/lib64/ld-linux-x86-64.so.2"))
    layer = it.make_layer([
        *(it.Dir(d) for d in ("bin", "dev", "proc", "sys", "etc", "usr", "usr/lib", lib, "usr/local",
                              "usr/local/bin", "lib64", "opt", "opt/host-mpi", "opt/host-mpi/lib", "home")),
        it.Dir("tmp", 0o1777),
        it.File("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        *(it.Symlink(f"bin/{tool}", "busybox") for tool in ("sh", "cat", "ls", "env")),
        it.File("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), it.File("etc/group", "root:x:0:\n"),
        it.File("usr/local/bin/hello", hello.read_bytes(), 0o755),
        it.File(f"{lib}/libmpich.so.12", stub.read_bytes(), 0o755),
        it.File(f"{lib}/libc.so.6", libc.read_bytes(), 0o755),
        it.File("lib64/ld-linux-x86-64.so.2", loader.read_bytes(), 0o755),
    ], "gzip")
    return it.make_image([layer], env=["PATH=/usr/local/bin:/bin"])


class World:
    """The image pushed once; one install root per module system with two modules of it:
    ``mpihello`` (features.mpi: host) and ``plainhello`` (no mpi setting: the config's none)."""

    def __init__(self, registry, base: Path):
        self.base = base
        hello, stub = _build(base)
        self.repo = f"mpi/hello-{os.getpid()}"
        registry.pusher().push_image(self.repo, mpi_image(hello, stub), tags=["1.0"])
        self.image = f"{registry.host}/{self.repo}"
        self.mounts = base / "mounts"
        self.mounts.mkdir()
        # a working directory outside /tmp the image has a top-level directory for (/home)
        self.work = Path(tempfile.mkdtemp(prefix="shpc-lite-mpi-", dir="/home"))
        self.bin = base / "bin"
        self.bin.mkdir()
        shutil.copy(REPO / "tests" / "runtime_apptainer.sh", self.bin / "apptainer")
        self.envs: dict[tuple[str, str], dict] = {}

    def install(self, system: str, kind: str = "charliecloud") -> dict:
        if (system, kind) in self.envs:
            return self.envs[(system, kind)]
        top = self.base / f"{system}-{kind}"
        recipes = top / "recipes"
        recipes.mkdir(parents=True)
        for name, features in (("mpihello", "features:\n  mpi: host\n"), ("plainhello", "")):
            (recipes / f"{name}.yaml").write_text(
                f"name: {name}\nimage: {self.image}\ndescription: MPI hello\nversions:\n  '1.0': '1.0'\n"
                f"aliases:\n  hello{'' if name == 'mpihello' else '-image'}: /usr/local/bin/hello\n{features}")
        env = charliecloud_env(
            top, recipes, home=self.work, mounts=self.mounts, bin_dir=self.bin,
            SHPC_LITE_MODULE_SYSTEM=system,
            SHPC_LITE_RUNTIME="ch-run" if kind == "charliecloud" else str(self.bin / kind),
            SHPC_LITE_MPI_BINDS=f"{LIBDIR}:{INSIDE}",
            SHPC_LITE_MPI_ENV=f"LD_LIBRARY_PATH={INSIDE},UCX_POSIX_USE_PROC_LINK=n")
        for name in ("mpihello", "plainhello"):
            proc = subprocess.run([sys.executable, "-m", "shpc_lite", "install", f"{name}:1.0"], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
        self.envs[(system, kind)] = env
        return env

    def close(self) -> None:
        release_mounts(self.base)
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def world(registry, tmp_path_factory):
    w = World(registry, tmp_path_factory.mktemp("mpi"))
    try:
        yield w
    finally:
        w.close()


HOST_LINE = re.compile(rf"rank ([01]) of 2, sum of ranks 1, libmpi {INSIDE}/libmpich\.so\.12, MPICH Version:\s+4\.\d+\.\d+")


def _ranks(out: str) -> list[str]:
    lines = sorted(out.splitlines())
    assert len(lines) == 2 and all(HOST_LINE.fullmatch(line) for line in lines), out
    return [HOST_LINE.fullmatch(line).group(1) for line in lines]


@pytest.mark.parametrize("system", ["lmod", "tcl"])
def test_mpirun_two_ranks_use_the_hosts_mpich(world, system):
    """`mpirun -np 2 hello` through the alias after `module load`: two ranks of one job, each on
    the host's libmpich (bound in), not the image's stub; without mpi: host, the stub."""
    need_system(system)
    env = world.install(system)
    proc = run_bash(system, """
        set -e
        cd "$WORK"
        module use "$ROOT/modules"
        module load mpihello
        module help mpihello 2>&1 | grep -o "the host's MPI library is used"
        mpirun -np 2 hello
        module purge
        module load plainhello
        echo ---
        mpirun -np 2 hello-image
        """, {**env, "ROOT": env["SHPC_LITE_ROOT"], "WORK": str(world.work)}, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    host, _, image = out.partition("---\n")
    said, _, host = host.partition("\n")
    assert said == "the host's MPI library is used"  # module help says so
    assert _ranks(host) == ["0", "1"]
    # the image's own library: each process alone (rank 0 of 1), loaded from the image's path
    assert image.splitlines() == [f"rank 0 of 1, sum of ranks 0, libmpi {LIBDIR}/libmpich.so.12, image stub"] * 2


def test_mpirun_through_the_apptainer_wrapper(world):
    """The same through the Apptainer kind's wrapper (-B, APPTAINERENV_LD_LIBRARY_PATH). Apptainer
    is not packaged for Debian 12: the runtime is tests/runtime_apptainer.sh, a stand-in that
    implements those options and really runs the SIF with ch-run (see tests/test_transparency.py)."""
    env = world.install("lmod", "apptainer")
    hello = Path(env["SHPC_LITE_ROOT"]) / "wrappers" / "mpihello" / "1.0" / "bin" / "hello"
    assert f"APPTAINERENV_LD_LIBRARY_PATH='{INSIDE}'" in hello.read_text()
    proc = subprocess.run(["mpirun", "-np", "2", str(hello)], env=env, capture_output=True, text=True, timeout=120,
                          cwd=world.work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ranks(proc.stdout) == ["0", "1"]


def test_srun_pmi2_two_ranks_use_the_hosts_mpich(world, slurm):
    """`srun -n 2 --mpi=pmi2 hello` (Slurm's PMI-2 server, the socket PMI_FD names inherited
    through the wrapper and ch-run) on the real single-node Slurm."""
    plugins = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    assert "pmi2" in plugins.stdout + plugins.stderr
    env = world.install("lmod")
    hello = Path(env["SHPC_LITE_ROOT"]) / "wrappers" / "mpihello" / "1.0" / "bin" / "hello"
    proc = subprocess.run(["srun", f"--partition={slurm.partition}", "-n", "2", "--mpi=pmi2",
                           f"--chdir={world.work}", str(hello)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _ranks(proc.stdout) == ["0", "1"]


def test_doctor_checks_the_installed_module_against_the_host(world):
    """doctor on the real install: the host library named by mpi_binds is MPICH ABI and the
    image's libmpich.so.12 (found in its directory table) matches it."""
    env = world.install("lmod")
    proc = subprocess.run([sys.executable, "-m", "shpc_lite", "doctor", "--offline", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    import json

    mpi = [f for f in json.loads(proc.stdout) if f["check"] == "mpi"]
    assert [(f["level"], f["detail"]) for f in mpi] == [
        ("ok", f"host MPI {HOST_MPI}: soname libmpich.so.12 (MPICH ABI)"),
        ("ok", "mpihello:1.0: image's libmpich.so.12 matches the host's"),
    ]


def test_srun_pmix_hands_each_rank_its_pmix_identity(world, slurm):
    """`srun -n 2 --mpi=pmix` (Slurm's PMIx server, libpmix2) through the module's exec wrapper:
    each rank's process inside the container gets its own PMIX_RANK and the job's namespace and
    server address. This shows the wrapper under srun's PMIx launch only as far as the environment
    goes: no MPI program here speaks PMIx (Debian 12's MPICH 4.0.2 links no libpmix), so a PMIx
    handshake inside the container is not shown; docs/environments.md says what a site binds for it."""
    plugins = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    assert "pmix" in plugins.stdout + plugins.stderr
    env = world.install("lmod")
    wrapper = Path(env["SHPC_LITE_ROOT"]) / "wrappers" / "mpihello" / "1.0" / "bin" / "mpihello-exec"
    script = 'echo "rank=$PMIX_RANK ns=${PMIX_NAMESPACE:+set} uri=${PMIX_SERVER_URI41:-${PMIX_SERVER_URI4:-${PMIX_SERVER_URI3:-${PMIX_SERVER_URI2:-}}}}"'
    proc = subprocess.run(["srun", f"--partition={slurm.partition}", "-n", "2", "--mpi=pmix",
                           f"--chdir={world.work}", str(wrapper), "/bin/sh", "-c", script], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [line.split()[0] for line in lines] == ["rank=0", "rank=1"], proc.stdout + proc.stderr
    assert all(" ns=set uri=" in line and not line.endswith("uri=") for line in lines), proc.stdout
