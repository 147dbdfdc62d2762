#!/usr/bin/env bash
# A real single-node Slurm (Debian 12: slurm-wlm 22.05 + munge) for the test suite.
#
#   scripts/slurm-single-node.sh start|stop|status
#
# start  writes /etc/slurm/slurm.conf (marked as ours; a foreign config is never overwritten
#        unless SHPC_LITE_SLURM_FORCE=1, and then it is backed up first), creates the munge key
#        if missing, starts munged (as user munge), slurmctld, then slurmd, and waits until
#        sinfo shows the node idle. Idempotent: daemons already running are left alone. A
#        controller it starts begins with a clean state (slurmctld -c: no jobs of earlier runs).
# stop   cancels queued/running jobs, then stops the daemons this script started (pid files
#        under /run/shpc-lite-slurm); a munged that was running before (e.g. systemd's) stays.
# status prints what runs and what sinfo says; exit 0 when the node answers.
# Logs: /var/log/slurm/slurm{ctld,d}.log, daemons' start-up output in /run/shpc-lite-slurm/*.out.
#
# Needs root. Environment: SHPC_LITE_SLURM_TIMEOUT (seconds to wait for the node, default 60),
# SHPC_LITE_SLURM_FORCE=1 (overwrite a foreign slurm.conf), SHPC_LITE_SLURM_PARTITION (default
# "debug").
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

MARK="# shpc-lite single-node Slurm: written by scripts/slurm-single-node.sh (safe to rewrite)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
RUN_DIR=/run/shpc-lite-slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
MUNGE_KEY=/etc/munge/munge.key
PARTITION="${SHPC_LITE_SLURM_PARTITION:-debug}"
TIMEOUT="${SHPC_LITE_SLURM_TIMEOUT:-60}"
NODE="$(hostname -s)"

say() { echo "slurm-single-node: $*" >&2; }
die() { say "error: $*"; exit 1; }

# --- helpers -----------------------------------------------------------------------------------

# pid_alive PIDFILE NAME: the pid file names a live process whose command is NAME.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid="$(tr -dc 0-9 <"$1")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# stop_pid PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pid() {
    local pid i
    if ! pid_alive "$1" "$2"; then rm -f "$1"; return 0; fi
    pid="$(tr -dc 0-9 <"$1")"
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        say "$2 (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$1"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 | tr -d ' '; }

# Epoch seconds of the SlurmdStartTime the controller knows for our node (0 if none).
slurmd_registered() {
    local t
    t="$(timeout 10 scontrol show node "$NODE" -o 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')"
    date -d "$t" +%s 2>/dev/null || echo 0
}

log_tails() {
    local f
    for f in "$RUN_DIR/slurmctld.out" "$LOG_DIR/slurmctld.log" "$RUN_DIR/slurmd.out" "$LOG_DIR/slurmd.log" \
             "$RUN_DIR/munged.out" /var/log/munge/munged.log; do
        [ -s "$f" ] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 15 "$f" >&2
    done
}

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (uid $(id -u)): it writes $CONF and starts munged/slurmctld/slurmd"; }

need_bins() {
    local b missing=()
    for b in munged munge unmunge slurmctld slurmd sinfo scontrol sbatch squeue; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing binaries: ${missing[*]} (apt-get install slurm-wlm munge)"
}

# --- config ------------------------------------------------------------------------------------

