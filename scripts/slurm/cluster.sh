#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm executor's tests and CI.
#
#   scripts/slurm/cluster.sh install      apt-get the Debian packages (root)
#   scripts/slurm/cluster.sh start DIR    start munged, slurmctld and slurmd with all their
#                                         state under DIR; prints `export SLURM_CONF=...`
#   scripts/slurm/cluster.sh stop DIR     stop the daemons started in DIR, by the PIDs they
#                                         wrote there (never by name)
#
# Runs as root (slurmd starts jobs as their submitting user). Ports come from
# RELORA_SLURM_PORT (default 16817, and the next one for slurmd), away from a real
# cluster's 6817/6818. The node is called `ci` and declares this machine's CPUs and 90% of
# its memory; no GPUs (GRES), so a GPU request is refused at submission, as on a CPU node.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# The process of a PID file, if it is still running (a zombie counts as gone).
live_pid() {
    local f=$1 pid
    [ -s "$f" ] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/status" ] || return 1
    grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" && return 1
    echo "$pid"
}

start() {
    local dir=$1
    [ "$(id -u)" = 0 ] || die "start needs root (slurmd runs jobs as their user)"
    for b in munged slurmctld slurmd sbatch; do
        command -v "$b" >/dev/null || die "$b not found; run: $0 install"
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chmod 755 "$dir"
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    local port=${RELORA_SLURM_PORT:-16817}

    runuser -u munge -- test -x "$dir" ||
        die "the munge user cannot reach $dir: make it and every folder above it world-executable"
    # munge: its own key and socket here, so a munged already on this machine is untouched.
    chown munge:munge "$dir/munge"
    chmod 755 "$dir/munge"
    if [ ! -s "$dir/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$dir/munge/munge.key"
        chown munge:munge "$dir/munge/munge.key"
        chmod 400 "$dir/munge/munge.key"
    fi
    runuser -u munge -- munged --socket="$dir/munge/socket" \
        --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
        --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed"

    local cpus mem
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 9 / 10))
    cat >"$dir/slurm.conf" <<CONF
ClusterName=relora-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
MinJobAge=86400
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
NodeName=ci NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ci Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N ci
    # Ready when the node takes jobs.
    local i state
    for i in $(seq 100); do
        state=$(sinfo -h -n ci -o %t 2>/dev/null || true)
        case "$state" in idle|mix|alloc) echo "export SLURM_CONF=$SLURM_CONF"; return 0 ;; esac
        sleep 0.2
    done
    tail -5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    die "the node did not come up (state: ${state:-none}); logs are in $dir/log"
}

stop() {
    local dir=$1 f pid i
    for f in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        pid=$(live_pid "$f") || continue
        kill "$pid" 2>/dev/null || true
        for i in $(seq 50); do live_pid "$f" >/dev/null || break; sleep 0.1; done
        if pid=$(live_pid "$f"); then kill -9 "$pid" 2>/dev/null || true; fi
    done
}

case "${1:-}" in
    install) install_packages ;;
    start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
