#!/usr/bin/env bash
# Start a SLURM test cluster (with accounting) for the SLURM tests, everything under DIR.
#
#   bash tests/slurm/start_cluster.sh [DIR] [--nodes N]   # DIR defaults to <repo>/.slurm, N to 1
#   source DIR/env.sh                           # exports SLURM_CONF for sbatch/sinfo/submitit
#   bash tests/slurm/stop_cluster.sh [DIR]
#
# Installs the Debian packages when missing, writes slurm.conf/slurmdbd.conf, the munge key and the
# MariaDB data directory under DIR, starts munged, mariadbd, slurmdbd, slurmctld and slurmd in the
# background (PIDs in DIR/pids/<name>.pid, logs in DIR/log/), registers the cluster in accounting,
# creates the database stds_search (user stds) for the search tests and waits until the nodes are
# idle. Running it again while the cluster is up only re-checks it.
# The TCP ports are derived from DIR, so clusters in two directories (a checkout's and a CI clone's)
# can run side by side; MariaDB and munge listen on sockets under DIR only.
#
# Nodes: with N = 1 the node is this host (NodeAddr 127.0.0.1). With N > 1 this one machine plays N
# nodes node1..nodeN, each its own slurmd (`slurmd -N nodeK`, PID in DIR/pids/slurmd-nodeK.pid) with
# its own port and its own loopback address 127.0.0.(K+1) as NodeAddr; every node has all the
# host's CPUs and 1/N of its memory. SLURM places a job's tasks on these nodes as on real ones
# (SLURM_JOB_NODELIST=node[1-2], one srun task set per node), while all traffic stays on loopback.
# The node names do not resolve; stds takes a node's address from SLURM's NodeAddr then
# (stds.run.setup.distributed). Debian's slurmd 22.05 starts several daemons on one host this way
# (each reads its own Port= from its node line), so no network namespace is needed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="" nodes=1
while (($#)); do
    case $1 in
        --nodes) nodes="${2:-}"; shift 2 || true ;;
        --nodes=*) nodes="${1#--nodes=}"; shift ;;
        -*) echo "start_cluster: unknown option $1 (usage: start_cluster.sh [DIR] [--nodes N])" >&2; exit 2 ;;
        *) dir=$1; shift ;;
    esac
done
[[ $nodes =~ ^[1-9][0-9]*$ ]] && ((nodes <= 4)) || {
    echo "start_cluster: --nodes '$nodes' must be a whole number from 1 to 4" >&2; exit 2; }
dir="${dir:-$repo/.slurm}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
cluster=stdstest
host="$(hostname -s)"
t0=$SECONDS

