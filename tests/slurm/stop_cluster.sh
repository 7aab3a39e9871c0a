#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh: the daemons recorded in DIR/pids, by PID.
#   bash tests/slurm/stop_cluster.sh [DIR]      # DIR defaults to <repo>/.slurm
# Configs, accounting data and logs stay under DIR, so a later start_cluster.sh reuses them.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="${1:-$repo/.slurm}"
[[ -d $dir/pids ]] || { echo "stop_cluster: nothing to stop in $dir" >&2; exit 0; }

ours() {  # ours NAME: the PID recorded for NAME is alive and still that daemon (PIDs get reused)
    [[ -s $dir/pids/$1.pid ]] && [[ $(cat "/proc/$(cat "$dir/pids/$1.pid")/comm" 2>/dev/null) == "${1%%-*}" ]]
}

# jobs still running would keep slurmstepd processes alive; cancel them while slurmctld is up
if [[ -f $dir/slurm.conf ]] && ours slurmctld; then
    SLURM_CONF="$dir/slurm.conf" timeout 10 scancel -u "$(id -un)" 2>/dev/null || true
fi

stop() {  # stop NAME...: TERM them together, wait up to 10 s, then KILL what is left
    local name pid pids=()
    for name in "$@"; do
        ours "$name" || continue
        pid="$(cat "$dir/pids/$name.pid")"
        kill -TERM "$pid" 2>/dev/null && pids+=("$name:$pid")
    done
    for entry in ${pids[@]+"${pids[@]}"}; do
        pid=${entry#*:}
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop_cluster: ${entry%%:*} ($pid) did not stop in 10 s, killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    for name in "$@"; do rm -f "$dir/pids/$name.pid"; done
}

# reverse start order: SLURM first, then its database, then MariaDB and munge
nodes=()   # the slurmd of each node of a several-node cluster (start_cluster.sh --nodes N)
for f in "$dir"/pids/slurmd-*.pid; do [[ -e $f ]] && nodes+=("$(basename "$f" .pid)"); done
stop slurmd ${nodes[@]+"${nodes[@]}"} slurmctld
stop slurmdbd
stop mariadbd munged
echo "stop_cluster: stopped the cluster in $dir" >&2
