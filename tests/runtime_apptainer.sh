#!/bin/sh
# Stand-in for `apptainer` / `singularity` {exec,run,shell} [OPTIONS] SIF [ARGS...] that REALLY runs
# the SIF (Apptainer is not packaged for Debian 12; test use only): it mounts the SIF's primary
# partition with squashfuse at its offset and execs Charliecloud's ch-run on it, so the command runs
# as the process the wrapper exec'd (signals, stdin/stdout/stderr, exit status all direct).
#
# What it implements of Apptainer, as the shpc-lite wrappers use it:
#   -B/--bind SRC[:DST[:ro|rw]][,...]  SRC at DST (DST must exist in the image: squashfs is read-only;
#                                      ch-run binds are read-write, :ro is accepted but not enforced)
#   --pwd DIR      working directory (default: the caller's $PWD, seen at the same path)
#   --home SRC[:DST] / --no-home       home bound at the same path by default, HOME set to DST
#   --env NAME=VALUE, and <PREFIX>NAME from the caller's environment, PREFIX by the name this is
#                  called as (apptainer: APPTAINERENV_, singularity: SINGULARITYENV_)
#   --nv / --rocm  appended, one a line, to $SHPC_LITE_TEST_GPU_RECORD (when set); nothing else
#   the image's env: PATH from the image, other variables only where the caller has none;
#                  <PREFIX>NAME overrides the image's, --env overrides both (as in Apptainer)
#   run: /.singularity.d/runscript; shell: /bin/sh
# Like Apptainer, the caller's $PWD, $HOME and /tmp are seen at the same paths: a directory the image
# lacks is reached by binding its top-level directory (e.g. /home) when the image has that.
# Each call mounts privately under ${SHPC_LITE_TEST_STANDIN_MNT:-/tmp}; a watcher unmounts once the
# process (same pid through exec) is gone. Any other option is an error (exit 255), so a wrapper
# passing something unexpected is seen.
set -eu
me=${0##*/}
case "$me" in
    apptainer*) prefix=APPTAINERENV_ ;;
    *) prefix=SINGULARITYENV_ ;;
esac
fail() { echo "$me (stand-in): $*" >&2; exit 255; }
sub=${1:-}
case "$sub" in
    exec|run|shell) shift ;;
    *) fail "unsupported command '$sub'" ;;
esac
nl='
'
binds= pwd=$PWD home=${HOME:-/} home_dst=${HOME:-/} no_home= envs=
while [ $# -gt 0 ]; do
    case "$1" in
        -B|--bind) [ $# -ge 2 ] || fail "$1 needs a value"; binds="$binds$2,"; shift 2 ;;
        --bind=*) binds="$binds${1#--bind=},"; shift ;;
        --pwd) [ $# -ge 2 ] || fail "$1 needs a value"; pwd=$2; shift 2 ;;
        --home) [ $# -ge 2 ] || fail "$1 needs a value"; home=${2%%:*}; home_dst=${2#*:}; shift 2 ;;
        --no-home) no_home=1; shift ;;
        --env) [ $# -ge 2 ] || fail "$1 needs a value"; envs="$envs$2$nl"; shift 2 ;;
        --nv|--rocm) [ -z "${SHPC_LITE_TEST_GPU_RECORD:-}" ] || echo "$1" >>"$SHPC_LITE_TEST_GPU_RECORD"; shift ;;
        -*) fail "unsupported option '$1'" ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || fail "no image given"
sif=$1
shift
case "$sub" in
    run) set -- /.singularity.d/runscript "$@" ;;
    shell) set -- /bin/sh "$@" ;;
    *) [ $# -ge 1 ] || fail "exec needs a command" ;;
esac
# offset and image env, read with shpc-lite's own SIF reader (quoted for eval)
setup=$(python3 - "$sif" <<'EOF'
import os, shlex, sys
from shpc_lite.inspect import inspect_sif
from shpc_lite.sif import partition_offset, read_sif
print("offset=%d" % partition_offset(read_sif(sys.argv[1])))
for name, value in sorted(inspect_sif(sys.argv[1])["env"].items()):
    if name == "PATH" or name not in os.environ:
        print("set -- %s \"$@\"" % shlex.quote("--set-env=%s='%s'" % (name, value)))
EOF
) || fail "cannot read $sif"
offset=${setup%%"$nl"*}
offset=${offset#offset=}
case "$setup" in
    *"$nl"*) setup=${setup#*"$nl"} ;;
    *) setup= ;;
esac
mnt=$(mktemp -d "${SHPC_LITE_TEST_STANDIN_MNT:-/tmp}/standin.XXXXXX")
set -- "$mnt" -- "$@"
# squashfuse stays running: it must not hold the caller's stdin/stdout/stderr open
squashfuse -o "ro,offset=$offset" "$sif" "$mnt" </dev/null >/dev/null 2>"$mnt.err" || {
    cat "$mnt.err" >&2; rm -f "$mnt.err"; rmdir "$mnt"; fail "cannot mount $sif"; }
rm -f "$mnt.err"
pid=$$
(
    exec </dev/null >/dev/null 2>&1
    trap '' HUP INT QUIT TERM
    # until the process is gone or a zombie (its parent may wait for the output pipes we hold)
    while state=$(sed 's/.*) //; s/ .*//' "/proc/$pid/stat" 2>/dev/null) && [ "$state" != Z ]; do
        sleep 0.1
    done
    fusermount3 -u "$mnt" || fusermount3 -u -z "$mnt"
    rmdir "$mnt"
) &
# env, lowest precedence first in ch-run's argv (later wins): image env, <PREFIX>NAME, --env
# (prepended here in the reverse order)
IFS=$nl
for item in $envs; do
    set -- "--set-env=${item%%=*}='${item#*=}'" "$@"
done
unset IFS
for name in $(env | sed -n "s/^$prefix\\([A-Za-z_][A-Za-z0-9_]*\\)=.*/\\1/p"); do
    eval "value=\${$prefix$name}"
    set -- "--set-env=$name='$value'" "$@"
done
eval "$setup"
IFS=,
for spec in $binds; do
    [ -n "$spec" ] || continue
    src=${spec%%:*}
    rest=${spec#"$src"}
    rest=${rest#:}
    dst=${rest%%:*}
    case "$dst" in ""|ro|rw) dst=$src ;; esac
    [ -d "$mnt$dst" ] || [ -f "$mnt$dst" ] || fail "bind target $dst does not exist in the image"
    set -- -b "$src:$dst" "$@"
done
unset IFS
see() {  # bind what the caller's $1 needs to be seen at the same path
    top=${1#/}
    top=/${top%%/*}
    case "$top" in
        /|/tmp|/dev|/proc|/sys) return 0 ;;
    esac
    if [ -e "$mnt$1" ]; then return 0; fi
    [ -d "$mnt$top" ] || fail "$1 cannot be shown: the image has no $top"
    set_bind="$top"
}
set_bind=
see "$pwd"
[ -z "$set_bind" ] || set -- -b "$set_bind" "$@"
if [ -z "$no_home" ]; then
    set_bind=
    if [ "$home" = "$home_dst" ]; then see "$home"; [ -z "$set_bind" ] || set -- -b "$set_bind" "$@"
    else set -- -b "$home:$home_dst" "$@"; fi
    set -- "--set-env=HOME='$home_dst'" "$@"
fi
set -- --cd="$pwd" "$@"
export USER="${USER:-$(id -un)}"
exec ch-run --env-no-expand --unset-env="$prefix*" "$@"