log() { echo "start_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- packages ---------------------------------------------------------------------------------
need=()
for pkg in slurmctld slurmd slurm-client munge slurmdbd mariadb-server; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    log "installing ${need[*]}"
    sudo_cmd=()
    [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >"$dir/apt.log" 2>&1 || {
        "${sudo_cmd[@]}" apt-get update -q >>"$dir/apt.log" 2>&1
        "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >>"$dir/apt.log" 2>&1
    } || die "apt-get install failed, see $dir/apt.log"
fi

if ((nodes == 1)); then node_names=("$host"); else node_names=($(seq -f 'node%g' "$nodes")); fi
mkdir -p "$dir"/{pids,log,state,munge,mysql,run}
for name in "${node_names[@]}"; do mkdir -p "$dir/spool/$name"; done
conf="$dir/slurm.conf"
dbdconf="$dir/slurmdbd.conf"
msock="$dir/munge/run/munge.socket.2"
dbsock="$dir/run/mysqld.sock"
export SLURM_CONF="$conf"
# slurmctld, slurmd, slurmdbd ports: three in a row in [7000, 19000), below the master ports that
# stds.distributed derives for DDP jobs ([20000, 60000]); the slurmd of nodes 2..4 in [19000, 20000)
dir_hash=$(cksum <<<"$dir" | cut -d' ' -f1)
port=$((7000 + dir_hash % 4000 * 3))
ctld_port=$port slurmd_port=$((port + 1)) dbd_port=$((port + 2))
node_port() {  # node_port K: the slurmd port of node K (1-based)
    if (($1 == 1)); then echo "$slurmd_port"; else echo $((19000 + dir_hash % 333 * 3 + $1 - 2)); fi
}

running() {  # running NAME: its recorded PID is alive and still that daemon (PIDs get reused)
    local f="$dir/pids/$1.pid"
    [[ -s $f ]] && [[ $(cat "/proc/$(cat "$f")/comm" 2>/dev/null) == "${1%%-*}" ]]
}

port_free() {  # port_free PORT NAME: die naming the listener when another process holds PORT
    local holder
    command -v ss >/dev/null || return 0
    holder="$(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:.*' || true)"
    [[ -z $holder ]] || die "port $1 (for $2, derived from $dir) is taken by $holder; stop it or use another DIR"
}

start() {  # start NAME CMD...: run CMD in the background (foreground mode), record its PID
    local name=$1; shift
    if running "$name"; then return; fi
    case $name in
        slurmdbd) port_free "$dbd_port" "$name" ;;
        slurmctld) port_free "$ctld_port" "$name" ;;
        slurmd) port_free "$slurmd_port" "$name" ;;
        slurmd-node*) port_free "$(node_port "${name#slurmd-node}")" "$name" ;;
    esac
    "$@" >>"$dir/log/$name.out" 2>&1 &
    echo $! >"$dir/pids/$name.pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "$what not ready after ${limit}s (logs in $dir/log/)"
        sleep 0.2
    done
}

# --- munge ------------------------------------------------------------------------------------
if [[ ! -s $dir/munge/munge.key ]]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 700 "$dir/munge"   # munged wants its key directory private ...
chmod 600 "$dir/munge/munge.key"
mkdir -p "$dir/munge/run"
chmod 755 "$dir/munge/run"   # ... and the socket directory world-readable
start munged munged --foreground --force --key-file="$dir/munge/munge.key" --socket="$msock" \
    --pid-file="$dir/munge/run/munged.pid" --seed-file="$dir/munge/munge.seed" \
    --log-file="$dir/log/munged.log"
wait_for 20 munged munge --socket="$msock" -n

# --- MariaDB ----------------------------------------------------------------------------------
if [[ ! -d $dir/mysql/mysql ]]; then
    mariadb-install-db --user=root --datadir="$dir/mysql" --auth-root-authentication-method=socket \
        --skip-test-db >"$dir/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed"
fi
start mariadbd mariadbd --no-defaults --user=root --datadir="$dir/mysql" --socket="$dbsock" \
    --skip-networking --pid-file="$dir/run/mariadbd.pid" --log-error="$dir/log/mariadbd.log" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
wait_for 60 mariadbd mariadb --no-defaults --socket="$dbsock" -uroot -e "select 1"
mariadb --no-defaults --socket="$dbsock" -uroot -e \
    "CREATE DATABASE IF NOT EXISTS slurm_acct_db;" || die "cannot create the accounting database"
# a database for Optuna studies shared by URL, as a cluster's database server would hold them
# (tests/test_slurm.py; PyMySQL reaches it through the socket: STDS_TEST_SEARCH_STORAGE in env.sh)
search_storage="mysql+pymysql://stds:stds@localhost/stds_search?unix_socket=$dbsock"
mariadb --no-defaults --socket="$dbsock" -uroot -e "CREATE DATABASE IF NOT EXISTS stds_search;
    CREATE USER IF NOT EXISTS 'stds'@'localhost' IDENTIFIED BY 'stds';
    GRANT ALL PRIVILEGES ON stds_search.* TO 'stds'@'localhost';" || die "cannot create the search database"

# --- configs ----------------------------------------------------------------------------------
node_line="$(slurmd -C | head -n1)"
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")"
mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")"
mem=$((mem * 9 / 10 / nodes))   # room for the OS (a node reporting more than it has is drained)
hw="$(sed -e "s/^NodeName=[^ ]* //" -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$node_line")"
node_lines=""
if ((nodes == 1)); then
    node_lines="NodeName=$host $hw NodeAddr=127.0.0.1 State=UNKNOWN"
