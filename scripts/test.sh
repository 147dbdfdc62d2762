#!/usr/bin/env bash
# Install everything the tests use (real Lmod, Environment Modules, the CNCF distribution
# registry, squashfs-tools, siftool, squashfuse + Charliecloud, skopeo + umoci and bsdtar (the
# differential layer test), MPICH (with its headers and gcc: the MPI test compiles a hello; libpmix for srun --mpi=pmix), Slurm +
# munge, podman, Debian's python3.11 with venv and its ensurepip wheels (tests/pyimage.py builds
# the Python test image from them) and run
# the whole suite. CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    lmod lua5.3 tcl8.6 dash squashfs-tools siftool squashfuse docker-registry apache2-utils \
    skopeo umoci zstd slurm-wlm munge mpich libmpich-dev libpmix-dev gcc charliecloud-runtime busybox-static libarchive-tools fuse3 podman \
    python3-venv python3.11 python3.11-venv python3-pip-whl python3-setuptools-whl ca-certificates >/dev/null
# Environment Modules conflicts with lmod as a package: unpack it beside (run through tclsh).
envmods="${SHPC_LITE_TEST_ENVMODULES:-/opt/envmodules}"
if [ ! -f "$envmods/usr/lib/x86_64-linux-gnu/modulecmd.tcl" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download environment-modules >/dev/null)
    $SUDO mkdir -p "$envmods"
    $SUDO dpkg-deb -x "$tmp"/environment-modules_*.deb "$envmods"
    rm -rf "$tmp"
fi
python3 -m pip install -q -e ".[test]"
exec python3 -m pytest -q "$@"
