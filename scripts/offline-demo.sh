#!/usr/bin/env bash
# The main job without a registry: build a tiny busybox image on the spot (OCI archive, no
# network), register a recipe for it in a temporary registry dir, install it with
# `--from oci-archive:` for the Charliecloud runtime (ch-run on the SIF's squashfs, mounted with
# squashfuse), load the module with Lmod and run commands inside the container.
#
#   bash scripts/offline-demo.sh SHPC-LITE-COMMAND...     e.g. ~/.local/shpc-lite-venv/bin/shpc-lite
#
# Needs (scripts/system-packages.sh installs them): charliecloud-runtime, squashfuse, fuse3,
# busybox-static, lmod, and /dev/fuse. Everything is made in one temporary directory under /tmp
# (the caller's directory must lie under a top-level directory the image has: /tmp always
# does), which is removed at the end unless SHPC_LITE_DEMO_KEEP=1.
set -euo pipefail
[ "$#" -gt 0 ] || { echo "usage: $0 SHPC-LITE-COMMAND..." >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
lmod_init=/usr/share/lmod/lmod/init/bash
for tool in ch-run squashfuse fusermount3 flock; do
    command -v "$tool" >/dev/null || { echo "offline demo: $tool is not installed (bash scripts/system-packages.sh)" >&2; exit 1; }
done
[ -f "$lmod_init" ] || { echo "offline demo: Lmod is not installed ($lmod_init)" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "offline demo: /dev/fuse is missing: squashfuse cannot mount" >&2; exit 1; }

demo="$(mktemp -d /tmp/shpc-lite-demo.XXXXXX)"
export SHPC_LITE_MOUNT_DIR="$demo/mounts" SHPC_LITE_MOUNT_LINGER=0.2
cleanup() {
    set +e
    # the reaper unmounts shortly after the last call; make sure before removing the directory
    local deadline=$((SECONDS + 5))
    while grep -q " $SHPC_LITE_MOUNT_DIR/" /proc/self/mounts 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    grep " $SHPC_LITE_MOUNT_DIR/" /proc/self/mounts 2>/dev/null | while read -r _ dir _; do
        fusermount3 -u -z "$dir" 2>/dev/null
    done
    if [ "${SHPC_LITE_DEMO_KEEP:-0}" = 1 ]; then
        echo "(kept $demo)" >&2
    else
        rm -rf --one-file-system "$demo"
    fi
}
trap cleanup EXIT

python3 "$here/busybox_image.py" "$demo/busybox-demo.tar"
mkdir -p "$demo/registry"
cat >"$demo/registry/busybox-demo.yaml" <<'EOF'
# made by scripts/offline-demo.sh: an image built on the spot from Debian's busybox-static
name: busybox-demo
image: localhost/busybox-demo
description: a tiny busybox image, installed from an OCI archive (no registry)
versions:
  "1.0": "1.0"
aliases:
  busybox-sh: /bin/sh
  os-release: cat /etc/os-release
env:
  DEMO_FROM_RECIPE: set by the recipe
EOF
shpc=("$@" --root "$demo/root" --module-system lmod --runtime ch-run --runtime-kind charliecloud)
export SHPC_LITE_REGISTRY="$demo/registry"
"${shpc[@]}" install busybox-demo:1.0 --from "oci-archive:$demo/busybox-demo.tar"
"${shpc[@]}" list

cd "$demo"
echo "--- module load busybox-demo, then commands run inside the container (Charliecloud):"
# shellcheck disable=SC1090
LMOD_REDIRECT=yes bash --noprofile --norc -c '
    set -e
    . "$1"
    module use "$2"
    module load busybox-demo
    echo "\$ os-release"
    os-release
    echo "\$ busybox-sh -c ..."
    busybox-sh -c '"'"'cat /etc/motd; echo "uname: $(uname -srm)"; echo "pwd: $(pwd)"; echo "id: $(id)"; echo "env: $DEMO_GREETING; $DEMO_FROM_RECIPE"'"'"'
' bash "$lmod_init" "$demo/root/modules" 2>&1
