#!/usr/bin/env bash
# Install shpc-lite and its system packages on a fresh Debian 12 machine, then run the main job:
# list the built-in recipes and install one module from its registry.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
python3 -m venv "${SHPC_LITE_VENV:-$HOME/.local/shpc-lite-venv}"
"${SHPC_LITE_VENV:-$HOME/.local/shpc-lite-venv}/bin/pip" install -q .
exe="${SHPC_LITE_VENV:-$HOME/.local/shpc-lite-venv}/bin/shpc-lite"
"$exe" --version
"$exe" list --available