else
    for k in $(seq "$nodes"); do
        node_lines+="NodeName=node$k NodeHostname=$host NodeAddr=127.0.0.$((k + 1)) Port=$(node_port "$k") $hw State=UNKNOWN"$'\n'
    done
fi
node_list="$(IFS=,; echo "${node_names[*]}")"
per_node=""; ((nodes == 1)) || per_node="-%n"   # each slurmd its own PID and log file
what="a one-node test cluster"; ((nodes == 1)) || what="a test cluster of $nodes nodes on one machine"

cat >"$dbdconf.new" <<CONF
AuthType=auth/munge
AuthInfo=socket=$msock
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
StoragePort=0
LogFile=$dir/log/slurmdbd.log
PidFile=$dir/run/slurmdbd.pid
CONF
# slurmdbd reaches MariaDB through its socket (StorageHost=localhost + MYSQL_UNIX_PORT below)
chmod 600 "$dbdconf.new"

cat >"$conf.new" <<CONF
# Written by tests/slurm/start_cluster.sh: $what.
ClusterName=$cluster
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job: 10 s here instead of the default 120 s
AuthInfo=socket=$msock,cred_expire=10
CredType=cred/munge
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd$per_node.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd$per_node.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
EnforcePartLimits=ALL
ReturnToService=2
MailProg=/bin/true
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$msock
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$node_lines
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP
CONF

stop_daemon() {  # stop_daemon NAME: stop a running daemon by its recorded PID
    local f="$dir/pids/$1.pid" pid
    running "$1" || return 0
    pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}
install_conf() {  # install_conf FILE DAEMON...: a changed config restarts the daemons that read it
    local file=$1; shift
    if ! cmp -s "$file.new" "$file"; then
        [[ -f $file ]] && for d in "$@"; do stop_daemon "$d"; done
        mv "$file.new" "$file"
    else
        rm -f "$file.new"
    fi
}
install_conf "$dbdconf" slurmdbd
# every slurmd that runs, also those of nodes a changed --nodes drops
running_slurmd=(slurmd)
for f in "$dir"/pids/slurmd-*.pid; do [[ -e $f ]] && running_slurmd+=("$(basename "$f" .pid)"); done
install_conf "$conf" "${running_slurmd[@]}" slurmctld

cat >"$dir/env.sh" <<ENV
# source this file to talk to the test cluster under $dir
export SLURM_CONF=$conf
# the SQLAlchemy URL of the test cluster's database for Optuna studies (MariaDB, PyMySQL)
export STDS_TEST_SEARCH_STORAGE='$search_storage'
ENV

# --- slurmdbd, cluster registration, slurmctld, slurmd ---------------------------------------
export MYSQL_UNIX_PORT="$dbsock"
start slurmdbd slurmdbd -D   # reads slurmdbd.conf next to $SLURM_CONF
wait_for 30 slurmdbd sacctmgr -i -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$cluster"; then
    sacctmgr -i add cluster "$cluster" >/dev/null
fi
start slurmctld slurmctld -D -i -f "$conf"
wait_for 30 slurmctld scontrol ping
if ((nodes == 1)); then
    start slurmd slurmd -D -f "$conf"
else
    for name in "${node_names[@]}"; do start "slurmd-$name" slurmd -D -N "$name" -f "$conf"; done
fi

for name in "${node_names[@]}"; do
    end=$((SECONDS + 40))
    until [[ $(sinfo -h -n "$name" -o %t 2>/dev/null) =~ ^(idle|mix|alloc) ]]; do
        state="$(sinfo -h -n "$name" -o %t 2>/dev/null || true)"
        if [[ $state == down* || $state == drain* ]]; then
            scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
        fi
        ((SECONDS < end)) || die "node $name is '$state', not idle (see $dir/log/slurmd*.log, slurmctld.log)"
        sleep 0.3
    done
done

log "cluster '$cluster' up in $((SECONDS - t0)) s: node(s) $node_list, $cpus CPUs and ${mem} MB each"
echo "export SLURM_CONF=$conf"
