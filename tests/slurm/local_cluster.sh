#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for the launcher tests (and for trying launcher=slurm).
#   tests/slurm/local_cluster.sh up STATE_DIR     install if missing, start, wait until the node is idle
#   tests/slurm/local_cluster.sh down STATE_DIR   stop what `up` started (by the PIDs in its pidfiles)
# After `up`, point the SLURM commands at it: export SLURM_CONF=STATE_DIR/slurm.conf
# Everything (config, state, logs, munge socket) lives in STATE_DIR; no systemd, no cgroups.
# Exit status 77: SLURM cannot run on this machine (not root, no apt-get, install failed); the reason
# is the last line on stderr. Any other failure is an error in this set-up.
set -euo pipefail

cannot() { echo "local SLURM cannot start: $*" >&2; exit 77; }
fail() {
    echo "local SLURM failed to start: $*" >&2
    for log in "$state"/*.log "$state"/munge/*.log; do
        [ -f "$log" ] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }
    done
    exit 1
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    [ "$(id -u)" -eq 0 ] || cannot "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get"
    local packages="slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q $packages >"$state/apt.log" 2>&1 \
        || { apt-get update -q >>"$state/apt.log" 2>&1 && apt-get install -y -q $packages >>"$state/apt.log" 2>&1; } \
        || cannot "apt-get install $packages failed (see $state/apt.log)"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_conf() {
    # The node as slurmd sees it, so that slurmctld accepts its registration.
    local hw; hw=$(slurmd -C | head -n 1 | grep -o 'CPUs=.*CoresPerSocket=[0-9]*' | sed 's/Boards=[0-9]* //')
    cat >"$state/slurm.conf" <<EOF
ClusterName=omnitrain
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait out cred_expire before they start again (default 120 s).
AuthInfo=socket=$state/munge/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
KillWait=30
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    # munged refuses directories that others can write, and its socket's must be searchable by all.
    mkdir -p "$state/munge"
    chmod 755 "$state" "$state/munge"
    chown munge:munge "$state/munge"
    local as_munge=(runuser -u munge --)
    [ "$(id -u)" -eq 0 ] || as_munge=()
    "${as_munge[@]}" munged --socket="$state/munge/munge.socket" --pid-file="$state/munge/munged.pid" \
        --log-file="$state/munge/munged.log" --seed-file="$state/munge/munged.seed" \
        || fail "munged did not start"
    cp "$state/munge/munged.pid" "$state/munged.pid"
}

up() {
    mkdir -p "$state/ctld" "$state/spool"
    install
    [ "$(id -u)" -eq 0 ] || cannot "slurmd needs root to start job steps"
    write_conf
    start_munge
    export SLURM_CONF="$state/slurm.conf"
    slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
    slurmd -f "$SLURM_CONF" -N localhost || fail "slurmd did not start"
    for _ in $(seq 60); do
        [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { echo "$SLURM_CONF"; return 0; }
        sleep 0.5
    done
    fail "the node is not idle after 30 s: $(sinfo -h -o '%T %E' 2>&1)"
}

down() {
    # Controller and node daemon first (they talk to munge), then munge; each by its own pidfile.
    for name in slurmd slurmctld munged; do
        local pidfile="$state/$name.pid"
        [ -s "$pidfile" ] || continue
        local pid; pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done
}

[ $# -eq 2 ] || { echo "usage: $0 up|down STATE_DIR" >&2; exit 2; }
state=$(realpath -m "$2")
case "$1" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down STATE_DIR" >&2; exit 2 ;;
esac
