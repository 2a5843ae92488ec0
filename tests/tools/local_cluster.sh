#!/usr/bin/env bash
# A real Slurm cluster on one host (munge + slurmctld + slurmd from Debian/Ubuntu packages) for tests, CI and
# local development: `up` installs what is missing and starts it, `status` shows it, `down` stops it and
# removes everything `up` made. Idempotent; run as root (or with sudo).
#
#   bash tests/tools/local_cluster.sh up              # one node, this host; then: sinfo; srun hostname; colorize-dist submit
#   bash tests/tools/local_cluster.sh up --nodes 2    # also 2 emulated nodes, for multi-node jobs (srun -p multinode -N 2)
#   bash tests/tools/local_cluster.sh status
#   bash tests/tools/local_cluster.sh down
#
# This host is node `$(hostname)`, alone in partition `debug` (the default), with all its CPUs. `--nodes N` adds N
# emulated nodes, colorize-n1 … colorize-nN, in partition `multinode`: each is one slurmd in its own network
# namespace (address $SUBNET.11, .12, … on a bridge that holds $SUBNET.1 for this host, with no route out, so
# nothing they send leaves this host), UTS namespace (its own hostname) and mount namespace, where an /etc/hosts of
# its own names every node. They share this host's file system otherwise, as the nodes of a cluster share theirs,
# and its CPUs and memory. One slurmctld serves all.
# `up` without --nodes keeps the emulated nodes that are up; `up --nodes 0` removes them.
#
# State (daemon logs, spool, saved controller state, pid files) lives in $COLORIZE_DIST_SLURM_DIR (default
# /tmp/colorize-dist-slurm). Outside it, `up` writes only $SLURM_CONF (default /etc/slurm/slurm.conf, which every
# Slurm command reads), carrying a marker line (an existing file without it, a real cluster's, is never touched).
# COLORIZE_DIST_SLURM_SUBNET (default 10.232.0) moves the emulated nodes' /24. COLORIZE_DIST_SLURM_PORT (default
# 6817; slurmd uses the next port) and SLURM_CONF run a second, private cluster beside another one (with --nodes,
# give it its own subnet too). No GPUs, no accounting database (so `sacct` does not work; `scontrol show job` does).
set -euo pipefail

STATE_DIR=${COLORIZE_DIST_SLURM_DIR:-/tmp/colorize-dist-slurm}
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
PORT=${COLORIZE_DIST_SLURM_PORT:-6817}
SUBNET=${COLORIZE_DIST_SLURM_SUBNET:-10.232.0}
# Marks the files `up` writes; its text predates the script's move to tests/tools, so that a config written by an
# earlier checkout is still recognised as ours.
MARKER="# written by colorize_dist slurm/local_cluster.sh"
PARTITION=debug
MULTINODE_PARTITION=multinode
# What --nodes makes: namespaces colorize-slurm-n1 …, this host's ends of their links cdslurm-n1 …, bridge cdslurm0.
# A second cluster (another port) gets names of its own, so that neither touches the other's nodes.
if [ "$PORT" = 6817 ]; then
    NETNS_PREFIX=colorize-slurm VETH=cdslurm BRIDGE=cdslurm0
else
    NETNS_PREFIX=colorize-slurm$PORT VETH=cds$PORT BRIDGE=cds${PORT}br
fi
MAX_NODES=50

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo bash $0 $1)"
}

conf_is_ours() { [ -f "$SLURM_CONF" ] && grep -qxF "$MARKER" "$SLURM_CONF"; }