render_conf() {
    local mem_kb mem_mb
    mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    mem_mb=$(( mem_kb / 1024 / 2 ))          # below MemTotal, whatever slurmd measures
    [ "$mem_mb" -ge 1 ] || mem_mb=1
    cat <<EOF
$MARK
# Minimal single-node cluster for tests: no accounting, no cgroups, jobs may run as root.
ClusterName=shpc-lite
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Start jobs (and dependents, throttled array tasks) right away: ~1 s instead of ~3 s per step.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Finished jobs stay visible to 'scontrol show job' for an hour (no sacct without slurmdbd).
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

# write_conf: prints "changed" when the file was (re)written.
write_conf() {
    local tmp
    mkdir -p "$CONF_DIR"
    if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        if [ "${SHPC_LITE_SLURM_FORCE:-0}" != 1 ]; then
            die "$CONF exists and was not written by this script; refusing to overwrite it (SHPC_LITE_SLURM_FORCE=1 to replace it; it is backed up first)"
        fi
        local backup
        backup="$CONF.shpc-lite-backup.$(date +%Y%m%d%H%M%S)"
        cp -p "$CONF" "$backup"
        say "SHPC_LITE_SLURM_FORCE=1: foreign $CONF backed up to $backup"
    fi
    tmp="$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")"
    render_conf >"$tmp"
    chmod 644 "$tmp"
    if [ -e "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$CONF"
        say "wrote $CONF"
        echo changed
    fi
}

# --- munge -------------------------------------------------------------------------------------

start_munge() {
    if munge_works; then
        return 0
    fi
    id munge >/dev/null 2>&1 || die "user munge does not exist (is the munge package installed?)"
    install -d -o munge -g munge -m 700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 711 /var/lib/munge
    install -d -o munge -g munge -m 755 /run/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        say "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            rm -f "$MUNGE_KEY"
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
        chown munge:munge "$MUNGE_KEY"
        chmod 400 "$MUNGE_KEY"
    fi
    # A stale socket/pid from a killed munged makes the new one refuse to start.
    if ! pid_alive /run/munge/munged.pid munged; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    say "starting munged"
    runuser -u munge -- "$(command -v munged)" --pid-file=/run/munge/munged.pid \
        </dev/null >"$RUN_DIR/munged.out" 2>&1 9>&- \
        || { log_tails; die "munged failed to start"; }
    local i
    for i in $(seq 1 50); do
        munge_works && break
        sleep 0.1
    done
    munge_works || { log_tails; die "munged started but 'munge -n | unmunge' fails"; }
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"   # ours: stop it on 'stop'
}

# --- start / stop / status ---------------------------------------------------------------------

start() {
    need_root
    need_bins
    local t0 changed i state
    t0=$(date +%s)
    install -d -m 755 "$RUN_DIR"
    changed="$(write_conf)"
    start_munge
    install -d -o slurm -g slurm -m 755 "$LOG_DIR" "$STATE_DIR"
    install -d -o root -g root -m 755 "$SPOOL_DIR"
    touch "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"
    chown slurm:slurm "$LOG_DIR/slurmctld.log"

    if pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
        if [ -n "$changed" ]; then say "config changed: scontrol reconfigure"; scontrol reconfigure || true; fi
    else
        # -c: a fresh controller forgets jobs and node states of an earlier run (this is a test
        # cluster): jobs "running" when the daemons were stopped would otherwise hold the CPUs.
        say "starting slurmctld (clean state)"
        slurmctld -c </dev/null >"$RUN_DIR/slurmctld.out" 2>&1 9>&- || { log_tails; die "slurmctld failed to start"; }
        for i in $(seq 1 100); do
            timeout 5 scontrol ping 2>/dev/null | grep -q "is UP" && break
            sleep 0.2
        done
        timeout 5 scontrol ping 2>/dev/null | grep -q "is UP" || { log_tails; die "slurmctld does not answer 'scontrol ping' after 20 s"; }
    fi
    local slurmd_t0=0
    if ! pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
        say "starting slurmd"
        slurmd_t0=$(( $(date +%s) - 1 ))
        slurmd </dev/null >"$RUN_DIR/slurmd.out" 2>&1 9>&- || { log_tails; die "slurmd failed to start"; }
    fi

    # Wait (bounded) for the node to be idle; a node left DOWN/DRAIN by an earlier run is resumed.
    local deadline=$(( $(date +%s) + TIMEOUT )) resumed=0
    while :; do
        state="$(node_state)"
        case "$state" in
            idle|mix|mixed|alloc|allocated)
                # A node restored from saved state looks idle before the new slurmd registers.
                [ "$slurmd_t0" -eq 0 ] || [ "$(slurmd_registered)" -ge "$slurmd_t0" ] && break ;;
            down|drain|drained|draining|down\*|drain\*)
                if [ "$resumed" = 0 ]; then
                    say "node $NODE is $state: resuming it"
                    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
                    resumed=1
                fi ;;
        esac
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "sinfo: $(timeout 10 sinfo -N -l 2>&1 | tr '\n' ' ')"
            log_tails
            die "node $NODE not idle after ${TIMEOUT} s (state: '${state:-no answer}')"
        fi
        sleep 0.5
    done
    say "node $NODE is $state, partition $PARTITION ($(( $(date +%s) - t0 )) s)"
}

stop() {
    need_root
    # Cancel what is queued or running (no job processes left behind), then slurmd, the
    # controller, and munged if we started it.
    if pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
        local jobs i
        jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            for i in $(seq 1 50); do
                [ -z "$(timeout 10 squeue -h -t R,CG,S -o %A 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    stop_pid "$RUN_DIR/slurmd.pid" slurmd
    stop_pid "$RUN_DIR/slurmctld.pid" slurmctld
    if [ -e "$RUN_DIR/munged.pid" ]; then
        stop_pid "$RUN_DIR/munged.pid" munged
        rm -f /run/munge/munged.pid
    fi
}

status() {
    local name rc=0
    for name in slurmctld slurmd munged; do
        if pid_alive "$RUN_DIR/$name.pid" "$name"; then
            echo "$name: running (pid $(cat "$RUN_DIR/$name.pid"), started by this script)"
        elif [ "$name" = munged ] && munge_works; then
            echo "munged: running (not started by this script)"
        else
            echo "$name: not running (from this script)"
        fi
    done
    if [ -e "$CONF" ]; then
        if grep -qxF "$MARK" "$CONF"; then echo "config: $CONF (ours)"; else echo "config: $CONF (foreign)"; fi
    else
        echo "config: $CONF missing"
    fi
    # sinfo retries for ~10 s when no controller answers; scontrol ping does not.
    if timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" && timeout 10 sinfo 2>&1; then :; else
        echo "slurmctld: does not answer 'scontrol ping'"; rc=1
    fi
    return $rc
}

# start/stop from concurrent test sessions run one at a time.
serialize() {
    install -d -m 755 "$RUN_DIR"
    exec 9>"$RUN_DIR/script.lock"
    flock -w 180 9 || die "another slurm-single-node.sh start/stop holds $RUN_DIR/script.lock for 180 s"
}

case "${1:-}" in
    start) need_root; serialize; start ;;
    stop) need_root; serialize; stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
