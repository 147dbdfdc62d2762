#!/bin/sh
# Stand-in for `singularity exec [OPTIONS] SIF COMMAND [ARGS...]` that REALLY runs the image
# (Apptainer is not packaged for Debian 12): it mounts the SIF's primary partition with
# squashfuse at its offset and runs the command there with Charliecloud's ch-run, as
# ../shared/design/real-parts.md suggests. Runtime options (--nv, -B, ...) can only be skipped;
# SINGULARITYENV_X=v is passed in as X=v, as Apptainer does. Test use only.
set -eu
[ "${1:-}" = exec ] || { echo "runtime_chrun: only 'exec' is supported" >&2; exit 2; }
shift
while [ $# -gt 0 ]; do
    case "$1" in
        -B|--bind|--env|--pwd|--home) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
sif=$1
shift
offset=$(python3 -c 'import sys
from shpc_lite.sif import PartType, read_sif
print(next(d.offset for d in read_sif(sys.argv[1]).descriptors if d.partition_type == PartType.PRIMARY_SYSTEM))' "$sif")
for name in $(env | sed -n 's/^SINGULARITYENV_\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
    eval "export $name=\"\$SINGULARITYENV_$name\""
done
mnt=$(mktemp -d)
squashfuse -o "offset=$offset" "$sif" "$mnt"
rc=0
USER=${USER:-root} ch-run "$mnt" -- "$@" || rc=$?
fusermount -u "$mnt" 2>/dev/null || umount "$mnt"
rmdir "$mnt"
exit "$rc"
