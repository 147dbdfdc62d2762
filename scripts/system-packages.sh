#!/usr/bin/env bash
# Debian 12 packages shpc-lite uses at run time (squashfs-tools builds SIF partitions; Lmod is the
# module system most sites run). Apptainer/Singularity are not packaged for Debian 12: install the
# runtime your cluster uses from its vendor.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends squashfs-tools lmod python3-venv "$@" >/dev/null
