#!/usr/bin/env bash
# A real one-host Slurm cluster (munge + slurmctld + slurmd from Debian/Ubuntu packages) for tests, CI and
# local development: `up` installs what is missing and starts it, `status` shows it, `down` stops it and
# removes everything `up` wrote. Idempotent; run as root (or with sudo).
#
#   bash slurm/local_cluster.sh up       # then: sinfo; srun hostname; colorize-dist submit ...
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh down
#
# State (daemon logs, spool, saved controller state, pid files) lives in $COLORIZE_DIST_SLURM_DIR
# (default /tmp/colorize-dist-slurm). The only file written outside it is /etc/slurm/slurm.conf, which every
# Slurm command reads; it carries a marker line, and an existing slurm.conf without that marker (a real
# cluster's) is never touched. One partition, `debug` (default), holds this host with all its CPUs; no GPUs,
# no accounting database (so `sacct` does not work; `scontrol show job` does).
set -euo pipefail

STATE_DIR=${COLORIZE_DIST_SLURM_DIR:-/tmp/colorize-dist-slurm}
SLURM_CONF=/etc/slurm/slurm.conf
MARKER="# written by colorize_dist slurm/local_cluster.sh"
PARTITION=debug

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo bash $0 $1)"
}

conf_is_ours() { [ -f "$SLURM_CONF" ] && grep -qxF "$MARKER" "$SLURM_CONF"; }

pid_alive() {  # pid_alive FILE: the process named in FILE is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages present: $(slurmctld -V), $(munged --version 2>&1 | awk '{print $1}')"
        return
    fi
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and munge yourself"
    say "installing slurm-wlm munge with apt-get (missing: ${missing[*]})"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$STATE_DIR/apt.log" 2>&1; then
        apt-get update -q >>"$STATE_DIR/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$STATE_DIR/apt.log" 2>&1 \
            || die "apt-get install slurm-wlm munge failed; see $STATE_DIR/apt.log"
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running"
        return
    fi
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key; say "created /etc/munge/munge.key"; }
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE_DIR/munged.started-by-us"
    say "started munged (pid $(cat /run/munge/munged.pid))"
}

write_conf() {
    local host cpus memory_mb
    host=$(hostname)
    cpus=$(nproc)
    memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if [ -f "$SLURM_CONF" ] && ! conf_is_ours; then
        die "$SLURM_CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    mkdir -p /etc/slurm "$STATE_DIR/ctld" "$STATE_DIR/d"
    cat >"$SLURM_CONF.tmp" <<EOF
$MARKER
# state in $STATE_DIR; remove with: bash slurm/local_cluster.sh down
ClusterName=colorize-local
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=20
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
# Short waits so tests see requeues promptly (defaults: 120 s before a requeued job may start again, set by
# cred_expire above; 30 s between SIGTERM and SIGKILL).
KillWait=15
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    # Keep the old file when nothing changed, so a second `up` does not disturb running daemons.
    if [ -f "$SLURM_CONF" ] && cmp -s "$SLURM_CONF.tmp" "$SLURM_CONF"; then
        rm "$SLURM_CONF.tmp"
        say "$SLURM_CONF unchanged (node $host, $cpus CPUs, partition $PARTITION)"
    else
        mv "$SLURM_CONF.tmp" "$SLURM_CONF"
        say "wrote $SLURM_CONF (node $host, $cpus CPUs, ${memory_mb} MB, partition $PARTITION)"
    fi
}

start_daemon() {  # start_daemon NAME: start slurmctld or slurmd unless its pid file names a live process
    local name=$1
    if pid_alive "$STATE_DIR/$name.pid"; then
        say "$name already running (pid $(cat "$STATE_DIR/$name.pid"))"
        return
    fi
    "/usr/sbin/$name" || die "$name did not start; see $STATE_DIR/$name.log"
    for _ in $(seq 50); do
        pid_alive "$STATE_DIR/$name.pid" && break
        sleep 0.2
    done
    pid_alive "$STATE_DIR/$name.pid" || die "$name exited; see $STATE_DIR/$name.log"
    say "started $name (pid $(cat "$STATE_DIR/$name.pid"), log $STATE_DIR/$name.log)"
}

wait_until_idle() {
    local state=""
    for _ in $(seq 60); do
        state=$(sinfo -h -p "$PARTITION" -o %T 2>/dev/null | head -1)
        case "$state" in
            idle|mixed|allocated) say "partition $PARTITION is $state; try: srun hostname"; return ;;
            down*|drain*) scontrol update nodename="$(hostname)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node did not become idle (state: ${state:-unknown}); see $STATE_DIR/slurmctld.log and slurmd.log"
}

cmd_up() {
    require_root up
    mkdir -p "$STATE_DIR"
    install_packages
    start_munge
    write_conf
    start_daemon slurmctld
    start_daemon slurmd
    wait_until_idle
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local name=$1 pidfile=$2 pid
    if ! pid_alive "$pidfile"; then
        say "$name not running"
        return
    fi
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid"
    fi
    say "stopped $name (pid $pid)"
}

cmd_down() {
    require_root down
    if conf_is_ours; then
        scancel --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    stop_daemon slurmd "$STATE_DIR/slurmd.pid"
    stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
    if [ -f "$STATE_DIR/munged.started-by-us" ]; then
        stop_daemon munged /run/munge/munged.pid
    else
        say "leaving munged alone (not started by this script)"
    fi
    if conf_is_ours; then
        rm -f "$SLURM_CONF"
        say "removed $SLURM_CONF"
    fi
    if [ -d "$STATE_DIR" ]; then
        rm -rf "$STATE_DIR"
        say "removed $STATE_DIR"
    fi
}

cmd_status() {
    local up=0
    if conf_is_ours; then
        say "config: $SLURM_CONF (ours), state in $STATE_DIR"
    elif [ -f "$SLURM_CONF" ]; then
        say "config: $SLURM_CONF (not ours)"
    else
        say "config: none"
    fi
    for name in slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$name.pid"; then
            say "$name running (pid $(cat "$STATE_DIR/$name.pid"))"
        else
            say "$name not running"
            up=1
        fi
    done
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then say "munged running"; else say "munged not running"; up=1; fi
    if [ $up -eq 0 ]; then
        sinfo
        squeue
    fi
    return $up
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