pid_alive() {  # pid_alive FILE: the process named in FILE is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_name() { echo "colorize-n$1"; }
node_address() { echo "$SUBNET.$((10 + $1))"; }
running_nodes() { cat "$STATE_DIR/nodes" 2>/dev/null || echo 0; }

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

# ------------------------------------------------------------------------------------------ emulated nodes

make_network() {  # make_network N: the bridge, N namespaces with their hosts files; keeps what exists
    local nodes=$1 i ns host
    command -v ip >/dev/null && command -v unshare >/dev/null || die "--nodes needs ip (iproute2) and unshare"
    host=$(hostname)
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        if [ -n "$(ip -4 route show to match "$SUBNET.1/24" | grep -v '^default')" ] \
            || [ -n "$(ip -4 addr show to "$SUBNET.0/24")" ]; then
            die "$SUBNET.0/24 is in use on this host; set COLORIZE_DIST_SLURM_SUBNET to a free private /24 (e.g. 10.233.0)"
        fi
        ip link add "$BRIDGE" type bridge
        ip addr add "$SUBNET.1/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
        say "bridge $BRIDGE: $SUBNET.1/24 (this host, for the emulated nodes only)"
    fi
    for i in $(seq "$nodes"); do
        ns="$NETNS_PREFIX-n$i"
        mkdir -p "$STATE_DIR/d/$(node_name "$i")"
        {
            echo "127.0.0.1 localhost"
            echo "$SUBNET.1 $host"
            for j in $(seq "$nodes"); do echo "$(node_address "$j") $(node_name "$j")"; done
        } >"$STATE_DIR/hosts-$(node_name "$i")"
        ip netns list | grep -qw "^$ns" && continue
        ip netns add "$ns"
        ip link add "$VETH-n$i" type veth peer name "$VETH-n$i-in"
        ip link set "$VETH-n$i" master "$BRIDGE" up
        ip link set "$VETH-n$i-in" netns "$ns"
        ip -n "$ns" link set "$VETH-n$i-in" name eth0
        ip -n "$ns" addr add "$(node_address "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        say "node $(node_name "$i"): network namespace $ns, $(node_address "$i") on eth0"
    done
}

remove_network() {  # remove_network FROM: the namespaces colorize-slurm-nFROM… and, from 1, the bridge
    local from=$1 ns i
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NETNS_PREFIX-n[0-9]*$" || true); do
        i=${ns##*-n}
        [ "$i" -ge "$from" ] || continue
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns delete "$ns"
        ip link delete "$VETH-n$i" 2>/dev/null || true  # gone with the namespace, except on some kernels
        say "removed node $(node_name "$i") (namespace $ns)"
    done
    if [ "$from" -le 1 ] && ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link delete "$BRIDGE"
        say "removed bridge $BRIDGE"
    fi
}

start_node_slurmd() {  # start_node_slurmd I: slurmd of emulated node I inside its namespaces
    local i=$1 name pidfile
    name=$(node_name "$i")
    pidfile="$STATE_DIR/slurmd-$name.pid"
    if pid_alive "$pidfile"; then
        say "slurmd of $name already running (pid $(cat "$pidfile"))"
        return
    fi
    # slurmd finds its NodeName from the host name; it daemonizes inside the namespaces, and so do its jobs.
    # (Not `ip netns exec`: it remounts /sys, hiding the cgroup file system slurmd needs.)
    nsenter --net="/run/netns/$NETNS_PREFIX-n$i" unshare --mount --uts \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && exec /usr/sbin/slurmd' "$name" "$STATE_DIR/hosts-$name" \
        || die "slurmd of $name did not start; see $STATE_DIR/slurmd-$name.log"
    wait_for_pidfile "$pidfile" "slurmd of $name" "$STATE_DIR/slurmd-$name.log"
}

# ------------------------------------------------------------------------------------------ the cluster

write_conf() {  # write_conf N; prints "changed" when the file is new or different
    local nodes=$1 host cpus memory_mb last
    host=$(hostname)
    cpus=$(nproc)
    memory_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    if [ -f "$SLURM_CONF" ] && ! conf_is_ours; then
        die "$SLURM_CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    mkdir -p "$(dirname "$SLURM_CONF")" "$STATE_DIR/ctld" "$STATE_DIR/d/$host"
    cat >"$SLURM_CONF.tmp" <<EOF
$MARKER
# state in $STATE_DIR; remove with: bash tests/tools/local_cluster.sh down
ClusterName=colorize-local
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=cred_expire=20
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
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
    if [ "$nodes" -gt 0 ]; then
        last=$((10 + nodes))
        cat >>"$SLURM_CONF.tmp" <<EOF
# Emulated nodes: one slurmd each in network + UTS namespaces (tests/tools/local_cluster.sh up --nodes $nodes)
NodeName=colorize-n[1-$nodes] NodeAddr=$SUBNET.[11-$last] CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$MULTINODE_PARTITION Nodes=colorize-n[1-$nodes] MaxTime=INFINITE State=UP
EOF
    fi
    # Keep the old file when nothing changed, so a second `up` does not disturb running daemons.
    if [ -f "$SLURM_CONF" ] && cmp -s "$SLURM_CONF.tmp" "$SLURM_CONF"; then
        rm "$SLURM_CONF.tmp"
        say "$SLURM_CONF unchanged (node $host, $cpus CPUs, partition $PARTITION; $nodes emulated nodes)" >&2
    else
        mv "$SLURM_CONF.tmp" "$SLURM_CONF"
        say "wrote $SLURM_CONF (node $host, $cpus CPUs, ${memory_mb} MB, partition $PARTITION; $nodes emulated" \
            "nodes)" >&2
        echo changed
    fi
}

wait_for_pidfile() {  # wait_for_pidfile FILE WHAT LOG
    for _ in $(seq 50); do
        pid_alive "$1" && break
        sleep 0.2
    done
    pid_alive "$1" || die "$2 exited; see $3"
    say "started $2 (pid $(cat "$1"), log $3)"
}

start_daemon() {  # start_daemon NAME PIDFILE LOG: start slurmctld or this host's slurmd unless already running
    local name=$1 pidfile=$2 log=$3
    if pid_alive "$pidfile"; then
        say "$name already running (pid $(cat "$pidfile"))"
        return
    fi
    "/usr/sbin/$name" || die "$name did not start; see $log"
    wait_for_pidfile "$pidfile" "$name" "$log"
}

wait_until_idle() {  # every node of the cluster idle (or busy with jobs)
    local states=""
    for _ in $(seq 90); do
        states=$(sinfo -h -N -o "%N %T" 2>/dev/null | sort -u)
        if [ -n "$states" ] && ! echo "$states" | grep -qvE ' (idle|mixed|allocated|completing)$'; then
            say "up: $(echo "$states" | tr '\n' ' ')— try: srun hostname"
            return
        fi
        echo "$states" | awk '$2 ~ /^(down|drain)/ {print $1}' | while read -r node; do
            scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        done
        sleep 0.5
    done
    die "nodes did not become idle (${states:-no answer}); see $STATE_DIR/slurmctld.log and slurmd-*.log"
}

cmd_up() {
    require_root up
    local nodes changed host
    nodes=$(running_nodes)
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; nodes=$2; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) die "unknown option $1 (usage: $0 up [--nodes N])" ;;
        esac
    done
    [[ "$nodes" =~ ^[0-9]+$ ]] && [ "$nodes" -le "$MAX_NODES" ] || die "--nodes takes 0..$MAX_NODES, got $nodes"
    [ "$nodes" -ne 1 ] || die "--nodes 1 would add a single emulated node; multi-node jobs need 2 or more"
    host=$(hostname)
    mkdir -p "$STATE_DIR"
    install_packages
    start_munge
    if [ "$nodes" -lt "$(running_nodes)" ]; then  # fewer emulated nodes than before: stop the others first
        for i in $(seq $((nodes + 1)) "$(running_nodes)"); do
            stop_daemon "slurmd of $(node_name "$i")" "$STATE_DIR/slurmd-$(node_name "$i").pid"
        done
        remove_network $((nodes + 1))
    fi
    [ "$nodes" -eq 0 ] || make_network "$nodes"
    echo "$nodes" >"$STATE_DIR/nodes"
    changed=$(write_conf "$nodes")
    if [ "$changed" = changed ] && pid_alive "$STATE_DIR/slurmctld.pid"; then
        # Nodes were added or removed: Slurm 22.05 reads them at start. Jobs survive (state is saved).
        say "config changed: restarting the daemons"
        stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
        for pidfile in "$STATE_DIR"/slurmd*.pid; do
            [ -e "$pidfile" ] && stop_daemon "$(basename "$pidfile" .pid)" "$pidfile"
        done
    fi
    start_daemon slurmctld "$STATE_DIR/slurmctld.pid" "$STATE_DIR/slurmctld.log"
    start_daemon slurmd "$STATE_DIR/slurmd-$host.pid" "$STATE_DIR/slurmd-$host.log"
    for i in $(seq "$nodes"); do
        start_node_slurmd "$i"
    done
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
    local pidfile
    if conf_is_ours; then
        scancel --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    for pidfile in "$STATE_DIR"/slurmd*.pid; do
        [ -e "$pidfile" ] && stop_daemon "$(basename "$pidfile" .pid)" "$pidfile"
    done
    stop_daemon slurmctld "$STATE_DIR/slurmctld.pid"
    remove_network 1
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
    local up=0 pidfile nodes i
    nodes=$(running_nodes)
    if conf_is_ours; then
        say "config: $SLURM_CONF (ours), state in $STATE_DIR, $nodes emulated nodes"
    elif [ -f "$SLURM_CONF" ]; then
        say "config: $SLURM_CONF (not ours)"
    else
        say "config: none"
    fi
    for pidfile in "$STATE_DIR/slurmctld.pid" "$STATE_DIR/slurmd-$(hostname).pid" \
        $(for i in $(seq "$nodes"); do echo "$STATE_DIR/slurmd-$(node_name "$i").pid"; done); do
        if pid_alive "$pidfile"; then
            say "$(basename "$pidfile" .pid) running (pid $(cat "$pidfile"))"
        else
            say "$(basename "$pidfile" .pid) not running"
            up=1
        fi
    done
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then say "munged running"; else say "munged not running"; up=1; fi
    if [ $up -eq 0 ]; then
        sinfo -N -o "%N %P %T %c %O"
        squeue
    fi
    return $up
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up [--nodes N] | down | status" >&2; exit 2 ;;
esac
