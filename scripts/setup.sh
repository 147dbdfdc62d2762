#!/usr/bin/env bash
# Install shpc-lite and its system packages on a fresh Debian 12 machine, then run the main job:
# check the set-up, list the built-in recipes, and install python 3.12 from Docker Hub as a module.
# Where Docker Hub cannot be reached, the whole path runs offline instead (scripts/offline-demo.sh):
# a tiny busybox image built on the spot as an OCI archive, installed with --from for the
# Charliecloud runtime, loaded with Lmod, and commands run inside the container.
set -euo pipefail
cd "$(dirname "$0")/.."
# Charliecloud (ch-run), squashfuse + fuse3 and busybox-static serve the offline demo; the
# Charliecloud kind needs nothing else (docs/runtimes.md)
bash scripts/system-packages.sh charliecloud-runtime squashfuse fuse3 busybox-static
venv="${SHPC_LITE_VENV:-$HOME/.local/shpc-lite-venv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q .
exe="$venv/bin/shpc-lite"
"$exe" --version
"$exe" doctor --offline || echo "(doctor found something to fix: see above; apptainer/singularity come from your site)"
"$exe" list --available
if "$venv/bin/python" -c 'import requests, sys; sys.exit(requests.get("https://registry-1.docker.io/v2/", timeout=10).status_code not in (200, 401))' 2>/dev/null; then
    "$exe" install python:3.12
    "$exe" list
    "$exe" use
    echo "shpc-lite is installed in $venv: add $venv/bin to PATH"
else
    echo "shpc-lite is installed in $venv: add $venv/bin to PATH"
    echo "Docker Hub is not reachable from this machine: installing a busybox image built here instead"
    bash scripts/offline-demo.sh "$exe"
fi
